"""Triton fused-recurrent generalized delta rule, forward and backward (same maths as ``naive.py``).

One program per (V block, sequence, head) keeps its state slice ``S [K, BV]`` in registers (columns of S evolve
independently, so V can be split) and walks the sequence (a batch row, or one of the packed documents of
``cu_seqlens`` in a single launch), with ``sa_t = a_t S_{t-1}`` [V]:

    S_t = diag(exp(w_log_t)) S_{t-1} + b_t^T sa_t + k_t^T v_t,      o_t = r_t S_t

The forward pass saves the state every ``chunk_size`` tokens. The backward pass walks the chunks in reverse,
recomputes each chunk's states from its checkpoint into a per-program scratch buffer (the update is not
invertible), then runs the reverse-time recurrence with ``G_t = dS_t + r_t^T do_t``, ``dsa_t = b_t G_t``:

    dr_t = S_t do_t      dk_t = G_t v_t      dv_t = k_t G_t      db_t = G_t sa_t      da_t = S_{t-1} dsa_t
    dw_log_t = exp(w_log_t) * rowsum(G_t * S_{t-1}),       dS_{t-1} = diag(exp(w_log_t)) G_t + a_t^T dsa_t

Everything accumulates in fp32; K-sized gradients are per-V-block partial sums added up in PyTorch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from zoo.kernels.checks import check_head_inputs
from zoo.kernels.dplr_delta_rule import BACKENDS, dplr_delta_rule_keys
from zoo.kernels.triton_common import (
    check_triton_call, recurrent_bwd, recurrent_fwd, scan_function, sequence_span, state_block, state_or_zeros,
    varlen_in_one_launch,
)


@triton.jit
def _dplr_fwd_kernel(
    r, w, k, v, a, b, s0, o, ckpt, s_final, cu,
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
    b_s = state_or_zeros(s0 + p_state, m_kv, HAS_S0, BK, BV)
    p_ckpt = state_block(ckpt, i_nh, i_v, NC, BK, BV)  # checkpoints [N * H * NV, NC, BK, BV]
    bos, L, N_C = sequence_span(cu, i_n, T, NC, CH, IS_VARLEN)
    for c in range(N_C):
        tl.store(p_ckpt + c * BK * BV, b_s)
        for t in range(c * CH, tl.minimum(c * CH + CH, L)):
            p_tk = ((bos + t) * H + i_h) * K + o_k
            p_tv = ((bos + t) * H + i_h) * V + o_v
            b_r = tl.load(r + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_w = tl.load(w + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_a = tl.load(a + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_b = tl.load(b + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_sa = tl.sum(b_a[:, None] * b_s, axis=0)
            b_s = b_s * tl.exp(b_w)[:, None] + b_b[:, None] * b_sa[None, :] + b_k[:, None] * b_v[None, :]
            tl.store(o + p_tv, tl.sum(b_r[:, None] * b_s, axis=0), mask=m_v)
    tl.store(s_final + p_state, b_s, mask=m_kv)


@triton.jit
def _dplr_bwd_kernel(
    r, w, k, v, a, b, do, ds_final, ckpt, scratch,
    dr, dw, dk, dv, da, db, ds0, cu,
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
    b_ds = state_or_zeros(ds_final + p_state, m_kv, HAS_DS_FINAL, BK, BV)
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
            b_w = tl.load(w + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_a = tl.load(a + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_b = tl.load(b + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_sa = tl.sum(b_a[:, None] * b_s, axis=0)
            b_s = b_s * tl.exp(b_w)[:, None] + b_b[:, None] * b_sa[None, :] + b_k[:, None] * b_v[None, :]
        tl.debug_barrier()
        for i_j in range(n):
            t = t0 + n - 1 - i_j
            b_sp = tl.load(p_scr + (n - 1 - i_j) * BK * BV)
            p_tk = ((bos + t) * H + i_h) * K + o_k
            p_tv = ((bos + t) * H + i_h) * V + o_v
            b_r = tl.load(r + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_w = tl.load(w + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_a = tl.load(a + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_b = tl.load(b + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_do = tl.load(do + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_decay = tl.exp(b_w)
            b_sa = tl.sum(b_a[:, None] * b_sp, axis=0)
            b_st = b_sp * b_decay[:, None] + b_b[:, None] * b_sa[None, :] + b_k[:, None] * b_v[None, :]
            b_g = b_ds + b_r[:, None] * b_do[None, :]
            b_dsa = tl.sum(b_b[:, None] * b_g, axis=0)
            tl.store(dr + p_part + p_tk, tl.sum(b_st * b_do[None, :], axis=1), mask=m_k)
            tl.store(dk + p_part + p_tk, tl.sum(b_g * b_v[None, :], axis=1), mask=m_k)
            tl.store(dw + p_part + p_tk, b_decay * tl.sum(b_g * b_sp, axis=1), mask=m_k)
            tl.store(db + p_part + p_tk, tl.sum(b_g * b_sa[None, :], axis=1), mask=m_k)
            tl.store(da + p_part + p_tk, tl.sum(b_sp * b_dsa[None, :], axis=1), mask=m_k)
            tl.store(dv + p_tv, tl.sum(b_k[:, None] * b_g, axis=0), mask=m_v)
            b_ds = b_g * b_decay[:, None] + b_a[:, None] * b_dsa[None, :]
        tl.debug_barrier()
    tl.store(ds0 + p_state, b_ds, mask=m_kv)


def dplr_fwd(r, w_log, k, v, a, b, initial_state, chunk_size: int, cu_seqlens=None):
    """Launch the forward kernel on contiguous inputs (packed documents: ``cu_seqlens``, a ``CuSeqlens``). Returns
    ``(o, final_state, checkpoints)`` in fp32."""
    return recurrent_fwd(_dplr_fwd_kernel, [r, w_log, k, v, a, b], v.shape[-1], initial_state, chunk_size, cu_seqlens)


def dplr_bwd(r, w_log, k, v, a, b, do, ds_final, ckpt, chunk_size: int, cu_seqlens=None):
    """Launch the backward kernel. Returns fp32 ``(dr, dw_log, dk, dv, da, db, d_initial_state)``."""
    return recurrent_bwd(_dplr_bwd_kernel, [r, w_log, k, v, a, b], do, ds_final, ckpt, chunk_size, "kkkvkk", cu_seqlens)


def _state_elements(r, w, k, v, *_):
    return r.shape[0] * r.shape[2] * r.shape[3] * v.shape[-1]


DPLRFunction = scan_function(dplr_fwd, dplr_bwd, n_config=2, layout="tttttt", state_elements=_state_elements)


def dplr_delta_rule_triton(r, w_log, k, v, a, b, initial_state=None, chunk_size: int = 16, cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.dplr_delta_rule.dplr_delta_rule` (fp32 / bf16 / fp16 inputs, fp32 outputs); ``chunk_size`` is
    the number of tokens between the states saved for the backward pass. Packed documents (``cu_seqlens``, a
    ``CuSeqlens``): one launch over all of them when :func:`~zoo.kernels.triton_common.varlen_in_one_launch`, else
    one call per document."""
    args = (r, w_log, k, v, a, b, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    K = check_head_inputs("dplr_delta_rule_triton", dplr_delta_rule_keys(r, w_log, k, a, b), v, one[6], chunk_size)[3]
    if cu_seqlens is not None and not varlen_in_one_launch(cu_seqlens, _state_elements(r, w_log, k, v), chunk_size, r.shape[2]):
        return BACKENDS.per_document(dplr_delta_rule_triton, args, cu_seqlens)
    n = r.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    check_triton_call("dplr_delta_rule_triton", _dplr_fwd_kernel, r, w_log, k, v, a, b, initial_state, head_dim=K,
                      batch_heads=n * r.shape[2])
    return DPLRFunction.apply(*args, cu_seqlens)
