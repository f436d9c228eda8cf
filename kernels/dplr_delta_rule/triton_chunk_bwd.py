"""Chunk-parallel Triton backward of the generalized delta rule (the ``dplr_delta_rule`` op's ``triton_chunk``
backend), from the chunk-start states of its forward (:mod:`.triton_chunk_parallel`, whose docstring defines ``A``, ``A'``,
``A_L``, ``L_ab``, ``L_ak``, ``X``, ``u``, ``M_rb``, ``M_rk`` and ``M_c`` of a chunk).

Token by token, with ``E_t`` the gradient of the state ``S_t`` (``do_t`` added) and ``du_t = b_t E_t``::

    dr_t = S_t do_t,  dv_t = k_t E_t,  dk_t = E_t v_t,  db_t = E_t u_t,  da_t = S_{t-1} du_t  (sums over V)
    E_{t-1} = r_{t-1}^T do_{t-1} + diag(exp(w_log_t)) E_t + a_t^T du_t

Per chunk c, ``dS_{c+1}`` the gradient of the state leaving it, every term is a chunk-wide product
(``tail = exp(A_L - A)``; pair sums ``sum_j`` run over the chunk's tokens, per channel k, masked as written)::

    dS_c = M_c^T dS_{c+1} + G_c,  G_c = (R * exp(A))^T dO + (X (a * exp(A')))^T M_rb^T dO     (reverse pass)
    dU   = X^T ((b * tail) dS_{c+1} + M_rb^T dO)                    [BT, V]  (I - L_ab^T) dU = ...
    dV   = (k * tail) dS_{c+1} + M_rk^T dO + L_ak^T dU
    dr_t = exp(A_t) (S_c do_t) + sum_{j<=t} exp(A_t - A_j) (b_j (u_j . do_t) + k_j (v_j . do_t))
    da_t = exp(A'_t) (S_c du_t) + sum_{j<t} exp(A'_t - A_j) (b_j (u_j . du_t) + k_j (v_j . du_t))
    dk_t = tail_t (dS_{c+1} v_t) + sum_{j>=t} exp(A_j - A_t) r_j (do_j . v_t) + sum_{j>t} exp(A'_j - A_t) a_j (du_j . v_t)
    db_t = the same with u_t for v_t
    dw_t = sum_{i>=t} (r_i dr_i - b_i db_i - k_i dk_i) + sum_{i>t} a_i da_i + rowsum(dS_{c+1} * S_{c+1})

The last line: ``dw_t = rowsum(E_t * diag(exp(w_log_t)) S_{t-1})`` and ``diag(exp(w_log_t)) S_{t-1} = S_t - b_t^T u_t
- k_t^T v_t``; ``rowsum(E_t * S_t)`` telescopes through the chunk to the state leaving it. Every exponent is
later-minus-earlier (<= 0) and masked before ``exp``; ``dS_0`` is the initial state's gradient.

Launches (``NT = cdiv(T, BT)``, ``NV = cdiv(V, BV)``): (1) :func:`_dplr_cpb_dstate_kernel` writes ``G_c`` into
slot c of the fp32 buffer ``dstates [B * H, NT + 1, K, V]``, grid ``(NT, NV, B * H)``; (2)
:func:`_dplr_cpb_pass_kernel` runs ``dS_c = M_c^T dS_{c+1} + G_c`` in place from ``dS_NT`` = the final state's
gradient, with the forward's ``M_c`` ``[B * H, NT, K, K]``, grid ``(cdiv(V, BVP), B * H)``; (3)
:func:`_dplr_cpb_du_kernel` writes ``u``, ``dU`` (fp32 ``[B, T, H, V]``) and ``dV``, grid ``(NT, NV, B * H)``; (4)
:func:`_dplr_cpb_grad_kernel` the K-side gradients from them, grid ``(NT, NV, B * H)``: per-V-block partial sums
``[NV, B, T, H, K]`` of dr, dw, dk, da, db, added up here. (3) and (4) are split so that neither spills: (4) needs
no WY terms, only ``A`` and the ``[BT, BT]`` products ``do . u``, ``do . v``, ``du . u``, ``du . v``, and walks K
in ``KG``-wide slices (a channel's gradients involve only that channel once those products are formed).

Packed documents (``cu_seqlens``, ``IS_VARLEN``): the forward's chunk table and layout (each document's chunks from
its own first token; per-chunk grids ``(sum NT_n, NV, H)``, ``dstates [H * (NT + N), K, V]``), the reverse pass
``(cdiv(V, BVP), N * H)`` from each document's final-state gradient ``[N, H, K, V]`` to its ``dS_0``, the initial
states' gradients ``[N, H, K, V]``.

Parallelism at B = 1, T = 16k, H = 16, K = V = 64: launches (1), (3) and (4) have ``1024 * 2 * 16 = 32768``
programs (>= 528). The pass has ``cdiv(64, 16) * 16 = 64``, the forward pass's count and for its reason: ``M_c^T``
mixes all K rows of ``dS``, so a program holds whole ``[K, BVP]`` columns; its work is ``1 / BT`` of the per-chunk
launches'.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.chunk_pass import chunk_dims, chunk_states
from zoo.kernels.dplr_delta_rule.triton_chunk_parallel import _dplr_cp_pass_rows, _dplr_cp_wy, dplr_cp_pass
from zoo.kernels.triton_common import Launch, Target, chunk_span, dot_dtype, dot_precision, launch_target, operand_dtype


@triton.jit
def _dplr_cpb_rb(b_r, b_b, b_k, b_A, BT: tl.constexpr):
    """``(M_rb, M_rk)`` of one chunk, ``M_rb[t, j] = sum_k r_tk b_jk exp(A_tk - A_jk)`` (j <= t), ``[BT, BT]``."""
    o_t = tl.arange(0, BT)
    b_Mrb = tl.zeros([BT, BT], dtype=tl.float32)
    b_Mrk = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):  # key token j: column j
        sel = o_t[:, None] == j
        b_bj = tl.sum(tl.where(sel, b_b, 0.0), axis=0)
        b_kj = tl.sum(tl.where(sel, b_k, 0.0), axis=0)
        b_Aj = tl.sum(tl.where(sel, b_A, 0.0), axis=0)
        m_from = o_t >= j
        b_re = b_r * tl.exp(tl.where(m_from[:, None], b_A - b_Aj[None, :], 0.0))
        col = o_t[None, :] == j
        b_Mrb += tl.where(col, tl.where(m_from, tl.sum(b_re * b_bj[None, :], axis=1), 0.0)[:, None], 0.0)
        b_Mrk += tl.where(col, tl.where(m_from, tl.sum(b_re * b_kj[None, :], axis=1), 0.0)[:, None], 0.0)
    return b_Mrb, b_Mrk


@triton.jit
def _dplr_cpb_dstate_kernel(
    r, w, k, a, b, do, dstates, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``G_c`` into slot c of ``dstates [B * H, NT + 1, K, V]``. r, w, k, a, b: [B, T, H, K]; do: [B, T, H, V]. Grid
    ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` writes columns ``[i_v * BV, (i_v + 1) * BV)``.
    ``IS_VARLEN`` (packed documents, ``B = 1``): grid ``(sum NT_n, cdiv(V, BV), H)`` over all documents' chunks,
    ``dstates [H * (NT + N), K, V]`` (:func:`~zoo.kernels.triton_common.chunk_span`)."""
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
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_A, b_Ae, b_Lak, b_X = _dplr_cp_wy(b_w, b_a, b_b, b_k, BT)
    b_Mrb, b_Mrk = _dplr_cpb_rb(b_r, b_b, b_k, b_A, BT)
    b_y = tl.dot(tl.trans(b_X), tl.dot(tl.trans(b_Mrb), b_do, input_precision="ieee"), input_precision="ieee")  # [BT, BV]
    b_g = tl.dot(tl.trans(b_r * tl.exp(b_A)), b_do, input_precision=PRECISION)
    b_g += tl.dot(tl.trans(b_a * tl.exp(b_Ae)), b_y, input_precision=PRECISION)  # [BK, BV]
    tl.store(dstates + (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :], b_g,
             mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _dplr_cpb_pass_kernel(
    dstates, trans, ds_final, chunk_offsets,
    NT,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVP: tl.constexpr, KB: tl.constexpr, HAS_DS: tl.constexpr,
    H: tl.constexpr = 1, IS_VARLEN: tl.constexpr = False,
):
    """``dS_c = M_c^T dS_{c+1} + G_c`` in place on ``dstates [B * H, NT + 1, K, V]`` (fp32; slot c < NT holds ``G_c``
    on entry, ``dS_c`` on exit; slot NT <- ``ds_final [B * H, K, V]`` or zeros), ``M_c`` from ``trans [B * H, NT, K,
    K]``. Grid ``(cdiv(V, BVP), B * H)``: program ``(i_v, i_bh)`` carries columns ``[i_v * BVP, (i_v + 1) * BVP)``
    through the chunks in reverse; ``M_c^T dS_{c+1}`` runs in ``KB``-wide slices of K, ``dS_{c+1}``'s rows re-read
    from the slot just stored. ``IS_VARLEN`` (packed documents): grid ``(cdiv(V, BVP), N * H)``, program ``(i_v,
    i_nh)`` runs document ``i_nh // H``'s chunks for head ``i_nh % H`` from ``ds_final [N, H, K, V]`` down to its
    ``dS_0`` (its first slot; :func:`.triton_chunk_parallel._dplr_cp_pass_rows`)."""
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_k, o_kb = tl.arange(0, BK), tl.arange(0, KB)
    o_v = i_v * BVP + tl.arange(0, BVP)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    if IS_VARLEN:
        s_row, m_row, NT = _dplr_cp_pass_rows(chunk_offsets, i_bh, H)
        p_s = dstates + s_row * K * V + o_k[:, None] * V + o_v[None, :]  # [BK, BVP], slot 0
        p_sb = dstates + s_row * K * V + o_kb[:, None] * V + o_v[None, :]  # [KB, BVP], slot 0, rows 0 .. KB
        p_mt = trans + m_row * K * K + o_kb[None, :] * K + o_k[:, None]  # [BK, KB]: M_c^T, chunk 0, columns 0 .. KB
    else:  # today's lines, op for op
        p_s = dstates + i_bh * (NT + 1) * K * V + o_k[:, None] * V + o_v[None, :]  # [BK, BVP], slot 0
        p_sb = dstates + i_bh * (NT + 1) * K * V + o_kb[:, None] * V + o_v[None, :]  # [KB, BVP], slot 0, rows 0 .. KB
        p_mt = trans + i_bh * NT * K * K + o_kb[None, :] * K + o_k[:, None]  # [BK, KB]: M_c^T, chunk 0, columns 0 .. KB
    if HAS_DS:
        b_s = tl.load(ds_final + i_bh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BVP], dtype=tl.float32)
    for i in range(NT):
        c64 = tl.cast(NT - 1 - i, tl.int64)  # c * K * V can pass 2^31
        tl.store(p_s + (c64 + 1) * K * V, b_s, mask=m_kv)
        tl.debug_barrier()
        b_s = tl.load(p_s + c64 * K * V, mask=m_kv, other=0.0)  # G_c
        for k0 in range(0, BK, KB):
            m_kb = (k0 + o_kb) < K
            b_mt = tl.load(p_mt + c64 * K * K + k0 * K, mask=m_k[:, None] & m_kb[None, :], other=0.0)  # [BK, KB]
            b_sk = tl.load(p_sb + (c64 + 1) * K * V + k0 * V, mask=m_kb[:, None] & m_v[None, :], other=0.0)  # [KB, BVP]
            b_s += tl.dot(b_mt, b_sk, input_precision="ieee")
        tl.debug_barrier()
    tl.store(p_s, b_s, mask=m_kv)


