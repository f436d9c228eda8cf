"""Chunk-parallel Triton RWKV-6 WKV, forward and backward (same maths as ``naive.py`` and ``chunked.py``).

The sequence is cut into ``NT = cdiv(T, BT)`` chunks. Inside a chunk, per channel, ``A_t = sum_{j<=t} w_log_j``
(inclusive), ``A'_t = A_t - w_log_t`` (exclusive) and ``A_L`` = the chunk's total (padding has ``w_log = 0``)::

    a_ti    = sum_k r_tk k_ik exp(A'_tk - A_ik)   (i < t)           b_t = r_t . (u * k_t)
    O_c     = a V_c + (R_c * exp(A')) S_c + b * V_c
    h_c     = (K_c * exp(A_L - A))^T V_c,   S_{c+1} = exp(A_L) * S_c + h_c   (exp(A_L) scales the K rows)

Numerically safe in log space: the intra-chunk weights ``a`` are built one key token i at a time from the exact
per-channel differences ``A'_t - A_i = sum_{i<j<t} w_log_j <= 0`` (the exponent is masked before ``exp``), so no
factor ``exp(-A)`` is ever formed and decays near 0 (``w_log`` -> -inf) or bf16 inputs cannot overflow; this costs
``BT * BT * K`` exps per chunk, on CUDA cores. The products with V, S and dS are ``tl.dot`` with fp32 accumulation.

Forward: (1) :func:`_rwkv6_cp_chunk_state_kernel` writes every ``h_c`` (slot c + 1 of the fp32 state buffer
``[B * H, NT + 1, K, V]``) and ``A_L`` (``[B * H, NT, K]``), grid ``(NT, cdiv(V, BV), B * H)``; (2)
the state pass (:mod:`zoo.kernels.chunk_pass`, shared with retention) runs the recurrence over chunks in place,
parallel over the ``K * V`` state entries; (3) :func:`_rwkv6_cp_output_kernel`, grid ``(NT, cdiv(V, BV), B * H)``.
Backward: ``dh_c = (R_c * exp(A'))^T dO_c`` (:func:`_rwkv6_cp_dstate_kernel`), the reverse pass
``dS_c = exp(A_L) * dS_{c+1} + dh_c``, then per chunk (:func:`_rwkv6_cp_grad_kernel`, the channels in slices), with
``da = dO V^T`` (i < t) and ``db_t = dO_t . v_t``::

    dR  = dR~ + db * u * K,   dR~_t = sum_{i<t} da_ti k_i exp(A'_t - A_i) + exp(A'_t) * (S_c dO_t)
    dK  = dK~ + db * u * R,   dK~_i = sum_{t>i} da_ti r_t exp(A'_t - A_i) + exp(A_L - A_i) * (dS_{c+1} v_i)
    dV  = a^T dO + b * dO + (K * exp(A_L - A)) dS_{c+1},   du = sum_t db_t r_t * k_t
    dw_log_j = sum_{t>j} r_t * dR~_t - sum_{t>=j} k_t * dK~_t + rowsum(dS_{c+1} * S_{c+1})

Parallelism at B = 1, T = 16k, H = 16, K = V = 64 (an H100 has 132 SMs; 4 programs per SM is 528): the per-chunk
launches have ``NT * cdiv(V, BV) * B * H = 1024 * 2 * 16 = 32768`` programs (BT = 16, BV = 32); the
state passes ``cdiv(64 * 64, 64) * 16 = 1024`` (BLOCK = 64). K-sized gradients are per-V-block partial sums added
up in PyTorch.

Packed documents (``cu_seqlens`` over ``B = 1``, fla's convention): each document's chunks start at its own first
token, the same six launches over all of them: per-chunk grids ``(sum NT_n, cdiv(V, BV), H)`` reading (document,
chunk) from a host-built table (:func:`~zoo.kernels.chunk_pass.chunk_index`,
:func:`~zoo.kernels.triton_common.chunk_span`, ``IS_VARLEN``), state passes ``(cdiv(K * V, BLOCK), N * H)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.chunk_pass import (
    ChunkParallelTiles, chunk_dims, chunk_pass, chunk_states, chunk_varlen_in_one_launch,
)
from zoo.kernels.rwkv6 import BACKENDS, check_rwkv6_inputs
from zoo.kernels.triton_common import (Launch, Target, check_triton_call, chunk_span, dot_dtype, dot_precision, launch_target,
                                      operand_dtype, scan_function)


@triton.jit
def _rwkv6_cp_chunk_state_kernel(
    k, v, w, states, gl, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``h_c = (K_c * exp(A_L - A))^T V_c`` into slot c + 1 of ``states [B * H, NT + 1, K, V]``; ``A_L`` into
    ``gl [B * H, NT, K]`` (by the ``i_v = 0`` programs). k, w: [B, T, H, K]; v: [B, T, H, V]. Grid
    ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` writes columns ``[i_v * BV, (i_v + 1) * BV)``."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    m_t = o_t < T_end - t0
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    m_tk = m_t[:, None] & m_k[None, :]
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_A = tl.cumsum(b_w, axis=0)  # [BT, BK] inclusive
    b_AL = tl.sum(b_w, axis=0)  # [BK]
    b_h = tl.dot(tl.trans(b_k * tl.exp(b_AL[None, :] - b_A)), b_v, input_precision=PRECISION)  # [BK, BV]
    p_h = states + (i_bh * (S_NT + 1) + S_t + 1) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_h, b_h, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(gl + (i_bh * G_NT + G_t) * K + o_k, b_AL, mask=m_k)


@triton.jit
def _rwkv6_cp_output_kernel(
    r, k, v, w, u, states, o, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``O_c = a V_c + (R_c * exp(A')) S_c + b * V_c`` with ``S_c`` from slot c of ``states``. r, k, w: [B, T, H, K];
    v, o: [B, T, H, V]; u: [H, K]. Grid ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` writes the chunk's
    columns ``[i_v * BV, (i_v + 1) * BV)``."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    m_t = o_t < T_end - t0
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_r = tl.load(r + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_s = tl.load(states + (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV], S_c
    b_A = tl.cumsum(b_w, axis=0)
    b_Ae = b_A - b_w
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):  # key token j: column j of a, from exact per-channel log differences
        b_kj = tl.sum(tl.where(o_t[:, None] == j, b_k, 0.0), axis=0)  # [BK], row j
        b_Aj = tl.sum(tl.where(o_t[:, None] == j, b_A, 0.0), axis=0)
        m_after = o_t > j
        b_e = tl.exp(tl.where(m_after[:, None], b_Ae - b_Aj[None, :], 0.0))  # [BT, BK], <= 1 where used
        b_col = tl.where(m_after, tl.sum(b_r * b_kj[None, :] * b_e, axis=1), 0.0)
        b_a += tl.where(o_t[None, :] == j, b_col[:, None], 0.0)
    b_b = tl.sum(b_r * b_u[None, :] * b_k, axis=1)  # [BT]
    b_o = tl.dot(b_a, b_v, input_precision=PRECISION)
    b_o += tl.dot(b_r * tl.exp(b_Ae), b_s, input_precision=PRECISION)
    b_o += b_b[:, None] * b_v
    tl.store(o + p_tv, b_o, mask=m_tv)


@triton.jit
def _rwkv6_cp_dstate_kernel(
    r, w, do, dstates, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``dh_c = (R_c * exp(A'))^T dO_c`` into slot c of ``dstates [B * H, NT + 1, K, V]``. r, w: [B, T, H, K];
    do: [B, T, H, V]. Grid ``(NT, cdiv(V, BV), B * H)``, as :func:`_rwkv6_cp_chunk_state_kernel`."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    m_t = o_t < T_end - t0
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_r = tl.load(r + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_Ae = tl.cumsum(b_w, axis=0) - b_w
    b_dh = tl.dot(tl.trans(b_r * tl.exp(b_Ae)), b_do, input_precision=PRECISION)  # [BK, BV]
    p_dh = dstates + (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_dh, b_dh, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _rwkv6_cp_grad_kernel(
    r, k, v, w, u, do, states, dstates,
    dr, dk, dv, dw, du, chunk_indices, cu,
    T, NT, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KG: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """dR_c, dK_c, dV_c, dw_log_c and chunk c's share of du from ``S_c``, ``S_{c+1}`` (``states``) and ``dS_{c+1}``
    (``dstates``). dr, dk, dw: ``[NV, B, T, H, K]`` partial sums over the V blocks; dv: [B, T, H, V]; du:
    ``[NV, B * H, NT, K]``. Grid ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` uses value columns
    ``[i_v * BV, (i_v + 1) * BV)`` and walks the channels in ``KG``-wide slices (given ``da``, a channel's dR, dK and
    dw_log involve only that channel; ``a``, ``b`` and dV sum over the slices). ``da = dO V^T`` takes its operands as
    ``OPERAND`` (both loaded from the inputs: exact in their 16-bit dtype)."""
    i_t, i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    t0 = i_t * BT
    t0, T_end, S_NT, S_t, G_NT, G_t = chunk_span(chunk_indices, cu, i_t, t0, T, NT, H, BT, IS_VARLEN)
    m_t = o_t < T_end - t0
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_da = tl.dot(b_do.to(OPERAND), tl.trans(b_v.to(OPERAND)), input_precision=PRECISION)  # [BT(t), BT(i)], i < t
    b_db = tl.sum(b_do * b_v, axis=1)  # [BT], this V block's share
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    b_b = tl.zeros([BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    p_part = i_v * B * T * H * K
    for k0 in range(0, BK, KG):
        o_k = k0 + tl.arange(0, KG)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, KG]
        b_r = tl.load(r + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_A = tl.cumsum(b_w, axis=0)
        b_Ae = b_A - b_w
        b_AL = tl.sum(b_w, axis=0)
        b_dr = tl.zeros([BT, KG], dtype=tl.float32)
        b_dk = tl.zeros([BT, KG], dtype=tl.float32)
        for j in range(BT):
            sel_row = o_t[:, None] == j
            p_j = ((i_b * T + t0 + j) * H + i_h) * K + o_k  # [KG], row j (re-read from cache, not extracted)
            m_j = m_k & (t0 + j + tl.zeros_like(o_k) < T_end)
            b_kj = tl.load(k + p_j, mask=m_j, other=0.0).to(tl.float32)
            b_rj = tl.load(r + p_j, mask=m_j, other=0.0).to(tl.float32)
            b_Aj = tl.sum(tl.where(sel_row, b_A, 0.0), axis=0)
            b_Aej = b_Aj - tl.load(w + p_j, mask=m_j, other=0.0).to(tl.float32)
            # pairs (t > j, i = j): column j of a (this slice's share), dR~ rows t
            m_after = o_t > j
            b_e = tl.exp(tl.where(m_after[:, None], b_Ae - b_Aj[None, :], 0.0))
            b_col = tl.where(m_after, tl.sum(b_r * b_kj[None, :] * b_e, axis=1), 0.0)
            b_a += tl.where(o_t[None, :] == j, b_col[:, None], 0.0)
            b_da_col = tl.where(m_after, tl.sum(tl.where(o_t[None, :] == j, b_da, 0.0), axis=1), 0.0)  # da[t, j]
            b_dr += b_da_col[:, None] * b_kj[None, :] * b_e
            # pairs (t = j, i < j): dK~ rows i
            m_before = o_t < j
            b_e = tl.exp(tl.where(m_before[:, None], b_Aej[None, :] - b_A, 0.0))
            b_da_row = tl.where(m_before, tl.sum(tl.where(sel_row, b_da, 0.0), axis=0), 0.0)  # da[j, i]
            b_dk += b_da_row[:, None] * b_rj[None, :] * b_e
        # the [KG, BV] state slices are loaded after the loop (fewer registers live in it)
        p_slot = (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :]  # [KG, BV]
        b_s = tl.load(states + p_slot, mask=m_kv, other=0.0)  # S_c
        b_dr += tl.dot(b_do, tl.trans(b_s), input_precision=PRECISION) * tl.exp(b_Ae)
        b_ds_end = tl.load(dstates + p_slot + K * V, mask=m_kv, other=0.0)  # dS_{c+1}
        b_decay_end = tl.exp(b_AL[None, :] - b_A)  # [BT, KG]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)  # re-read: no operand copies live across slices
        b_dk += tl.dot(b_v, tl.trans(b_ds_end), input_precision=PRECISION) * b_decay_end
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_dv += tl.dot(b_k * b_decay_end, b_ds_end, input_precision=PRECISION)
        b_z = tl.sum(b_ds_end * tl.load(states + p_slot + K * V, mask=m_kv, other=0.0), axis=1)  # rowsum(dS_{c+1} S_{c+1})
        b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_b += tl.sum(b_r * b_u[None, :] * b_k, axis=1)
        # dw_log: reverse exclusive cumsum of r * dR~ minus reverse inclusive cumsum of k * dK~, plus b_z
        b_x = b_r * b_dr
        b_y = b_k * b_dk
        b_dw = tl.sum(b_x, axis=0)[None, :] - tl.cumsum(b_x, axis=0)
        b_dw -= tl.sum(b_y, axis=0)[None, :] - tl.cumsum(b_y, axis=0) + b_y
        b_dw += b_z[None, :]
        tl.store(dr + p_part + p_tk, b_dr + b_db[:, None] * b_u[None, :] * b_k, mask=m_tk)
        tl.store(dk + p_part + p_tk, b_dk + b_db[:, None] * b_u[None, :] * b_r, mask=m_tk)
        tl.store(dw + p_part + p_tk, b_dw, mask=m_tk)
        tl.store(du + ((i_v * B * H + i_bh) * NT + i_t) * K + o_k, tl.sum(b_db[:, None] * b_r * b_k, axis=0), mask=m_k)
    b_dv += tl.dot(tl.trans(b_a), b_do, input_precision=PRECISION) + b_b[:, None] * b_do
    tl.store(dv + p_tv, b_dv, mask=m_tv)


def chunk_parallel_tiles(K: int, V: int, chunk_size: int, dtype: torch.dtype, target: Target) -> ChunkParallelTiles:
    """BT = 16 whatever ``chunk_size`` (the smallest ``tl.dot`` dimension; at BT = 32 the gradient kernel spills 48 to
    496 bytes per thread on sm_80 / 86 / 90 at K = 64, and the intra-chunk weights cost ``BT * BT * K`` exps per
    chunk); BK holds all of K; BV: at most 32; 4 warps (8 for the gradient kernel), no software pipelining. The
    gradient kernel takes the channels in KG-wide slices: all of K up to 64, else KG = 32 (all of K = 128 at once
    spilled 48 to 112 bytes per thread with bf16 inputs, KG = 64 still 8 to 40). No spills on sm_80 / 86 / 89 / 90 at
    K = 64 and 128, nor in the gradient kernel at K = 256 (benchmarks/kernel_resources.py). BLOCK = 64 state entries per pass
    program, G = 16 chunks per pass step, 2 warps. The same on every target and input dtype."""
    BK = max(triton.next_power_of_2(K), 16)
    BT = 16
    BV = max(min(triton.next_power_of_2(V), 32), 16)
    return ChunkParallelTiles(BT, BK, BV, 64, 16, Launch(4, 1), Launch(8, 1), Launch(2, 1), KG=BK if BK <= 64 else 32)


def rwkv6_cp_fwd(r, k, v, w, u, initial_state, chunk_size: int, cu_seqlens=None):
    """Launch the three forward kernels on contiguous inputs. Returns fp32 ``(o, final_state, states, gl, table)``.
    Packed documents (``cu_seqlens``, a :class:`~zoo.kernels.backends.CuSeqlens` over ``B = 1``): every document's
    chunks from its own start (:func:`~zoo.kernels.chunk_pass.chunk_index`), states ``[H * (NT + N), K, V]``, decay
    totals ``[H * NT, K]``, per-chunk grids ``(NT, NV, H)`` over all documents' NT chunks, final states ``[N, H, K,
    V]``; ``table`` the index's device table (None without documents), which the backward reuses."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    target = launch_target(r.device)
    tiles = chunk_parallel_tiles(K, V, chunk_size, r.dtype, target)
    NT, NV, dims = chunk_dims(tiles, T, H, K, V, dot_precision(dot_dtype(r, k, v), target))
    buf = chunk_states(cu_seqlens, tiles.BT, B, H, K, V, NT, NV, r.device)
    states, index, NT, grid = buf
    varlen, flag = buf.varlen
    f32 = dict(dtype=torch.float32, device=r.device)
    gl = torch.empty(B * H, NT, K, **f32) if index is None else torch.empty(H * NT, K, **f32)  # packed: NT of all documents
    o = torch.empty(B, T, H, V, **f32)
    _rwkv6_cp_chunk_state_kernel[grid](k, v, w, states, gl, *varlen, T, NT, **dims, **flag)
    chunk_pass(states, gl, initial_state, False, tiles, index)
    _rwkv6_cp_output_kernel[grid](r, k, v, w, u, states, o, *varlen, T, NT, **dims, **flag)
    final = buf.edge(True, B, H, K, V)
    final = final.clone() if index is None else final  # a slot's view, or already gathered
    return o, final, states, gl, None if index is None else index.table


def rwkv6_cp_bwd(r, k, v, w, u, do, ds_final, states, gl, table, chunk_size: int, cu_seqlens=None):
    """Launch the three backward kernels. Returns fp32 ``(dr, dk, dv, dw, du, d_initial_state)`` (packed documents:
    ``d_initial_state [N, H, K, V]``, the forward's ``table`` reused)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    target = launch_target(r.device)
    tiles = chunk_parallel_tiles(K, V, chunk_size, r.dtype, target)
    NT, NV, dims = chunk_dims(tiles, T, H, K, V, dot_precision(dot_dtype(r, k, v), target))
    buf = chunk_states(cu_seqlens, tiles.BT, B, H, K, V, NT, NV, r.device, table)
    dstates, index, NT, grid = buf
    varlen, flag = buf.varlen
    f32 = dict(dtype=torch.float32, device=r.device)
    dr, dk, dw = (torch.empty(NV, B, T, H, K, **f32) for _ in range(3))
    dv = torch.empty(B, T, H, V, **f32)
    du = torch.empty(NV, B * H, NT, K, **f32)  # packed: [NV, H, NT, K] (B = 1, NT over all documents)
    _rwkv6_cp_dstate_kernel[grid](r, w, do, dstates, *varlen, T, NT, **dims, **flag)
    chunk_pass(dstates, gl, ds_final, True, tiles, index)
    _rwkv6_cp_grad_kernel[grid](
        r, k, v, w, u, do, states, dstates, dr, dk, dv, dw, du, *varlen, T, NT, B,
        KG=tiles.KG, OPERAND=operand_dtype(dot_dtype(r, k, v, do), target), **{**dims, **tiles.grad_launch._asdict()}, **flag,
    )
    ds0 = buf.edge(False, B, H, K, V)
    du = du.view(NV, B, H, NT, K).sum((0, 1, 3))  # [NV, B * H, NT, K] -> [H, K]
    return dr.sum(0), dk.sum(0), dv, dw.sum(0), du, ds0


def _state_elements(r, k, v, *_):
    return r.shape[0] * r.shape[2] * r.shape[3] * v.shape[-1]


RWKV6ChunkParallelFunction = scan_function(rwkv6_cp_fwd, rwkv6_cp_bwd, n_config=2, layout="ttttp",
                                           state_elements=_state_elements)


def rwkv6_chunk_parallel(r, k, v, w_log, u, initial_state=None, chunk_size: int = 16, cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.rwkv6.rwkv6` (fp32 / bf16 / fp16 inputs, fp32 outputs): the chunk-parallel
    kernels of this module. Chunks are 16 tokens whatever ``chunk_size`` (checked, unused): :func:`chunk_parallel_tiles`.
    Packed documents (``cu_seqlens``, a ``CuSeqlens``): one launch sequence over all of them (each document's chunks
    from its own start) when :func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch`, else one call per document."""
    args = (r, k, v, w_log, u, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    K = check_rwkv6_inputs("rwkv6_chunk_parallel", *one)[3]
    if cu_seqlens is not None:
        BT = chunk_parallel_tiles(K, v.shape[-1], chunk_size, r.dtype, launch_target(r.device)).BT
        if not chunk_varlen_in_one_launch(cu_seqlens, _state_elements(r, k, v), BT, r.shape[2]):
            return BACKENDS.per_document(rwkv6_chunk_parallel, args, cu_seqlens)
    n = r.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    check_triton_call("rwkv6_chunk_parallel", _rwkv6_cp_output_kernel, r, k, v, w_log, u, initial_state, head_dim=K,
                      batch_heads=n * r.shape[2])
    return RWKV6ChunkParallelFunction.apply(*args, cu_seqlens)
