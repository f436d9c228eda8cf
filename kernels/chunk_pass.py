"""The state pass of the chunk-parallel kernels of retention and RWKV-6: ``S_{c+1} = exp(A_c) * S_c + h_c`` over the
chunks (forward), or ``dS_c = exp(A_c) * dS_{c+1} + dh_c`` (backward), with a log decay ``A_c`` per chunk and state
row. RWKV-6 passes its per-channel chunk totals; retention its scalar ``n_c log gamma`` broadcast over the rows.
Sequential in the chunks, parallel over the ``K * V`` state entries; ``G`` chunks per step: one ``[G, BLOCK]`` load
(G loads in flight, not one), an associative scan of the affine maps over the G chunks, one ``[G, BLOCK]`` store.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.triton_common import Launch


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Composition of ``x -> a1 x + b1`` then ``x -> a2 x + b2`` (the combine of the chunk recurrence's scan)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _chunk_pass_kernel(
    states, gl, s_edge,
    NT,
    V: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr,
    HAS_EDGE: tl.constexpr, REVERSE: tl.constexpr,
):
    """The recurrence over chunks, in place on ``states [B * H, NT + 1, K * V]`` (fp32), row k of chunk c decayed by
    ``exp(gl[i_bh, c, k])``; ``s_edge [B * H, K * V]``. Forward: slot 0 <- ``s_edge`` (or zeros), then for c = 0 ..
    NT - 1 slot c + 1 <- ``exp(A_L) * slot c + slot c + 1``. Backward (``REVERSE``): slot NT <- ``s_edge`` (or zeros),
    then for c = NT - 1 .. 0 slot c <- ``exp(A_L) * slot c + 1 + slot c``. Grid ``(cdiv(K * V, BLOCK), B * H)``:
    program ``(i_s, i_bh)`` carries state entries ``[i_s * BLOCK, (i_s + 1) * BLOCK)`` through all chunks, ``G``
    chunks per step (one ``[G, BLOCK]`` load, an associative scan of the affine maps, one store)."""
    i_s, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_s = i_s * BLOCK + tl.arange(0, BLOCK)
    o_g = tl.arange(0, G)
    m_s = o_s < KV
    K = KV // V
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


def chunk_pass(states: torch.Tensor, gl: torch.Tensor, edge: torch.Tensor | None, reverse: bool, tiles: ChunkParallelTiles) -> None:
    """Run :func:`_chunk_pass_kernel` in place on ``states [B * H, NT + 1, K, V]`` with log decays ``gl [B * H, NT,
    K]``; ``edge`` is the initial state (forward) or the final state's gradient (``reverse``), None: zeros."""
    BH, K, V = states.shape[0], states.shape[2], states.shape[3]
    _chunk_pass_kernel[(triton.cdiv(K * V, tiles.BLOCK), BH)](
        states, gl, states if edge is None else edge, states.shape[1] - 1,
        V=V, KV=K * V, BLOCK=tiles.BLOCK, G=tiles.G, HAS_EDGE=edge is not None, REVERSE=reverse, **tiles.pass_launch._asdict(),
    )


def chunk_dims(tiles, T: int, H: int, K: int, V: int, precision: str) -> tuple[int, int, dict]:
    """``(NT, NV, keyword arguments)`` of the per-chunk kernels (grid ``(NT, NV, B * H)``) of a chunk-parallel op:
    its shapes, its ``tiles`` (BT, BK, BV and launch options) and the ``tl.dot`` precision."""
    NT, NV = triton.cdiv(T, tiles.BT), triton.cdiv(V, tiles.BV)
    return NT, NV, dict(H=H, K=K, V=V, BT=tiles.BT, BK=tiles.BK, BV=tiles.BV, PRECISION=precision, **tiles.launch._asdict())
