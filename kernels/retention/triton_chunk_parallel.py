"""Chunk-parallel Triton retention (Sun et al. 2023, Eq. (7)), forward and backward, same maths as ``naive.py``.

The sequence is cut into ``NT = cdiv(T, BT)`` chunks; with ``n_c`` real tokens in chunk c, ``xi_i = gamma^(i+1)``
(chunk start through token i) and ``zeta_j = gamma^(n_c-1-j)`` (token j to the chunk end, 0 on padding)::

    h_c     = (K_c * zeta)^T V_c                                    # [K, V], chunk c's own contribution
    S_{c+1} = gamma^(n_c) S_c + h_c,   S_0 = initial state         # state entering chunk c + 1
    O_c     = (Q_c K_c^T * D) V_c + (Q_c * xi) S_c,   D_ij = gamma^(i-j) [i >= j]

Forward: three launches, the mamba-ssm / fla split. (1) :func:`_retention_cp_chunk_state_kernel` computes every
``h_c`` at once, grid ``(NT, cdiv(V, BV), B * H)``; (2) the state pass shared with RWKV-6
(:mod:`zoo.kernels.chunk_pass`, the decay ``gamma^(n_c)`` given as ``n_c log gamma`` on every row) runs the
recurrence over chunks, sequential in c but parallel over the ``K * V`` state entries; (3) :func:`_retention_cp_output_kernel` computes every ``O_c``, grid ``(NT, cdiv(V, BV), B * H)``. The states
``S_0 .. S_NT`` live in one fp32 buffer ``[B * H, NT + 1, K, V]`` (h_c is written to slot c + 1 and replaced in place
by ``S_{c+1}``), kept for the backward pass. Backward: the mirror. ``dh_c = (Q_c * xi)^T dO_c`` for every chunk,
then ``dS_c = gamma^(n_c) dS_{c+1} + dh_c`` from ``dS_NT`` (the final state's gradient) down to ``dS_0`` (the initial
state's), then per chunk, with ``dA = dO_c V_c^T * D``::

    dQ_c = dA K_c + (dO_c S_c^T) * xi        dK_c = dA^T Q_c + (V_c dS_{c+1}^T) * zeta
    dV_c = (Q_c K_c^T * D)^T dO_c + (K_c * zeta) dS_{c+1}
    d log gamma = sum_c [ n_c <dS_{c+1}, S_{c+1}> + sum_i (i + 1)(q_i . dq_i - k_i . dk_i) ]

Parallelism at B = 1, T = 16k, H = 16, K = V = 64 (an H100 has 132 SMs; 4 programs per SM is 528): the per-chunk
launches have ``NT * cdiv(V, BV) * B * H = 512 * 4 * 16 = 32768`` programs (bf16 on an H100: BT = 32, BV = 16;
BT = 16, BV = 32 elsewhere, as many); the state passes have ``cdiv(64 * 64, 64) * 16 = 1024`` programs (BLOCK = 64).
Every product is a ``tl.dot`` with fp32 accumulation: those of bf16 / fp16 inputs alone (``Q K^T``, ``dO V^T``) take
their operands in the input dtype on GPUs (:func:`~zoo.kernels.triton_common.operand_dtype`), every other one fp32
operands (``ieee`` for fp32 inputs, ``tf32x3`` for bf16 / fp16 ones on NVIDIA:
:func:`~zoo.kernels.triton_common.dot_precision`); every decay is ``exp`` of a non-positive number.

Packed documents (``cu_seqlens`` over ``B = 1``, fla's convention): each document's chunks start at its own first
token (document n has ``NT_n = cdiv(len_n, BT)`` chunks), the same six launches over all of them. The per-chunk
kernels run grid ``(sum NT_n, cdiv(V, BV), H)``, each program reading (document, chunk) from a host-built table
(:func:`~zoo.kernels.chunk_pass.chunk_index`, :func:`~zoo.kernels.triton_common.chunk_span`, ``IS_VARLEN``); the
state passes ``(cdiv(K * V, BLOCK), N * H)``, one document x head each, from its initial state; the states buffer
holds ``NT_n + 1`` slots per document and head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.chunk_pass import (
    ChunkIndex, ChunkParallelTiles, chunk_dims, chunk_pass, chunk_states, chunk_varlen_in_one_launch,
)
from zoo.kernels.retention import BACKENDS, check_retention_inputs
from zoo.kernels.triton_common import (
    Launch, Target, check_triton_call, chunk_span, dot_dtype, dot_precision, launch_target, operand_dtype, scan_function,
)


@triton.jit
def _retention_cp_chunk_state_kernel(
    k, v, g, states, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``h_c = (K_c * zeta)^T V_c`` into slot ``c + 1`` of ``states [B * H, NT + 1, K, V]``. k: [B, T, H, K];
    v: [B, T, H, V]; g: [H]. Grid ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` writes rows ``[0, K)``
    and columns ``[i_v * BV, (i_v + 1) * BV)`` of ``h_c``."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    n = tl.minimum(BT, T_end - t0)
    m_t = o_t < n
    b_g = tl.load(g + i_h).to(tl.float32)
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_k = tl.load(k + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_zeta = tl.where(m_t, tl.exp(tl.where(m_t, n - 1 - o_t, 0).to(tl.float32) * b_g), 0.0)
    b_h = tl.dot(tl.trans(b_k * b_zeta[:, None]), b_v, input_precision=PRECISION)  # [BK, BV]
    p_h = states + (i_bh * (S_NT + 1) + S_t + 1) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_h, b_h, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _retention_cp_output_kernel(
    q, k, v, g, states, o, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, OPERAND: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``O_c = (Q_c K_c^T * D) V_c + (Q_c * xi) S_c`` with ``S_c`` from slot c of ``states``. q, k: [B, T, H, K];
    v, o: [B, T, H, V]. Grid ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` writes the chunk's columns
    ``[i_v * BV, (i_v + 1) * BV)``."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    n = tl.minimum(BT, T_end - t0)
    m_t = o_t < n
    b_g = tl.load(g + i_h).to(tl.float32)
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_q = tl.load(q + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    p_s = states + (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV], S_c
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    b_D = tl.where(diff >= 0, tl.exp(tl.where(diff >= 0, diff, 0.0) * b_g), 0.0)  # the exponent is masked before exp
    b_xi = tl.exp((o_t + 1).to(tl.float32) * b_g)
    b_A = tl.dot(b_q.to(OPERAND), tl.trans(b_k.to(OPERAND)), input_precision=PRECISION) * b_D  # [BT, BT]
    b_o = tl.dot(b_A, b_v, input_precision=PRECISION)
    b_o += tl.dot(b_q * b_xi[:, None], b_s, input_precision=PRECISION)
    tl.store(o + p_tv, b_o, mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _retention_cp_dstate_kernel(
    q, do, g, dstates, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``dh_c = (Q_c * xi)^T dO_c`` into slot c of ``dstates [B * H, NT + 1, K, V]``. q: [B, T, H, K]; do: [B, T, H, V].
    Grid ``(NT, cdiv(V, BV), B * H)``, as :func:`_retention_cp_chunk_state_kernel`."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    m_t = o_t < T_end - t0
    b_g = tl.load(g + i_h).to(tl.float32)
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_q = tl.load(q + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_do = tl.load(do + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_xi = tl.exp((o_t + 1).to(tl.float32) * b_g)
    b_dh = tl.dot(tl.trans(b_q * b_xi[:, None]), b_do, input_precision=PRECISION)  # [BK, BV]
    p_dh = dstates + (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_dh, b_dh, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _retention_cp_grad_kernel(
    q, k, v, g, do, states, dstates,
    dq, dk, dv, dg, chunk_indices, cu,
    T, NT, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, OPERAND: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """dQ_c, dK_c, dV_c and chunk c's share of ``d log gamma`` from ``S_c``, ``S_{c+1}`` (``states``) and ``dS_{c+1}``
    (``dstates``). dq, dk: ``[NV, B, T, H, K]`` partial sums over the V blocks; dv: [B, T, H, V]; dg:
    ``[NV, B * H, NT]``. Grid ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` uses value columns
    ``[i_v * BV, (i_v + 1) * BV)``."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    n = tl.minimum(BT, T_end - t0)
    m_t = o_t < n
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_g = tl.load(g + i_h).to(tl.float32)
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    p_slot = (i_bh * (S_NT + 1) + S_t) * K * V + o_kv
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    b_zeta = tl.where(m_t, tl.exp(tl.where(m_t, n - 1 - o_t, 0).to(tl.float32) * b_g), 0.0)
    b_ds_end = tl.load(dstates + p_slot + K * V, mask=m_kv, other=0.0)  # dS_{c+1}
    p_part = i_v * B * T * H * K
    # one gradient after the other, each stored once computed: fewer tiles live at a time. dA^T and A^T are products of
    # their own, not tl.trans of a dot result: a transposed wgmma accumulator fed to another dot is what
    # Triton 3.4 <= v < 3.7.1 miscompiles on Hopper (fla-org/flash-linear-attention#640)
    b_Dt = tl.where(diff <= 0, tl.exp(tl.where(diff <= 0, -diff, 0.0) * b_g), 0.0)  # D transposed, [BT(j), BT(i)]
    b_At = tl.dot(b_k.to(OPERAND), tl.trans(b_q.to(OPERAND)), input_precision=PRECISION) * b_Dt  # [BT(j), BT(i)]
    b_dv = tl.dot(b_At, b_do, input_precision=PRECISION)
    b_dv += tl.dot(b_k * b_zeta[:, None], b_ds_end, input_precision=PRECISION)
    tl.store(dv + p_tv, b_dv, mask=m_tv)
    b_dAt = tl.dot(b_v.to(OPERAND), tl.trans(b_do.to(OPERAND)), input_precision=PRECISION) * b_Dt  # [BT(j), BT(i)]
    b_dk = tl.dot(b_dAt, b_q, input_precision=PRECISION)
    b_dk += tl.dot(b_v, tl.trans(b_ds_end), input_precision=PRECISION) * b_zeta[:, None]
    tl.store(dk + p_part + p_tk, b_dk, mask=m_tk)
    b_dg = -tl.sum(tl.sum(b_k * b_dk, axis=1) * (o_t + 1).to(tl.float32), axis=0)
    b_s_end = tl.load(states + p_slot + K * V, mask=m_kv, other=0.0)  # S_{c+1}
    b_dg += n.to(tl.float32) * tl.sum(tl.sum(b_ds_end * b_s_end, axis=1), axis=0)
    b_D = tl.where(diff >= 0, tl.exp(tl.where(diff >= 0, diff, 0.0) * b_g), 0.0)  # [BT(i), BT(j)]
    b_dA = tl.dot(b_do.to(OPERAND), tl.trans(b_v.to(OPERAND)), input_precision=PRECISION) * b_D  # [BT(i), BT(j)]
    b_dq = tl.dot(b_dA, b_k, input_precision=PRECISION)
    b_s = tl.load(states + p_slot, mask=m_kv, other=0.0)  # S_c
    b_xi = tl.exp((o_t + 1).to(tl.float32) * b_g)
    b_dq += tl.dot(b_do, tl.trans(b_s), input_precision=PRECISION) * b_xi[:, None]
    tl.store(dq + p_part + p_tk, b_dq, mask=m_tk)
    b_dg += tl.sum(tl.sum(b_q * b_dq, axis=1) * (o_t + 1).to(tl.float32), axis=0)
    tl.store(dg + (i_v * B * H + i_bh) * NT + i_t, b_dg)


# The largest (BT, BV) whose kernels compile without register spills (benchmarks/kernel_resources.py, K = 64 / 128),
# keyed by (sm_90, fp32 inputs, K <= 64); BV is 16 at K = 256 whatever the key.
CP_TILES = {
    (True, False, True): (32, 16), (True, True, True): (32, 32), (True, False, False): (16, 32),
    (True, True, False): (16, 32), (False, False, True): (16, 32), (False, True, True): (32, 32),
    (False, False, False): (16, 32), (False, True, False): (16, 32),
}


def chunk_parallel_tiles(K: int, V: int, chunk_size: int, dtype: torch.dtype, target: Target) -> ChunkParallelTiles:
    """BT: ``chunk_size`` as a power of two in [16, largest BT of :data:`CP_TILES`]; BK holds all of K; BV: at most
    the key's, 16 at K = 256 (at 32 the bf16 gradient kernel spills 536 B / thread instead of 208-216); ``tl.dot``
    needs every dimension >= 16; 8 warps, no software pipelining. The gradient kernel spills first (B / thread): with
    bf16 inputs at K = 64, BT = 32 with BV = 32 spills 8 / 24 / 24 / 48 on sm_80 / 86 / 89 / 90 and BT = 64 (BV = 32)
    384 on sm_90, BT = 32 with BV = 16 none there (254 registers); at K = 128 BT = 32 spills 424-448 (bf16) and
    32 / 0 / 0 / 104 (fp32); fp32 at K = 64 BT = 64 spills 296-344. BLOCK = 64 state entries per pass program (B = 1,
    H = 16, K = V = 64: 1024 programs), G = 16 chunks per pass step, 2 warps. Every target but sm_90 (and the
    interpreter) gets the sm_80 / 86 / 89 rows."""
    BK = max(triton.next_power_of_2(K), 16)
    max_bt, max_bv = CP_TILES[target.arch == 90, dtype == torch.float32, BK <= 64]
    BT = min(max(triton.next_power_of_2(chunk_size), 16), max_bt)
    BV = max(min(triton.next_power_of_2(V), max_bv if BK <= 128 else 16), 16)
    launch = Launch(num_warps=8, num_stages=1)
    return ChunkParallelTiles(BT, BK, BV, 64, 16, launch, launch, Launch(num_warps=2, num_stages=1))


def chunk_log_decays(log_decay, B: int, T: int, K: int, BT: int, index: ChunkIndex | None = None) -> torch.Tensor:
    """The log decay of every chunk and state row for :func:`~zoo.kernels.chunk_pass.chunk_pass`: ``n_c log gamma_h``
    (``n_c`` tokens in chunk c) broadcast over the K rows, fp32 ``[B * H, NT, K]``; packed documents (``index``):
    ``[H * NT, K]`` in its per-chunk row order, computed on the device from its table (no sync)."""
    if index is None:
        n = (T - BT * torch.arange(triton.cdiv(T, BT), device=log_decay.device)).clamp(max=BT).float()  # [NT]
        gl = n[None, :] * log_decay.float()[:, None]  # [H, NT]
        return gl[None, :, :, None].expand(B, -1, -1, K).contiguous().view(B * log_decay.shape[0], -1, K)  # [B * H, NT, K]
    H, NT = index.H, index.NT
    chunks = index.indices.view(NT, 2).long()
    doc, c = chunks[:, 0], chunks[:, 1]  # [NT]
    offsets, cu = index.offsets.long(), index.cu.long()
    n = (cu[doc + 1] - cu[doc] - BT * c).clamp(max=BT).float()  # tokens in each chunk
    C = torch.arange(NT, device=doc.device) - c  # chunks before each chunk's document
    rows = H * C[:, None] + torch.arange(H, device=doc.device)[None, :] * (offsets[doc + 1] - offsets[doc])[:, None] + c[:, None]
    gl = torch.empty(H * NT, **dict(dtype=torch.float32, device=log_decay.device))
    gl[rows.flatten()] = (n[:, None] * log_decay.float()[None, :]).flatten()  # [NT, H] -> per-chunk rows
    return gl[:, None].expand(-1, K).contiguous()  # [H * NT, K]


def retention_cp_fwd(q, k, v, log_decay, initial_state, chunk_size: int, cu_seqlens=None):
    """Launch the three forward kernels on contiguous inputs. Returns ``(o, final_state, states, table)``: ``o`` in
    v's dtype (so the backward gets ``do`` in it too); fp32 ``states [B * H, NT + 1, K, V]`` holding ``S_0 ..
    S_NT``. Packed documents (``cu_seqlens``, a :class:`~zoo.kernels.backends.CuSeqlens` over ``B = 1``): every
    document's chunks from its own start (:func:`~zoo.kernels.chunk_pass.chunk_index`), states ``[H * (NT + N), K,
    V]``, per-chunk grids ``(NT, NV, H)`` over all documents' NT chunks, final states ``[N, H, K, V]``; ``table``
    the index's device table (None without documents), which the backward reuses."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = dot_dtype(q, k, v)
    target = launch_target(q.device)
    tiles = chunk_parallel_tiles(K, V, chunk_size, dtype, target)
    NT, NV, dims = chunk_dims(tiles, T, H, K, V, dot_precision(dtype, target))
    buf = chunk_states(cu_seqlens, tiles.BT, B, H, K, V, NT, NV, q.device)
    states, index, NT, grid = buf
    varlen, flag = buf.varlen
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    _retention_cp_chunk_state_kernel[grid](k, v, log_decay, states, *varlen, T, NT, **dims, **flag)
    chunk_pass(states, chunk_log_decays(log_decay, B, T, K, tiles.BT, index), initial_state, False, tiles, index)
    _retention_cp_output_kernel[grid](
        q, k, v, log_decay, states, o, *varlen, T, NT, OPERAND=operand_dtype(dtype, target), **dims, **flag,
    )
    final = buf.edge(True, B, H, K, V)
    final = final.clone() if index is None else final  # a slot's view, or already gathered
    return o.to(v.dtype), final, states, None if index is None else index.table


def retention_cp_bwd(q, k, v, log_decay, do, ds_final, states, table, chunk_size: int, cu_seqlens=None):
    """Launch the three backward kernels: the forward's tiles and precision (of q, k, v); 16-bit ``tl.dot`` operands
    only when ``do`` has their dtype too. Returns fp32 ``(dq, dk, dv, d_log_decay, d_initial_state)`` (packed
    documents: ``d_initial_state [N, H, K, V]``, the forward's ``table`` reused)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = dot_dtype(q, k, v)
    target = launch_target(q.device)
    tiles = chunk_parallel_tiles(K, V, chunk_size, dtype, target)
    NT, NV, dims = chunk_dims(tiles, T, H, K, V, dot_precision(dtype, target))
    buf = chunk_states(cu_seqlens, tiles.BT, B, H, K, V, NT, NV, q.device, table)
    dstates, index, NT, grid = buf
    varlen, flag = buf.varlen
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk = (torch.empty(NV, B, T, H, K, **f32) for _ in range(2))
    dv = torch.empty(B, T, H, V, **f32)
    dg = torch.empty(NV, B * H, NT, **f32)  # packed: [NV, H, NT] (B = 1, NT over all documents)
    _retention_cp_dstate_kernel[grid](q, do, log_decay, dstates, *varlen, T, NT, **dims, **flag)
    chunk_pass(dstates, chunk_log_decays(log_decay, B, T, K, tiles.BT, index), ds_final, True, tiles, index)
    _retention_cp_grad_kernel[grid](
        q, k, v, log_decay, do, states, dstates, dq, dk, dv, dg, *varlen, T, NT, B,
        OPERAND=operand_dtype(dot_dtype(q, k, v, do), target), **{**dims, **tiles.grad_launch._asdict()}, **flag,
    )
    ds0 = buf.edge(False, B, H, K, V)
    d_log_decay = dg.view(NV, B, H, NT).sum((0, 1, 3))  # [NV, B * H, NT] -> [H]
    return dq.sum(0), dk.sum(0), dv, d_log_decay, ds0


def _state_elements(q, k, v, *_):
    return q.shape[0] * q.shape[2] * q.shape[3] * v.shape[-1]


RetentionChunkParallelFunction = scan_function(retention_cp_fwd, retention_cp_bwd, n_config=2, layout="tttp",
                                               state_elements=_state_elements)


def retention_chunk_parallel(q, k, v, log_decay, initial_state=None, form: str = "chunk", chunk_size: int = 64,
                             cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.retention.retention` (fp32 / bf16 / fp16 inputs): the chunk-parallel
    kernels of this module whatever ``form``; ``chunk_size`` is rounded to a power of two in [16, 32] (16 for some dtypes,
    head dims and GPUs): :func:`chunk_parallel_tiles`. Packed documents (``cu_seqlens``, a ``CuSeqlens``): one
    launch sequence over all of them (each document's chunks from its own start) when
    :func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch`, else one call per document."""
    args = (q, k, v, log_decay, initial_state, form, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    K = check_retention_inputs("retention_chunk_parallel", *one[:5], chunk_size)
    if cu_seqlens is not None:
        BT = chunk_parallel_tiles(K, v.shape[-1], chunk_size, dot_dtype(q, k, v), launch_target(q.device)).BT
        if not chunk_varlen_in_one_launch(cu_seqlens, _state_elements(q, k, v), BT, q.shape[2]):
            return BACKENDS.per_document(retention_chunk_parallel, args, cu_seqlens)
    n = q.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    check_triton_call("retention_chunk_parallel", _retention_cp_output_kernel, q, k, v, log_decay, initial_state, head_dim=K,
                      batch_heads=n * q.shape[2])
    return RetentionChunkParallelFunction.apply(q, k, v, log_decay, initial_state, chunk_size, cu_seqlens)