@triton.jit
def _dplr_cpb_du_kernel(
    r, w, k, v, a, b, do, states, dstates, u, du, dv, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``u``, ``dU`` and ``dV`` of chunk c from ``S_c`` (``states``) and ``dS_{c+1}`` (``dstates``), both ``[B * H,
    NT + 1, K, V]``. r, w, k, a, b: [B, T, H, K]; v, do, u, du, dv: [B, T, H, V] (u, du fp32, for the gradient
    kernel). Grid ``(NT, cdiv(V, BV), B * H)``: program ``(c, i_v, i_bh)`` writes columns ``[i_v * BV, (i_v + 1) *
    BV)``. ``IS_VARLEN``: grid ``(sum NT_n, cdiv(V, BV), H)``, as :func:`_dplr_cpb_dstate_kernel`."""
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
    m_kv = m_k[:, None] & m_v[None, :]
    p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, BK]
    p_tv = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * V + o_v[None, :]  # [BT, BV]
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_A, b_Ae, b_Lak, b_X = _dplr_cp_wy(b_w, b_a, b_b, b_k, BT)
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    p_kv = (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :]  # [BK, BV], slot c
    b_s = tl.load(states + p_kv, mask=m_kv, other=0.0)  # S_c
    b_u = tl.dot(b_a * tl.exp(b_Ae), b_s, input_precision=PRECISION) + tl.dot(b_Lak, b_v, input_precision="ieee")
    b_u = tl.dot(b_X, b_u, input_precision="ieee")  # [BT, BV]
    tl.store(u + p_tv, b_u, mask=m_tv)
    b_r = tl.load(r + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_Mrb, b_Mrk = _dplr_cpb_rb(b_r, b_b, b_k, b_A, BT)
    b_tail = tl.exp(tl.sum(b_w, axis=0)[None, :] - b_A)  # [BT, BK]
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_dsn = tl.load(dstates + p_kv + K * V, mask=m_kv, other=0.0)  # dS_{c+1}
    b_du = tl.dot(b_b * b_tail, b_dsn, input_precision=PRECISION) + tl.dot(tl.trans(b_Mrb), b_do, input_precision="ieee")
    b_du = tl.dot(tl.trans(b_X), b_du, input_precision="ieee")  # [BT, BV]
    tl.store(du + p_tv, b_du, mask=m_tv)
    b_dv = tl.dot(b_k * b_tail, b_dsn, input_precision=PRECISION) + tl.dot(tl.trans(b_Mrk), b_do, input_precision="ieee")
    b_dv += tl.dot(tl.trans(b_Lak), b_du, input_precision="ieee")
    tl.store(dv + p_tv, b_dv, mask=m_tv)


@triton.jit
def _dplr_cpb_grad_kernel(
    r, w, k, v, a, b, do, u, du, states, dstates, dr, dw, dk, da, db, chunk_indices, cu,
    T, NT, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KG: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """dr, dw, dk, da, db of chunk c from ``u``, ``dU`` (:func:`_dplr_cpb_du_kernel`), ``S_c``, ``S_{c+1}``
    (``states``) and ``dS_{c+1}`` (``dstates``). r, w, k, a, b: [B, T, H, K]; v, do, u, du: [B, T, H, V]; dr, dw,
    dk, da, db: [NV, B, T, H, K] (this V block's share). Grid ``(NT, NV, B * H)``: program ``(c, i_v, i_bh)``
    contracts columns ``[i_v * BV, (i_v + 1) * BV)``, the channels in ``KG``-wide slices (each channel's gradients
    depend on its own channel only, given the ``[BT, BT]`` products). ``do . v`` takes its operands as ``OPERAND``
    (both loaded from the inputs: exact in their 16-bit dtype). ``IS_VARLEN``: grid ``(sum NT_n, NV, H)``, ``B = 1``,
    as :func:`_dplr_cpb_dstate_kernel`."""
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
    b_u = tl.load(u + p_tv, mask=m_tv, other=0.0)
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_du = tl.load(du + p_tv, mask=m_tv, other=0.0)
    b_Wu = tl.dot(b_do, tl.trans(b_u), input_precision="ieee")  # [BT, BT]: [t, j] = do_t . u_j
    b_Wv = tl.dot(b_do.to(OPERAND), tl.trans(b_v.to(OPERAND)), input_precision="ieee")
    b_Zu = tl.dot(b_du, tl.trans(b_u), input_precision="ieee")  # du_t . u_j
    b_Zv = tl.dot(b_du, tl.trans(b_v), input_precision="ieee")
    for k0 in range(0, BK, KG):
        o_k = k0 + tl.arange(0, KG)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_tk = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + o_k[None, :]  # [BT, KG]
        p_kv = (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :]  # [KG, BV], slot c
        b_dsn = tl.load(dstates + p_kv + K * V, mask=m_kv, other=0.0)  # dS_{c+1}
        b_z = tl.sum(b_dsn * tl.load(states + p_kv + K * V, mask=m_kv, other=0.0), axis=1)  # rowsum(dS_{c+1} S_{c+1})
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_A = tl.cumsum(b_w, axis=0)  # [BT, KG] inclusive
        b_Ae = b_A - b_w  # exclusive
        b_tail = tl.exp(tl.sum(b_w, axis=0)[None, :] - b_A)
        b_dk = b_tail * tl.dot(b_v, tl.trans(b_dsn), input_precision=PRECISION)  # [BT, KG]
        b_db = b_tail * tl.dot(b_u, tl.trans(b_dsn), input_precision=PRECISION)
        b_s = tl.load(states + p_kv, mask=m_kv, other=0.0)  # S_c
        b_dr = tl.exp(b_A) * tl.dot(b_do, tl.trans(b_s), input_precision=PRECISION)
        b_da = tl.exp(b_Ae) * tl.dot(b_du, tl.trans(b_s), input_precision=PRECISION)
        b_r = tl.load(r + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        for j in range(BT):  # token j: as the earlier token of dr_t / da_t, the later one of dk_t / db_t
            sel = o_t[:, None] == j  # [BT, 1]
            col = o_t[None, :] == j  # [1, BT]
            b_rj = tl.sum(tl.where(sel, b_r, 0.0), axis=0)  # [KG], row j
            b_kj = tl.sum(tl.where(sel, b_k, 0.0), axis=0)
            b_aj = tl.sum(tl.where(sel, b_a, 0.0), axis=0)
            b_bj = tl.sum(tl.where(sel, b_b, 0.0), axis=0)
            b_Aj = tl.sum(tl.where(sel, b_A, 0.0), axis=0)
            b_Aej = tl.sum(tl.where(sel, b_Ae, 0.0), axis=0)
            m_ge, m_gt = (o_t >= j)[:, None], (o_t > j)[:, None]  # t >= j, t > j
            m_le, m_lt = (o_t <= j)[:, None], (o_t < j)[:, None]
            b_e = tl.where(m_ge, tl.exp(tl.where(m_ge, b_A - b_Aj[None, :], 0.0)), 0.0)  # exp(A_t - A_j), [BT, KG]
            b_dr += b_e * (tl.sum(tl.where(col, b_Wu, 0.0), axis=1)[:, None] * b_bj[None, :]
                           + tl.sum(tl.where(col, b_Wv, 0.0), axis=1)[:, None] * b_kj[None, :])
            b_e = tl.where(m_gt, tl.exp(tl.where(m_gt, b_Ae - b_Aj[None, :], 0.0)), 0.0)  # exp(A'_t - A_j)
            b_da += b_e * (tl.sum(tl.where(col, b_Zu, 0.0), axis=1)[:, None] * b_bj[None, :]
                           + tl.sum(tl.where(col, b_Zv, 0.0), axis=1)[:, None] * b_kj[None, :])
            b_e = tl.where(m_le, tl.exp(tl.where(m_le, b_Aj[None, :] - b_A, 0.0)), 0.0) * b_rj[None, :]  # e^(A_j - A_t) r_j
            b_f = tl.where(m_lt, tl.exp(tl.where(m_lt, b_Aej[None, :] - b_A, 0.0)), 0.0) * b_aj[None, :]  # e^(A'_j - A_t) a_j
            b_dk += (b_e * tl.sum(tl.where(sel, b_Wv, 0.0), axis=0)[:, None]
                     + b_f * tl.sum(tl.where(sel, b_Zv, 0.0), axis=0)[:, None])
            b_db += (b_e * tl.sum(tl.where(sel, b_Wu, 0.0), axis=0)[:, None]
                     + b_f * tl.sum(tl.where(sel, b_Zu, 0.0), axis=0)[:, None])
        b_c = b_r * b_dr - b_b * b_db - b_k * b_dk  # [BT, KG], summed over i >= t below
        b_ad = b_a * b_da  # summed over i > t
        b_dw = tl.sum(b_c, axis=0)[None, :] - tl.cumsum(b_c, axis=0) + b_c  # [BT, KG]
        b_dw += tl.sum(b_ad, axis=0)[None, :] - tl.cumsum(b_ad, axis=0) + b_z[None, :]
        p_g = i_v * B * T * H * K + p_tk  # [BT, KG] in [NV, B, T, H, K]
        tl.store(dr + p_g, b_dr, mask=m_tk)
        tl.store(dw + p_g, b_dw, mask=m_tk)
        tl.store(dk + p_g, b_dk, mask=m_tk)
        tl.store(da + p_g, b_da, mask=m_tk)
        tl.store(db + p_g, b_db, mask=m_tk)


class DPLRChunkBwdTiles(NamedTuple):
    """Launch parameters: the per-chunk launches use ``[BT, BK]`` / ``[BT, BV]`` / ``[BK, BV]`` tiles (the gradient
    kernel ``[BT, KG]`` slices of K, with ``grad_launch``); the pass carries ``[BK, BVP]`` columns of ``dS``."""

    BT: int
    BK: int
    BV: int
    BVP: int
    KB: int
    KG: int
    launch: Launch
    grad_launch: Launch
    pass_launch: Launch


def dplr_chunk_bwd_tiles(K: int, V: int, chunk_size: int, dtype: torch.dtype, target: Target) -> DPLRChunkBwdTiles:
    """The forward's tiles (:func:`.triton_chunk_parallel.dplr_chunk_parallel_tiles`: BT = 16 whatever
    ``chunk_size``, BK = all of K, BV <= 32, BVP = KB = 16, 4 warps, 8 above K = 64). The gradient kernel: K in
    KG = 32-wide slices, 8 warps (KG = 64 spilled on sm_90 at K = 128: 24 B fp32; at 4 warps 40 B bf16; KG = 32 needs
    ~110 registers). The same on every target and input dtype."""
    BK = max(triton.next_power_of_2(K), 16)
    BV = max(min(triton.next_power_of_2(V), 32), 16)
    warps = 4 if BK <= 64 else 8
    return DPLRChunkBwdTiles(16, BK, BV, 16, 16, min(BK, 32), Launch(warps, 1), Launch(8, 1), Launch(warps, 1))


def dplr_cp_bwd(r, w, k, v, a, b, do, ds_final, states, trans, table, chunk_size: int, cu_seqlens=None):
    """The four backward launches on contiguous inputs, from the forward's ``states [B * H, NT + 1, K, V]`` and
    ``trans [B * H, NT, K, K]``. Returns fp32 ``[dr, dw_log, dk, dv, da, db, d_initial_state]``. Packed documents
    (``cu_seqlens``; the forward's ``states [H * (NT + N), K, V]``, ``trans [H * NT, K, K]`` and ``table``, reused):
    per-chunk grids ``(NT, NV, H)`` over all documents' chunks, the reverse pass ``(cdiv(V, BVP), N * H)`` from each
    document's ``ds_final [N, H, K, V]``, ``d_initial_state [N, H, K, V]``."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    target = launch_target(r.device)
    tiles = dplr_chunk_bwd_tiles(K, V, chunk_size, r.dtype, target)
    NT, NV, dims = chunk_dims(tiles, T, H, K, V, dot_precision(dot_dtype(r, k, v), target))
    buf = chunk_states(cu_seqlens, tiles.BT, B, H, K, V, NT, NV, r.device, table)
    dstates, index, NT, grid = buf
    varlen, flag = buf.varlen
    assert states.shape == dstates.shape, "the forward's chunks are not this backward's"
    f32 = dict(dtype=torch.float32, device=r.device)
    _dplr_cpb_dstate_kernel[grid](r, w, k, a, b, do, dstates, *varlen, T, NT, **dims, **flag)
    dplr_cp_pass(_dplr_cpb_pass_kernel, dstates, trans, ds_final, index, K, V, tiles, HAS_DS=ds_final is not None)
    u, du, dv = (torch.empty(B, T, H, V, **f32) for _ in range(3))
    _dplr_cpb_du_kernel[grid](r, w, k, v, a, b, do, states, dstates, u, du, dv, *varlen, T, NT, **dims, **flag)
    partial = [torch.empty(NV, B, T, H, K, **f32) for _ in range(5)]  # dr, dw, dk, da, db per V block
    _dplr_cpb_grad_kernel[grid](r, w, k, v, a, b, do, u, du, states, dstates, *partial, *varlen, T, NT, B,
                                KG=tiles.KG, OPERAND=operand_dtype(dot_dtype(r, k, v, do), target),
                                **{**dims, **tiles.grad_launch._asdict()}, **flag)
    dr, dw, dk, da, db = (p.sum(0) for p in partial)
    ds0 = buf.edge(False, B, H, K, V)
    ds0 = ds0.clone() if index is None else ds0  # a slot's view, or already gathered
    return [dr, dw, dk, dv, da, db, ds0]
