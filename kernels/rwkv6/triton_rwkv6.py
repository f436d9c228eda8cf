"""Triton fused-recurrent RWKV-6 WKV, forward and backward (same maths as ``naive.py``).

One program per (V block, sequence, head) keeps its state slice ``S [K, BV]`` in registers and walks the sequence
(a batch row, or one of the packed documents of ``cu_seqlens`` in a single launch):

    o_t = r_t S_{t-1} + (r_t . (u * k_t)) v_t,      S_t = diag(exp(w_log_t)) S_{t-1} + k_t^T v_t

The forward pass saves the state every ``chunk_size`` tokens. The backward pass walks the chunks in reverse: it
recomputes the chunk's states from its checkpoint into a per-program scratch buffer, then runs the reverse-time
recurrence ``dS_{t-1} = diag(exp(w_log_t)) dS_t + r_t^T do_t`` with

    dr_t = S_{t-1} do_t + (u * k_t)(v_t . do_t)     dk_t = dS_t v_t + (r_t * u)(v_t . do_t)
    dv_t = k_t dS_t + (r_t . (u * k_t)) do_t        dw_log_t = exp(w_log_t) * rowsum(dS_t * S_{t-1})
    du   = sum_t r_t * k_t (v_t . do_t)

No step divides by a decay, so decays near 0 are safe. Everything accumulates in fp32; K-sized gradients are
per-V-block partial sums added up in PyTorch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from zoo.kernels.rwkv6 import BACKENDS, check_rwkv6_inputs
from zoo.kernels.triton_common import (
    check_triton_call, recurrent_bwd, recurrent_fwd, scan_function, sequence_span, state_block, state_or_zeros,
    varlen_in_one_launch,
)


@triton.jit
def _rwkv6_fwd_kernel(
    r, k, v, w, u, s0, o, ckpt, s_final, cu,
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
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_s = state_or_zeros(s0 + p_state, m_kv, HAS_S0, BK, BV)
    p_ckpt = state_block(ckpt, i_nh, i_v, NC, BK, BV)  # checkpoints [N * H * NV, NC, BK, BV]
    bos, L, N_C = sequence_span(cu, i_n, T, NC, CH, IS_VARLEN)
    for c in range(N_C):
        tl.store(p_ckpt + c * BK * BV, b_s)
        for t in range(c * CH, tl.minimum(c * CH + CH, L)):
            p_tk = ((bos + t) * H + i_h) * K + o_k
            p_tv = ((bos + t) * H + i_h) * V + o_v
            b_r = tl.load(r + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_w = tl.load(w + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_kv = b_k[:, None] * b_v[None, :]
            b_o = tl.sum((b_s + b_u[:, None] * b_kv) * b_r[:, None], axis=0)
            tl.store(o + p_tv, b_o, mask=m_v)
            b_s = b_s * tl.exp(b_w)[:, None] + b_kv
    tl.store(s_final + p_state, b_s, mask=m_kv)


@triton.jit
def _rwkv6_bwd_kernel(
    r, k, v, w, u, do, ds_final, ckpt, scratch,
    dr, dk, dv, dw, du, ds0, cu,
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
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_ds = state_or_zeros(ds_final + p_state, m_kv, HAS_DS_FINAL, BK, BV)
    b_du = tl.zeros([BK], dtype=tl.float32)
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
            b_w = tl.load(w + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_s = b_s * tl.exp(b_w)[:, None] + b_k[:, None] * b_v[None, :]
        tl.debug_barrier()
        for i_j in range(n):
            t = t0 + n - 1 - i_j
            b_sp = tl.load(p_scr + (n - 1 - i_j) * BK * BV)
            p_tk = ((bos + t) * H + i_h) * K + o_k
            p_tv = ((bos + t) * H + i_h) * V + o_v
            b_r = tl.load(r + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_w = tl.load(w + p_tk, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_do = tl.load(do + p_tv, mask=m_v, other=0.0).to(tl.float32)
            b_dov = tl.sum(b_v * b_do)
            b_decay = tl.exp(b_w)
            b_dr = tl.sum(b_sp * b_do[None, :], axis=1) + b_u * b_k * b_dov
            b_dk = tl.sum(b_ds * b_v[None, :], axis=1) + b_r * b_u * b_dov
            b_dv = tl.sum(b_k[:, None] * b_ds, axis=0) + tl.sum(b_r * b_u * b_k) * b_do
            b_dw = b_decay * tl.sum(b_ds * b_sp, axis=1)
            b_du += b_r * b_k * b_dov
            tl.store(dr + p_part + p_tk, b_dr, mask=m_k)
            tl.store(dk + p_part + p_tk, b_dk, mask=m_k)
            tl.store(dw + p_part + p_tk, b_dw, mask=m_k)
            tl.store(dv + p_tv, b_dv, mask=m_v)
            b_ds = b_ds * b_decay[:, None] + b_r[:, None] * b_do[None, :]
        tl.debug_barrier()
    tl.store(ds0 + p_state, b_ds, mask=m_kv)
    tl.store(du + (i_v * B * H + i_nh) * K + o_k, b_du, mask=m_k)


def rwkv6_fwd(r, k, v, w_log, u, initial_state, chunk_size: int, cu_seqlens=None):
    """Launch the forward kernel on contiguous inputs (packed documents: ``cu_seqlens``, a ``CuSeqlens``). Returns
    ``(o, final_state, checkpoints)`` in fp32."""
    return recurrent_fwd(_rwkv6_fwd_kernel, [r, k, v, w_log, u], v.shape[-1], initial_state, chunk_size, cu_seqlens)


def rwkv6_bwd(r, k, v, w_log, u, do, ds_final, ckpt, chunk_size: int, cu_seqlens=None):
    """Launch the backward kernel. Returns fp32 ``(dr, dk, dv, dw_log, du, d_initial_state)``."""
    return recurrent_bwd(_rwkv6_bwd_kernel, [r, k, v, w_log, u], do, ds_final, ckpt, chunk_size, "kkvku", cu_seqlens)


def _state_elements(r, k, v, *_):
    return r.shape[0] * r.shape[2] * r.shape[3] * v.shape[-1]


RWKV6Function = scan_function(rwkv6_fwd, rwkv6_bwd, n_config=2, layout="ttttp", state_elements=_state_elements)


def rwkv6_triton(r, k, v, w_log, u, initial_state=None, chunk_size: int = 16, cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.rwkv6.rwkv6` (fp32 / bf16 / fp16 inputs, fp32 outputs); ``chunk_size`` is
    the number of tokens between the states saved for the backward pass (memory ``T / chunk_size`` states vs.
    recompute). Packed documents (``cu_seqlens``, a ``CuSeqlens``): one launch over all of them when
    :func:`~zoo.kernels.triton_common.varlen_in_one_launch`, else one call per document."""
    args = (r, k, v, w_log, u, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    K = check_rwkv6_inputs("rwkv6_triton", *one)[3]
    if cu_seqlens is not None and not varlen_in_one_launch(cu_seqlens, _state_elements(r, k, v), chunk_size, r.shape[2]):
        return BACKENDS.per_document(rwkv6_triton, args, cu_seqlens)
    n = r.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    check_triton_call("rwkv6_triton", _rwkv6_fwd_kernel, r, k, v, w_log, u, initial_state, head_dim=K,
                      batch_heads=n * r.shape[2])
    return RWKV6Function.apply(*args, cu_seqlens)
