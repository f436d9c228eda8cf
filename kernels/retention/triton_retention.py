"""Triton retention (Sun et al. 2023), forward and backward (same maths as ``naive.py``): two designs.

Fused recurrent (Eq. (6)), ``form="recurrent"``: one program per (V block, sequence, head) keeps its state slice
``S [K, BV]`` in registers and walks the sequence (a batch row, or one of the packed documents of ``cu_seqlens`` in a
single launch), ``S_t = gamma_h S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. The
forward pass saves the state every ``chunk_size`` tokens; the backward pass walks those chunks in reverse,
recomputes each chunk's states from its checkpoint into a per-program scratch buffer (no division by gamma) and
runs the reverse-time recurrence with ``G_t = dS_t + q_t^T do_t``:

    dq_t = S_t do_t     dk_t = G_t v_t     dv_t = k_t G_t     dS_{t-1} = gamma G_t
    d log_gamma = sum_t gamma * sum(G_t * S_{t-1})

Chunked (Eq. (7)), ``form="chunk"``: the same program walks chunks of ``BT`` tokens; inside a chunk
``O = (Q K^T * D) V + (Q * xi) S_prev`` with ``tl.dot`` and the causal decay mask ``D``, and the state advances by
``S = gamma^n S_prev + (K * zeta)^T V``. Its backward pass is one reverse sweep over chunks carrying ``dS``; the
gradient of ``log gamma`` uses, per chunk of n steps, ``n <dS_end, S_end> + sum_s (s + 1)(q_s . dq_s - k_s . dk_s)``.

Everything accumulates in fp32; K-sized gradients are per-V-block partial sums added up in PyTorch. The products of
bf16 / fp16 inputs alone (``Q K^T``, ``dO V^T``) take their operands in the input dtype on GPUs
(:func:`~zoo.kernels.triton_common.operand_dtype`), every other one fp32 operands at
:func:`~zoo.kernels.triton_common.dot_precision`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.retention import BACKENDS, FORMS, check_retention_inputs
from zoo.kernels.triton_common import (
    Launch, Target, check_triton_call, dot_dtype, dot_precision, launch_target, operand_dtype, recurrent_bwd,
    recurrent_fwd, scan_function, sequence_span, state_block, state_or_zeros, varlen_in_one_launch,
)


@triton.jit
def _retention_fwd_kernel(
    q, k, v, g, s0, o, ckpt, s_final, cu,
    T, NC,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    HAS_S0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid ``(cdiv(V, BV), N * H)``, N sequences: program ``(i_v, i_nh)`` walks sequence ``i_nh // H``, head ``i_nh %
    H``, with state columns ``[i_v * BV, (i_v + 1) * BV)``. The sequences: the B rows of T tokens, or with
    ``IS_VARLEN`` the documents ``[cu[i], cu[i + 1])`` of one packed row of T tokens (``cu`` their int boundaries;
    states ``[N, H, K, V]``, NC checkpoint slots for the longest)."""
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    b_gamma = tl.exp(tl.load(g + i_h).to(tl.float32))
    b_s = state_or_zeros(s0 + p_state, m_kv, HAS_S0, BK, BV)
    p_ckpt = state_block(ckpt, i_nh, i_v, NC, BK, BV)  # checkpoints [N * H * NV, NC, BK, BV]
    bos, L, N_C = sequence_span(cu, i_n, T, NC, CH, IS_VARLEN)
    for c in range(N_C):
        tl.store(p_ckpt + c * BK * BV, b_s)
        for t in range(c * CH, tl.minimum(c * CH + CH, L)):
            p_tk = ((bos + t) * H + i_h) * K + o_k
            p_tv = ((bos + t) * H + i_h) * V + o_v
            b_q = tl.load(q + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_s = b_s * b_gamma + b_k[:, None] * b_v[None, :]
            tl.store(o + p_tv, tl.sum(b_q[:, None] * b_s, axis=0), mask=m_v)
    tl.store(s_final + p_state, b_s, mask=m_kv)


@triton.jit
def _retention_bwd_kernel(
    q, k, v, g, do, ds_final, ckpt, scratch,
    dq, dk, dv, dg, ds0, cu,
    T, NC, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    HAS_DS_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid ``(cdiv(V, BV), N * H)``, the forward's (``B`` = N): program ``(i_v, i_nh)`` walks its checkpoints in
    reverse."""
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    b_gamma = tl.exp(tl.load(g + i_h).to(tl.float32))
    b_ds = state_or_zeros(ds_final + p_state, m_kv, HAS_DS_FINAL, BK, BV)
    b_dg = tl.zeros([BK, BV], dtype=tl.float32)
    p_ckpt = state_block(ckpt, i_nh, i_v, NC, BK, BV)
    p_scr = state_block(scratch, i_nh, i_v, CH, BK, BV)  # [CH, BK, BV] states entering each step
    bos, L, N_C = sequence_span(cu, i_n, T, NC, CH, IS_VARLEN)
    p_part = i_v * (1 if IS_VARLEN else B) * T * H * K  # K-sized gradients: [NV, B (packed: 1), T, H, K] partial sums
    for i_c in range(N_C):
        c = N_C - 1 - i_c
        t0 = c * CH
        n = tl.minimum(CH, L - t0)
        b_s = tl.load(p_ckpt + c * BK * BV)
        for j in range(n):
            tl.store(p_scr + j * BK * BV, b_s)
            p_tk = ((bos + t0 + j) * H + i_h) * K + o_k
            p_tv = ((bos + t0 + j) * H + i_h) * V + o_v
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_s = b_s * b_gamma + b_k[:, None] * b_v[None, :]
        tl.debug_barrier()
        for i_j in range(n):
            t = t0 + n - 1 - i_j
            b_sp = tl.load(p_scr + (n - 1 - i_j) * BK * BV)
            p_tk = ((bos + t) * H + i_h) * K + o_k
            p_tv = ((bos + t) * H + i_h) * V + o_v
            b_q = tl.load(q + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_do = tl.load(do + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_st = b_sp * b_gamma + b_k[:, None] * b_v[None, :]
            b_g = b_ds + b_q[:, None] * b_do[None, :]
            tl.store(dq + p_part + p_tk, tl.sum(b_st * b_do[None, :], axis=1), mask=m_k)
            tl.store(dk + p_part + p_tk, tl.sum(b_g * b_v[None, :], axis=1), mask=m_k)
            tl.store(dv + p_tv, tl.sum(b_k[:, None] * b_g, axis=0), mask=m_v)
            b_dg += b_g * b_sp
            b_ds = b_g * b_gamma
        tl.debug_barrier()
    tl.store(ds0 + p_state, b_ds, mask=m_kv)
    tl.store(dg + i_v * B * H + i_nh, b_gamma * tl.sum(tl.sum(b_dg, axis=1), axis=0))


@triton.jit
def _retention_chunk_fwd_kernel(
    q, k, v, g, s0, o, ckpt, s_final,
    T, NC,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_S0: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr,
):
    """Grid ``(cdiv(V, BV), B * H)``: program ``(i_v, i_bh)`` walks the ``cdiv(T, BT)`` chunks with state
    columns ``[i_v * BV, (i_v + 1) * BV)`` of batch ``i_bh // H``, head ``i_bh % H``."""
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    b_g = tl.load(g + i_h).to(tl.float32)
    b_s = state_or_zeros(s0 + p_state, m_kv, HAS_S0, BK, BV)
    p_ckpt = state_block(ckpt, i_bh, i_v, NC, BK, BV)  # chunk-start states [B * H * NV, NC, BK, BV]
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    # D[i, j] = gamma^(i - j) for i >= j, else 0 (the exponent is masked before exp)
    b_D = tl.where(diff >= 0, tl.exp(tl.where(diff >= 0, diff, 0.0) * b_g), 0.0)
    for c in range(NC):
        t0 = c * BT
        n = tl.minimum(BT, T - t0)
        m_t = o_t < n
        p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
        p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
        b_q = tl.load(q + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_k = tl.load(k + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        tl.store(p_ckpt + c * BK * BV, b_s)
        b_in = tl.exp((o_t + 1).to(tl.float32) * b_g)  # decay from the chunk start through position i
        b_out = tl.where(m_t, tl.exp(tl.where(m_t, n - 1 - o_t, 0).to(tl.float32) * b_g), 0.0)  # from position j to the chunk end
        b_A = tl.dot(b_q.to(OPERAND), tl.trans(b_k.to(OPERAND)), input_precision=PRECISION) * b_D
        b_o = tl.dot(b_A, b_v, input_precision=PRECISION)
        if BK > 64:  # the contraction over K in halves, a batched product: half the operand registers per warp
            b_qi = tl.permute(tl.reshape(b_q * b_in[:, None], [BT, 2, BK // 2]), [1, 0, 2])
            b_o += tl.sum(tl.dot(b_qi, tl.reshape(b_s, [2, BK // 2, BV]), input_precision=PRECISION), axis=0)
        else:
            b_o += tl.dot(b_q * b_in[:, None], b_s, input_precision=PRECISION)
        tl.store(o + p_tv, b_o, mask=m_t[:, None] & m_v[None, :])
        b_s = b_s * tl.exp(n.to(tl.float32) * b_g) + tl.dot(tl.trans(b_k * b_out[:, None]), b_v, input_precision=PRECISION)
    tl.store(s_final + p_state, b_s, mask=m_kv)


@triton.jit
def _retention_chunk_bwd_kernel(
    q, k, v, g, do, ds_final, ckpt,
    dq, dk, dv, dg, ds0,
    T, NC, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DS_FINAL: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr,
):
    """Grid ``(cdiv(V, BV), B * H)``, the forward's: program ``(i_v, i_bh)`` walks the chunks in reverse."""
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    b_g = tl.load(g + i_h).to(tl.float32)
    b_ds = state_or_zeros(ds_final + p_state, m_kv, HAS_DS_FINAL, BK, BV)
    b_dg = tl.zeros([BT], dtype=tl.float32)
    p_ckpt = state_block(ckpt, i_bh, i_v, NC, BK, BV)
    p_part = i_v * B * T * H * K  # K-sized gradients: [NV, B, T, H, K] partial sums
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    b_D = tl.where(diff >= 0, tl.exp(tl.where(diff >= 0, diff, 0.0) * b_g), 0.0)
    for i_c in range(NC):
        c = NC - 1 - i_c
        t0 = c * BT
        n = tl.minimum(BT, T - t0)
        m_t = o_t < n
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
        p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_s = tl.load(p_ckpt + c * BK * BV)  # state entering the chunk
        b_in = tl.exp((o_t + 1).to(tl.float32) * b_g)
        b_out = tl.where(m_t, tl.exp(tl.where(m_t, n - 1 - o_t, 0).to(tl.float32) * b_g), 0.0)
        b_chunk_decay = tl.exp(n.to(tl.float32) * b_g)
        b_A = tl.dot(b_q.to(OPERAND), tl.trans(b_k.to(OPERAND)), input_precision=PRECISION) * b_D  # [BT(i), BT(j)]
        b_dA = tl.dot(b_do.to(OPERAND), tl.trans(b_v.to(OPERAND)), input_precision=PRECISION) * b_D
        # dq and dk transposed, [BK, BT]: the M dimension of the products is then BK, split over the warps
        b_dq = tl.dot(tl.trans(b_k), tl.trans(b_dA), input_precision=PRECISION)
        b_dq += tl.dot(b_s, tl.trans(b_do * b_in[:, None]), input_precision=PRECISION)
        tl.store(dq + p_part + tl.trans(p_tk), b_dq, mask=tl.trans(m_tk))
        b_dk = tl.dot(tl.trans(b_q), b_dA, input_precision=PRECISION)
        b_dk += tl.dot(b_ds, tl.trans(b_v * b_out[:, None]), input_precision=PRECISION)
        tl.store(dk + p_part + tl.trans(p_tk), b_dk, mask=tl.trans(m_tk))
        if BK > 64:  # the contraction over K in halves, a batched product: half the operand registers per warp
            b_ko = tl.permute(tl.reshape(b_k * b_out[:, None], [BT, 2, BK // 2]), [1, 0, 2])
            b_dv_state = tl.sum(tl.dot(b_ko, tl.reshape(b_ds, [2, BK // 2, BV]), input_precision=PRECISION), axis=0)
        else:
            b_dv_state = tl.dot(b_k * b_out[:, None], b_ds, input_precision=PRECISION)  # [BT, BV]
        tl.store(dv + p_tv, tl.dot(tl.trans(b_A), b_do, input_precision=PRECISION) + b_dv_state, mask=m_tv)
        # <dS_end, S_end> = gamma^n <dS_end, S> + <(K * zeta) dS_end, V>: S_end without a product of its own
        b_dot_end = b_chunk_decay * tl.sum(tl.sum(b_ds * b_s, axis=1), axis=0) + tl.sum(tl.sum(b_dv_state * b_v, axis=1), axis=0)
        # d log gamma over the chunk's steps: n <dS_end, S_end> + sum_s (s + 1)(q_s . dq_s - k_s . dk_s)
        b_dg += (o_t + 1).to(tl.float32) * tl.sum(tl.trans(b_q) * b_dq - tl.trans(b_k) * b_dk, axis=0)
        b_dg += tl.where(o_t == 0, n.to(tl.float32) * b_dot_end, 0.0)
        b_ds = b_ds * b_chunk_decay + tl.dot(tl.trans(b_q * b_in[:, None]), b_do, input_precision=PRECISION)
    tl.store(ds0 + p_state, b_ds, mask=m_kv)
    tl.store(dg + i_v * B * H + i_bh, tl.sum(b_dg, axis=0))


def retention_fwd(q, k, v, log_decay, initial_state, chunk_size: int, cu_seqlens=None):
    """Launch the fused-recurrent forward kernel on contiguous inputs (packed documents: ``cu_seqlens``, a
    ``CuSeqlens``). Returns ``(o, final_state, checkpoints)`` in fp32."""
    return recurrent_fwd(_retention_fwd_kernel, [q, k, v, log_decay], v.shape[-1], initial_state, chunk_size, cu_seqlens)


def retention_bwd(q, k, v, log_decay, do, ds_final, ckpt, chunk_size: int, cu_seqlens=None):
    """Launch the fused-recurrent backward kernel. Returns fp32 ``(dq, dk, dv, d_log_decay, d_initial_state)``."""
    return recurrent_bwd(_retention_bwd_kernel, [q, k, v, log_decay], do, ds_final, ckpt, chunk_size, "kkvg", cu_seqlens)


class ChunkTiles(NamedTuple):
    """Launch parameters of the chunked kernels: forward and backward share BT, BK and BV (the chunk-start states are
    ``[BK, BV]`` blocks of BT-token chunks) and their launch options."""

    BT: int
    BK: int
    BV: int
    launch: Launch


# The largest tiles whose chunked kernels compile without register spills on sm_80, sm_86, sm_89 and sm_90
# (benchmarks/kernel_resources.py, K = 64 / 128), keyed by (fp32 inputs, K <= 64); the same on every target.
CHUNK_TILES = {  # key: (largest BT, largest BV, warps)
    (False, True): (16, 16, 4),
    (True, True): (16, 32, 8),
    (False, False): (16, 16, 8),
    (True, False): (16, 16, 8),
}


def chunk_tiles(K: int, V: int, chunk_size: int, dtype: torch.dtype, target: Target) -> ChunkTiles:
    """BT: ``chunk_size`` as a power of two in [16, largest BT] (16 today); BK holds all of K; ``tl.dot`` needs every
    dimension >= 16; no software pipelining (a second stage spills in most cases). At these tiles the backward takes
    248-255 registers with bf16 inputs and 174-255 with fp32 ones, no spills; one step larger it spills (B / thread,
    sm_80 / 86 / 89 / 90): bf16 at K = 64 BV = 32 176 / 104 / 104 / 16, BT = 32 72 / 120 / 120 / 448; bf16 at K = 128
    BV = 32 32 / 0 / 0 / 40; fp32 at K = 64 BT = 32 (BV = 32) 24 / 8 / 8 / 72, BV = 64 8 / 0 / 0 / 24; fp32 at K = 128
    BV = 32 48 / 16 / 16 / 72. The same tiles on every target and in the interpreter."""
    BK = max(triton.next_power_of_2(K), 16)
    max_bt, max_bv, warps = CHUNK_TILES[dtype == torch.float32, BK <= 64]
    BT = min(max(triton.next_power_of_2(chunk_size), 16), max_bt)
    BV = max(min(triton.next_power_of_2(V), max_bv), 16)
    return ChunkTiles(BT, BK, BV, Launch(num_warps=warps, num_stages=1))


def retention_chunk_fwd(q, k, v, log_decay, initial_state, chunk_size: int):
    """Launch the chunked forward kernel. Returns ``(o, final_state, chunk_start_states)``: ``o`` in v's dtype (so
    the backward gets ``do`` in it too), the states in fp32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = dot_dtype(q, k, v)
    target = launch_target(q.device)
    tiles = chunk_tiles(K, V, chunk_size, dtype, target)
    BT, BK, BV, NV = tiles.BT, tiles.BK, tiles.BV, triton.cdiv(V, tiles.BV)
    NC = triton.cdiv(T, BT)
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    s_final = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    ckpt = torch.empty(B * H * NV, NC, BK, BV, dtype=torch.float32, device=q.device)
    has_s0 = initial_state is not None
    _retention_chunk_fwd_kernel[(NV, B * H)](
        q, k, v, log_decay, initial_state if has_s0 else s_final, o, ckpt, s_final,
        T, NC, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_S0=has_s0, PRECISION=dot_precision(dtype, target),
        OPERAND=operand_dtype(dtype, target), **tiles.launch._asdict(),
    )
    return o.to(v.dtype), s_final, ckpt


def retention_chunk_bwd(q, k, v, log_decay, do, ds_final, ckpt, chunk_size: int):
    """Launch the chunked backward kernel: the forward's tiles and precision (of q, k, v); 16-bit ``tl.dot`` operands
    only when ``do`` has their dtype too. Returns fp32 ``(dq, dk, dv, d_log_decay, d_initial_state)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = dot_dtype(q, k, v)
    target = launch_target(q.device)
    tiles = chunk_tiles(K, V, chunk_size, dtype, target)
    BT, BK, BV, NV = tiles.BT, tiles.BK, tiles.BV, triton.cdiv(V, tiles.BV)
    NC = ckpt.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk = (torch.empty(NV, B, T, H, K, **f32) for _ in range(2))
    dv = torch.empty(B, T, H, V, **f32)
    dg = torch.empty(NV, B, H, **f32)
    ds0 = torch.empty(B, H, K, V, **f32)
    has_ds = ds_final is not None
    _retention_chunk_bwd_kernel[(NV, B * H)](
        q, k, v, log_decay, do, ds_final if has_ds else ds0, ckpt,
        dq, dk, dv, dg, ds0,
        T, NC, B, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_DS_FINAL=has_ds, PRECISION=dot_precision(dtype, target),
        OPERAND=operand_dtype(dot_dtype(q, k, v, do), target), **tiles.launch._asdict(),
    )
    return dq.sum(0), dk.sum(0), dv, dg.sum((0, 1)), ds0


def _state_elements(q, k, v, *_):
    return q.shape[0] * q.shape[2] * q.shape[3] * v.shape[-1]


RecurrentFunction = scan_function(retention_fwd, retention_bwd, n_config=2, layout="tttp", state_elements=_state_elements)
ChunkFunction = scan_function(retention_chunk_fwd, retention_chunk_bwd, layout="tttp",
                              state_elements=lambda q, k, v, *_: q.shape[0] * q.shape[2] * q.shape[3] * v.shape[-1])


def _run(op: str, function, q, k, v, log_decay, initial_state, chunk_size: int):
    K = check_retention_inputs(op, q, k, v, log_decay, initial_state, chunk_size)
    check_triton_call(op, _retention_fwd_kernel, q, k, v, log_decay, initial_state, head_dim=K,
                      batch_heads=q.shape[0] * q.shape[2])
    o, final = function.apply(q, k, v, log_decay, initial_state, chunk_size)
    return o.to(v.dtype), final


def retention_triton_recurrent(q, k, v, log_decay, initial_state=None, form: str = "recurrent", chunk_size: int = 64,
                               cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.retention.retention` (fp32 / bf16 / fp16 inputs): the fused-recurrent
    kernels whatever ``form``; ``chunk_size`` = tokens between the states saved for the backward pass. Packed
    documents (``cu_seqlens``, a ``CuSeqlens``): one launch over all of them when
    :func:`~zoo.kernels.triton_common.varlen_in_one_launch`, else one call per document."""
    args = (q, k, v, log_decay, initial_state, form, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    K = check_retention_inputs("retention_triton", *one[:5], chunk_size)
    if cu_seqlens is not None and not varlen_in_one_launch(cu_seqlens, _state_elements(q, k, v), chunk_size, q.shape[2]):
        return BACKENDS.per_document(retention_triton_recurrent, args, cu_seqlens)
    n = q.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    check_triton_call("retention_triton", _retention_fwd_kernel, q, k, v, log_decay, initial_state, head_dim=K,
                      batch_heads=n * q.shape[2])
    o, final = RecurrentFunction.apply(q, k, v, log_decay, initial_state, chunk_size, cu_seqlens)
    return o.to(v.dtype), final


def retention_triton_chunk_serial(q, k, v, log_decay, initial_state=None, form: str = "chunk", chunk_size: int = 64):
    """Same contract as :func:`zoo.kernels.retention.retention` (fp32 / bf16 / fp16 inputs): the chunked kernels
    whatever ``form``, chunks of 16 tokens whatever ``chunk_size`` (the largest that compiles without register spills:
    :func:`chunk_tiles`)."""
    return _run("retention_triton", ChunkFunction, q, k, v, log_decay, initial_state, chunk_size)


def retention_triton(q, k, v, log_decay, initial_state=None, form: str = "chunk", chunk_size: int = 64):
    """:func:`retention_triton_recurrent` for ``form="recurrent"``, else :func:`retention_triton_chunk_serial`."""
    if form not in FORMS:
        raise ValueError(f"retention_triton: unknown form '{form}'; choose one of {', '.join(FORMS)}")
    run = retention_triton_recurrent if form == "recurrent" else retention_triton_chunk_serial
    return run(q, k, v, log_decay, initial_state, form, chunk_size)
