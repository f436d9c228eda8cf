"""The state pass of the chunk-parallel kernels of retention and RWKV-6: ``S_{c+1} = exp(A_c) * S_c + h_c`` over the
chunks (forward), or ``dS_c = exp(A_c) * dS_{c+1} + dh_c`` (backward), with a log decay ``A_c`` per chunk and state
row. RWKV-6 passes its per-channel chunk totals; retention its scalar ``n_c log gamma`` broadcast over the rows.
Sequential in the chunks, parallel over the ``K * V`` state entries; ``G`` chunks per step: one ``[G, BLOCK]`` load
(G loads in flight, not one), an associative scan of the affine maps over the G chunks, one ``[G, BLOCK]`` store.
Packed documents: :class:`ChunkIndex` (each document's chunks from its own start), one pass program per document x
head and state block.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.triton_common import MAX_GRID_YZ, Launch, segment_tokens


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Composition of ``x -> a1 x + b1`` then ``x -> a2 x + b2`` (the combine of the chunk recurrence's scan)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _chunk_pass_kernel(
    states, gl, s_edge, chunk_offsets,
    NT,
    V: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr,
    HAS_EDGE: tl.constexpr, REVERSE: tl.constexpr, H: tl.constexpr = 1, IS_VARLEN: tl.constexpr = False,
):
    """The recurrence over chunks, in place on ``states [B * H, NT + 1, K * V]`` (fp32), row k of chunk c decayed by
    ``exp(gl[i_bh, c, k])``; ``s_edge [B * H, K * V]``. Forward: slot 0 <- ``s_edge`` (or zeros), then for c = 0 ..
    NT - 1 slot c + 1 <- ``exp(A_L) * slot c + slot c + 1``. Backward (``REVERSE``): slot NT <- ``s_edge`` (or zeros),
    then for c = NT - 1 .. 0 slot c <- ``exp(A_L) * slot c + 1 + slot c``. Grid ``(cdiv(K * V, BLOCK), B * H)``:
    program ``(i_s, i_bh)`` carries state entries ``[i_s * BLOCK, (i_s + 1) * BLOCK)`` through all chunks, ``G``
    chunks per step (one ``[G, BLOCK]`` load, an associative scan of the affine maps, one store). ``IS_VARLEN``
    (packed documents, :func:`~zoo.kernels.triton_common.chunk_span`'s layout): grid ``(cdiv(K * V, BLOCK), N * H)``,
    program ``(i_s, i_nh)`` runs document ``n = i_nh // H``'s ``NT_n`` chunks, head ``h = i_nh % H``: its state rows
    from ``H * (C_n + n) + h * (NT_n + 1)``, its decay rows from ``H * C_n + h * NT_n`` (``C_n = chunk_offsets[n]``,
    ``NT_n = chunk_offsets[n + 1] - C_n``); ``s_edge [N, H, K * V]``."""
    i_s, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_s = i_s * BLOCK + tl.arange(0, BLOCK)
    o_g = tl.arange(0, G)
    m_s = o_s < KV
    K = KV // V
    if IS_VARLEN:
        i_n, i_h = i_bh // H, i_bh % H
        C_n = tl.load(chunk_offsets + i_n).to(tl.int64)
        NT = (tl.load(chunk_offsets + i_n + 1) - C_n).to(tl.int32)
        p_base = states + (H * (C_n + i_n) + i_h * (NT + 1)) * KV + o_s
        p_gl = gl + (H * C_n + i_h * NT) * K + o_s // V
    else:  # today's lines, op for op
        p_base = states + i_bh * (NT + 1) * KV + o_s
        p_gl = gl + i_bh * NT * K + o_s // V
    if HAS_EDGE:
        b_s = tl.load(s_edge + i_bh * KV + o_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BLOCK], dtype=tl.float32)
    if REVERSE:
        tl.store(p_base + tl.cast(NT, tl.int64) * KV, b_s, mask=m_s)  # int64: NT * KV can pass 2^31
    else:
        tl.store(p_base, b_s, mask=m_s)
    for i0 in range(0, NT, G):
        i = i0 + o_g  # [G], the order the chunks are passed in
        if REVERSE:
            c = NT - 1 - i
            slot = c
        else:
            c = i
            slot = c + 1
        m = (i < NT)[:, None] & m_s[None, :]
        # past the last chunk: log decay 0 and h = 0, the identity map
        b_d = tl.exp(tl.load(p_gl[None, :] + c.to(tl.int64)[:, None] * K, mask=m, other=0.0))  # [G, BLOCK]
        p = p_base[None, :] + slot.to(tl.int64)[:, None] * KV  # [G, BLOCK]
        b_h = tl.load(p, mask=m, other=0.0)
        b_a, b_b = tl.associative_scan((b_d, b_h), 0, _affine_combine)
        b_out = b_a * b_s[None, :] + b_b  # [G, BLOCK], the state after each of the G chunks
        tl.store(p, b_out, mask=m)
        b_s = tl.sum(tl.where(o_g[:, None] == G - 1, b_out, 0.0), axis=0)


class ChunkParallelTiles(NamedTuple):
    """Launch parameters of the chunk-parallel kernels: the per-chunk launches use ``[BT, BK]`` / ``[BT, BV]`` /
    ``[BK, BV]`` tiles (``grad_launch``: the gradient kernel's options); the state passes carry ``BLOCK`` state
    entries per program, ``G`` chunks per step; ``KG``: the width of the channel slices a gradient kernel walks
    (RWKV-6's; 0 where unused)."""

    BT: int
    BK: int
    BV: int
    BLOCK: int
    G: int
    launch: Launch
    grad_launch: Launch
    pass_launch: Launch
    KG: int = 0


def chunk_pass(states: torch.Tensor, gl: torch.Tensor, edge: torch.Tensor | None, reverse: bool, tiles: ChunkParallelTiles,
               index: ChunkIndex | None = None) -> None:
    """Run :func:`_chunk_pass_kernel` in place on ``states [B * H, NT + 1, K, V]`` with log decays ``gl [B * H, NT,
    K]``; ``edge`` is the initial state (forward) or the final state's gradient (``reverse``), None: zeros. Packed
    documents (``index``): ``states [H * (NT + N), K, V]``, ``gl [H * NT, K]`` in :func:`chunk_index`'s layout,
    ``edge [N, H, K, V]``; grid ``(cdiv(K * V, BLOCK), N * H)``."""
    K, V = states.shape[-2], states.shape[-1]
    edge_arg = states if edge is None else edge
    common = dict(V=V, KV=K * V, BLOCK=tiles.BLOCK, G=tiles.G, HAS_EDGE=edge is not None, REVERSE=reverse,
                  **tiles.pass_launch._asdict())
    if index is None:
        _chunk_pass_kernel[(triton.cdiv(K * V, tiles.BLOCK), states.shape[0])](
            states, gl, edge_arg, None, states.shape[1] - 1, **common)
    else:
        _chunk_pass_kernel[(triton.cdiv(K * V, tiles.BLOCK), index.N * index.H)](
            states, gl, edge_arg, index.offsets, index.NT, H=index.H, IS_VARLEN=True, **common)


class ChunkIndex(NamedTuple):
    """Packed documents cut into chunks for the chunk-parallel kernels (fla's ``prepare_chunk_indices`` /
    ``chunk_offsets``): document n (tokens ``[bos_n, eos_n)``) has ``NT_n = cdiv(eos_n - bos_n, BT)`` chunks from its
    own start, ``NT`` chunks in all. ``table``: one int32 device tensor (built on the host from the bounds, copied
    once), the views below. The per-chunk kernels run grid ``(NT, NV, H)``; document n, head h owns state rows
    ``[H * S_n + h * (NT_n + 1), + NT_n + 1)`` (``S_n = C_n + n``) and per-chunk rows ``[H * C_n + h * NT_n, + NT_n)``
    (``C_n = sum_{m<n} NT_m``)."""

    N: int
    H: int
    NT: int
    BT: int
    table: torch.Tensor
    bounds: tuple[int, ...]

    @property
    def indices(self) -> torch.Tensor:
        """``[NT, 2]`` flat: (document, chunk within the document) of every chunk."""
        return self.table[:2 * self.NT]

    @property
    def offsets(self) -> torch.Tensor:
        """``[N + 1]``: ``C_n``, the chunks before document n."""
        return self.table[2 * self.NT:2 * self.NT + self.N + 1]

    @property
    def cu(self) -> torch.Tensor:
        """``[N + 1]``: the documents' token bounds."""
        s = 2 * self.NT + self.N + 1
        return self.table[s:s + self.N + 1]

    @property
    def first(self) -> torch.Tensor:
        """``[N * H]``: the state row of each document x head's initial state (its final state: ``last``)."""
        s = 2 * self.NT + 2 * self.N + 2
        return self.table[s:s + self.N * self.H]

    @property
    def last(self) -> torch.Tensor:
        s = 2 * self.NT + 2 * self.N + 2 + self.N * self.H
        return self.table[s:s + self.N * self.H]

    @property
    def slots(self) -> int:
        """Rows of the states buffer: ``H * (NT + N)``."""
        return self.H * (self.NT + self.N)


def chunk_index(cu_seqlens, BT: int, H: int, device: torch.device, table: torch.Tensor | None = None) -> ChunkIndex:
    """The :class:`ChunkIndex` of packed documents ``cu_seqlens`` (a :class:`~zoo.kernels.backends.CuSeqlens`; its
    host bounds only, no device sync) in chunks of BT tokens, H heads; ``table``: the one built before (the backward
    reuses the forward's), else built on the host and copied to ``device`` once."""
    bounds = tuple(cu_seqlens.bounds)
    N = len(bounds) - 1
    nt = [triton.cdiv(e - s, BT) for s, e in zip(bounds, bounds[1:])]
    offsets = [0]
    for k in nt:
        offsets.append(offsets[-1] + k)
    NT = offsets[-1]
    if table is None:
        indices = [x for n, k in enumerate(nt) for c in range(k) for x in (n, c)]
        first = [H * (offsets[n] + n) + h * (nt[n] + 1) for n in range(N) for h in range(H)]
        last = [f + nt[i // H] for i, f in enumerate(first)]
        table = torch.tensor([*indices, *offsets, *bounds, *first, *last], dtype=torch.int32).to(device)
    return ChunkIndex(N, H, NT, BT, table, bounds)


class ChunkStates(NamedTuple):
    """The states buffer of a chunk-parallel launch sequence and the per-chunk kernels' geometry: without packed
    documents ``states [B * H, NT + 1, K, V]`` and grid ``(NT, NV, B * H)``; with them (``index``) ``states [H * (NT +
    N), K, V]`` and grid ``(NT, NV, H)`` over all documents' NT chunks. fp32."""

    states: torch.Tensor
    index: ChunkIndex | None
    NT: int
    grid: tuple[int, int, int]

    @property
    def varlen(self) -> tuple[tuple, dict]:
        """The per-chunk kernels' ``(chunk_indices, cu)`` arguments and their ``IS_VARLEN`` keyword."""
        return ((None, None), {}) if self.index is None else ((self.index.indices, self.index.cu), {"IS_VARLEN": True})

    def edge(self, final: bool, B: int, H: int, K: int, V: int) -> torch.Tensor:
        """The initial (slot 0) or final (slot NT) states ``[B, H, K, V]``, or each document's ``[N, H, K, V]``."""
        if self.index is None:
            return self.states[:, self.NT if final else 0].reshape(B, H, K, V)  # [B * H, K, V] -> [B, H, K, V]
        rows = self.index.last if final else self.index.first
        return self.states.index_select(0, rows.long()).view(self.index.N, H, K, V)


def chunk_states(cu_seqlens, BT: int, B: int, H: int, K: int, V: int, NT: int, NV: int, device: torch.device,
                 table: torch.Tensor | None = None) -> ChunkStates:
    """The :class:`ChunkStates` of a launch sequence over ``NT`` chunks of ``BT`` tokens (packed documents
    ``cu_seqlens``: their :func:`chunk_index`, ``table`` the forward's for the backward)."""
    f32 = dict(dtype=torch.float32, device=device)
    if cu_seqlens is None:
        return ChunkStates(torch.empty(B * H, NT + 1, K, V, **f32), None, NT, (NT, NV, B * H))
    index = chunk_index(cu_seqlens, BT, H, device, table)
    return ChunkStates(torch.empty(index.slots, K, V, **f32), index, index.NT, (index.NT, NV, H))


def chunk_varlen_in_one_launch(cu_seqlens, state_elements: int, BT: int, heads: int) -> bool:
    """Whether a chunk-parallel scan runs packed documents ``cu_seqlens`` (a
    :class:`~zoo.kernels.backends.CuSeqlens`, host bounds) in one launch sequence, each document's state having
    ``state_elements`` entries: when the state passes' ``N * heads`` programs fit grid axis y and all documents'
    states (``NT + N`` per head, each document's chunks from its own start) are no more than one segment's
    (:func:`~zoo.kernels.triton_common.segment_tokens`; ``cdiv(S, BT) + 1``), so the buffers stay those of one
    segment. Otherwise the caller runs each document alone."""
    bounds = cu_seqlens.bounds
    n = len(bounds) - 1
    chunks = sum(triton.cdiv(e - s, BT) for s, e in zip(bounds, bounds[1:]))
    return n * heads <= MAX_GRID_YZ and chunks + n <= triton.cdiv(segment_tokens(state_elements), BT) + 1


def chunk_dims(tiles, T: int, H: int, K: int, V: int, precision: str) -> tuple[int, int, dict]:
    """``(NT, NV, keyword arguments)`` of the per-chunk kernels (grid ``(NT, NV, B * H)``) of a chunk-parallel op:
    its shapes, its ``tiles`` (BT, BK, BV and launch options) and the ``tl.dot`` precision."""
    NT, NV = triton.cdiv(T, tiles.BT), triton.cdiv(V, tiles.BV)
    return NT, NV, dict(H=H, K=K, V=V, BT=tiles.BT, BK=tiles.BK, BV=tiles.BV, PRECISION=precision, **tiles.launch._asdict())
