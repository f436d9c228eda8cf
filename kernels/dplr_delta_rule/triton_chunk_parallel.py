"""Chunk-parallel Triton forward of the generalized delta rule (WY/UT form); the backward, chunk-parallel too, is
:mod:`.triton_chunk_bwd`, from the chunk-start states ``S_c`` and transitions ``M_c`` this forward keeps.

The sequence is cut into ``NT = cdiv(T, BT)`` chunks. Inside a chunk, per channel, ``A_t = sum_{j<=t} w_log_j``
(inclusive), ``A'_t = A_t - w_log_t`` (exclusive), ``A_L`` = the chunk's total (padding has ``w_log = 0`` and
``a = b = k = v = 0``). With ``S_c`` the state entering chunk c and the pseudo values ``u_t = a_t S_{t-1}`` (as in
``chunked.py``)::

    L_ab[t, j] = sum_k a_tk b_jk exp(A'_tk - A_jk),  L_ak likewise with k   (j < t; strictly lower [BT, BT])
    X          = (I - L_ab)^{-1}                                            (UT transform: unit lower triangular)
    u          = X (a * exp(A')) S_c + X L_ak V_c = P S_c + Q
    S_{c+1}    = M_c S_c + h_c,   M_c = diag(exp(A_L)) + (b * exp(A_L - A))^T P   [K, K]
                                  h_c = (b * exp(A_L - A))^T Q + (k * exp(A_L - A))^T V_c   [K, V]
    O_c        = (R_c * exp(A)) S_c + M_rb u + M_rk V_c,   M_rb[t, j] = sum_k r_tk b_jk exp(A_tk - A_jk) (j <= t)

All exponents are per-channel differences later-minus-earlier (<= 0), built one key token at a time and masked before
``exp``: no ``exp(-A)`` is formed. ``X`` comes from forward substitution, ``X_t = e_t + sum_{j<t} L_ab[t, j] X_j``.

Forward launches: (1) :func:`_dplr_cp_chunk_state_kernel` writes ``h_c`` (slot c + 1 of the fp32 state buffer
``[B * H, NT + 1, K, V]``) and ``M_c`` (``[B * H, NT, K, K]``), grid ``(NT, cdiv(V, BV), B * H)``; (2)
:func:`_dplr_cp_pass_kernel` runs ``S_{c+1} = M_c S_c + h_c`` over the chunks in place, grid
``(cdiv(V, BVP), B * H)``; (3) :func:`_dplr_cp_output_kernel`, grid ``(NT, cdiv(V, BV), B * H)``.

Parallelism at B = 1, T = 16k, H = 16, K = V = 64 (an H100 has 132 SMs; 4 programs per SM is 528): the per-chunk
launches have ``NT * cdiv(V, BV) * B * H = 1024 * 2 * 16 = 32768`` programs (BT = 16, BV = 32). The state pass has
only ``cdiv(64, 16) * 16 = 64``: ``M_c`` mixes all K rows of the state, so a program must hold whole columns
``[K, BVP]`` (BVP = 16, the smallest ``tl.dot`` width), and combining the affine maps associatively (as RWKV-6's pass
does with diagonal decays) would cost a ``[K, K] @ [K, K]`` product per combine, K / BVP = 4 times the pass's work.
Its work is ``NT * K * K * V`` multiply-adds, ``1 / BT`` of the per-chunk launches' per program step.

Packed documents (``cu_seqlens`` over ``B = 1``, fla's convention): each document's chunks start at its own first
token (document n has ``NT_n = cdiv(len_n, BT)`` chunks, ``NT = sum NT_n``), the same three launches over all of them
(``IS_VARLEN``). The per-chunk kernels run grid ``(NT, cdiv(V, BV), H)``, each program reading (document, chunk) from
a host-built int32 table (:func:`~zoo.kernels.chunk_pass.chunk_index`, built once per call from the host bounds, no
device sync; :func:`~zoo.kernels.triton_common.chunk_span`); the state pass ``(cdiv(V, BVP), N * H)``, one document x
head x column block each, from that document's initial state (``[N, H, K, V]``, zeros when None); the states buffer
holds ``NT_n + 1`` slots per document and head (``[H * (NT + N), K, V]``), ``M_c`` ``[H * NT, K, K]``; the final
states are each document's last slot, ``[N, H, K, V]``.

Backward: :mod:`.triton_chunk_bwd`, the reverse pass ``dS_c = M_c^T dS_{c+1} + G_c`` (grid ``(cdiv(V, BVP), B *
H)``, 64 programs at the shape above, for the same reason) between three per-chunk launches of 32768 programs. Before
it, this op trained through the fused-recurrent backward, grid ``(cdiv(V, 32), B * H)`` = 32 programs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.checks import check_head_inputs
from zoo.kernels.chunk_pass import ChunkIndex, chunk_dims, chunk_states, chunk_varlen_in_one_launch
from zoo.kernels.dplr_delta_rule import BACKENDS, dplr_delta_rule_keys
from zoo.kernels.triton_common import (
    Launch, Target, check_triton_call, chunk_span, dot_dtype, dot_precision, launch_target, scan_function,
)


@triton.jit
def _dplr_cp_wy(b_w, b_a, b_b, b_k, BT: tl.constexpr):
    """``(A, A', L_ak, X = (I - L_ab)^{-1})`` of one chunk from its ``[BT, BK]`` tiles (fp32)."""
    o_t = tl.arange(0, BT)
    b_A = tl.cumsum(b_w, axis=0)  # [BT, BK] inclusive
    b_Ae = b_A - b_w  # exclusive
    b_Lab = tl.zeros([BT, BT], dtype=tl.float32)
    b_Lak = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):  # key token j: column j of L_ab and L_ak
        sel = o_t[:, None] == j
        b_bj = tl.sum(tl.where(sel, b_b, 0.0), axis=0)  # [BK], row j
        b_kj = tl.sum(tl.where(sel, b_k, 0.0), axis=0)
        b_Aj = tl.sum(tl.where(sel, b_A, 0.0), axis=0)
        m_after = o_t > j
        b_ae = b_a * tl.exp(tl.where(m_after[:, None], b_Ae - b_Aj[None, :], 0.0))  # [BT, BK]
        col = o_t[None, :] == j
        b_Lab += tl.where(col, tl.where(m_after, tl.sum(b_ae * b_bj[None, :], axis=1), 0.0)[:, None], 0.0)
        b_Lak += tl.where(col, tl.where(m_after, tl.sum(b_ae * b_kj[None, :], axis=1), 0.0)[:, None], 0.0)
    b_X = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)  # [BT, BT], rows filled in order below
    for t in range(1, BT):
        sel = o_t[:, None] == t
        b_l = tl.sum(tl.where(sel, b_Lab, 0.0), axis=0)  # [BT], L_ab[t, :], zero from j = t on
        b_row = tl.sum(b_l[:, None] * b_X, axis=0) + tl.where(o_t == t, 1.0, 0.0)
        b_X = tl.where(sel, b_row[None, :], b_X)
    return b_A, b_Ae, b_Lak, b_X


@triton.jit
def _dplr_cp_chunk_state_kernel(
    w, k, v, a, b, states, trans, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KB: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``h_c`` into slot c + 1 of ``states [B * H, NT + 1, K, V]``; ``M_c`` into ``trans [B * H, NT, K, K]`` (by the
    ``i_v = 0`` programs). w, k, a, b: [B, T, H, K]; v: [B, T, H, V]. Grid ``(NT, cdiv(V, BV), B * H)``: program
    ``(c, i_v, i_bh)`` writes columns ``[i_v * BV, (i_v + 1) * BV)`` of ``h_c``. ``IS_VARLEN`` (packed documents,
    ``B = 1``): grid ``(sum NT_n, cdiv(V, BV), H)``, chunk ``c = i_t`` of all documents' chunks read from
    ``chunk_indices`` (:func:`~zoo.kernels.triton_common.chunk_span`), ``states [H * (NT + N), K, V]``, ``trans [H *
    NT, K, K]`` in :func:`~zoo.kernels.chunk_pass.chunk_index`'s row layout."""
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
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_A, b_Ae, b_Lak, b_X = _dplr_cp_wy(b_w, b_a, b_b, b_k, BT)
    b_AL = tl.sum(b_w, axis=0)  # [BK]
    b_tail = tl.exp(b_AL[None, :] - b_A)  # [BT, BK]
    b_btail = b_b * b_tail
    b_q = tl.dot(b_X, tl.dot(b_Lak, b_v, input_precision="ieee"), input_precision="ieee")  # [BT, BV]
    b_h = tl.dot(tl.trans(b_btail), b_q, input_precision=PRECISION)
    b_h += tl.dot(tl.trans(b_k * b_tail), b_v, input_precision=PRECISION)  # [BK, BV]
    m_kv = m_k[:, None] & m_v[None, :]
    tl.store(states + (i_bh * (S_NT + 1) + S_t + 1) * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)
    if i_v == 0:  # M_c in column slices [K, KB]: a and w re-read per slice (the decays are per channel)
        o_kb = tl.arange(0, KB)
        for k0 in range(0, BK, KB):
            m_kb = (k0 + o_kb) < K
            p_kb = ((i_b * T + t0 + o_t[:, None]) * H + i_h) * K + k0 + o_kb[None, :]  # [BT, KB]
            m_tkb = m_t[:, None] & m_kb[None, :]
            b_wc = tl.load(w + p_kb, mask=m_tkb, other=0.0).to(tl.float32)
            b_ac = tl.load(a + p_kb, mask=m_tkb, other=0.0).to(tl.float32)
            b_p = tl.dot(b_X, b_ac * tl.exp(tl.cumsum(b_wc, axis=0) - b_wc), input_precision="ieee")  # [BT, KB]
            b_m = tl.dot(tl.trans(b_btail), b_p, input_precision=PRECISION)  # [BK, KB]
            b_m += tl.where(o_k[:, None] == k0 + o_kb[None, :], tl.exp(tl.sum(b_wc, axis=0))[None, :], 0.0)
            tl.store(trans + (i_bh * G_NT + G_t) * K * K + o_k[:, None] * K + k0 + o_kb[None, :], b_m,
                     mask=m_k[:, None] & m_kb[None, :])


@triton.jit
def _dplr_cp_pass_rows(chunk_offsets, i_nh, H: tl.constexpr):
    """``(s_row, m_row, NT_n)`` of a packed-documents pass program over document ``n = i_nh // H``, head ``h = i_nh %
    H`` (:func:`~zoo.kernels.chunk_pass.chunk_index`'s layout, ``C_n = chunk_offsets[n]``, ``NT_n = chunk_offsets[n +
    1] - C_n``): its ``NT_n + 1`` state rows from ``s_row = H * (C_n + n) + h * (NT_n + 1)``, its ``NT_n`` transition
    rows from ``m_row = H * C_n + h * NT_n``."""
    i_n, i_h = i_nh // H, i_nh % H
    C_n = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = (tl.load(chunk_offsets + i_n + 1) - C_n).to(tl.int32)
    return H * (C_n + i_n) + i_h * (NT + 1), H * C_n + i_h * NT, NT


@triton.jit
def _dplr_cp_pass_kernel(
    states, trans, s0, chunk_offsets,
    NT,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVP: tl.constexpr, KB: tl.constexpr, HAS_S0: tl.constexpr,
    H: tl.constexpr = 1, IS_VARLEN: tl.constexpr = False,
):
    """``S_{c+1} = M_c S_c + h_c`` in place on ``states [B * H, NT + 1, K, V]`` (fp32; slot c + 1 holds ``h_c`` on
    entry, ``S_{c+1}`` on exit; slot 0 <- ``s0 [B * H, K, V]`` or zeros), ``M_c`` from ``trans [B * H, NT, K, K]``.
    Grid ``(cdiv(V, BVP), B * H)``: program ``(i_v, i_bh)`` carries state columns ``[i_v * BVP, (i_v + 1) * BVP)``
    through all chunks. The product ``M_c S_c`` runs in ``KB``-wide slices of K, ``S_c``'s rows re-read from the slot
    just stored (L1 / L2), so no ``[K, K]`` tile is held in registers. ``IS_VARLEN`` (packed documents): grid
    ``(cdiv(V, BVP), N * H)``, program ``(i_v, i_nh)`` runs document ``n = i_nh // H``'s ``NT_n`` chunks for head ``h =
    i_nh % H`` from ``s0 [N, H, K, V]`` (:func:`_dplr_cp_pass_rows`: its rows of ``states [H * (NT + N), K, V]`` and
    ``trans [H * NT, K, K]``; ``chunk_offsets [N + 1]`` the chunks before each document), its final state left in its
    last slot."""
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_k, o_kb = tl.arange(0, BK), tl.arange(0, KB)
    o_v = i_v * BVP + tl.arange(0, BVP)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    if IS_VARLEN:
        s_row, m_row, NT = _dplr_cp_pass_rows(chunk_offsets, i_bh, H)
        p_s = states + s_row * K * V + o_k[:, None] * V + o_v[None, :]  # [BK, BVP], slot 0
        p_sb = states + s_row * K * V + o_kb[:, None] * V + o_v[None, :]  # [KB, BVP], slot 0, rows 0 .. KB
        p_m = trans + m_row * K * K + o_k[:, None] * K + o_kb[None, :]  # [BK, KB], chunk 0, columns 0 .. KB
    else:  # today's lines, op for op
        p_s = states + i_bh * (NT + 1) * K * V + o_k[:, None] * V + o_v[None, :]  # [BK, BVP], slot 0
        p_sb = states + i_bh * (NT + 1) * K * V + o_kb[:, None] * V + o_v[None, :]  # [KB, BVP], slot 0, rows 0 .. KB
        p_m = trans + i_bh * NT * K * K + o_k[:, None] * K + o_kb[None, :]  # [BK, KB], chunk 0, columns 0 .. KB
    if HAS_S0:
        b_s = tl.load(s0 + i_bh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BVP], dtype=tl.float32)
    for c in range(NT):
        c64 = tl.cast(c, tl.int64)  # c * K * V can pass 2^31 (K = V = 64 at T >= 8.4M)
        tl.store(p_s + c64 * K * V, b_s, mask=m_kv)
        tl.debug_barrier()
        b_s = tl.load(p_s + (c64 + 1) * K * V, mask=m_kv, other=0.0)  # h_c
        for k0 in range(0, BK, KB):
            m_kb = (k0 + o_kb) < K
            b_m = tl.load(p_m + c64 * K * K + k0, mask=m_k[:, None] & m_kb[None, :], other=0.0)  # [BK, KB]
            b_sk = tl.load(p_sb + c64 * K * V + k0 * V, mask=m_kb[:, None] & m_v[None, :], other=0.0)  # [KB, BVP]
            b_s += tl.dot(b_m, b_sk, input_precision="ieee")
        tl.debug_barrier()
    tl.store(p_s + tl.cast(NT, tl.int64) * K * V, b_s, mask=m_kv)


@triton.jit
def _dplr_cp_output_kernel(
    r, w, k, v, a, b, states, o, chunk_indices, cu,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """``O_c = (R_c * exp(A)) S_c + M_rb u + M_rk V_c`` with ``u = X ((a * exp(A')) S_c + L_ak V_c)`` and ``S_c`` from
    slot c of ``states``. r, w, k, a, b: [B, T, H, K]; v, o: [B, T, H, V]. Grid ``(NT, cdiv(V, BV), B * H)``:
    program ``(c, i_v, i_bh)`` writes the chunk's columns ``[i_v * BV, (i_v + 1) * BV)``. ``IS_VARLEN``: grid
    ``(sum NT_n, cdiv(V, BV), H)`` over all documents' chunks, as :func:`_dplr_cp_chunk_state_kernel`."""
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
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_a = tl.load(a + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_A, b_Ae, b_Lak, b_X = _dplr_cp_wy(b_w, b_a, b_b, b_k, BT)
    b_s = tl.load(states + (i_bh * (S_NT + 1) + S_t) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV], S_c
    b_u = tl.dot(b_a * tl.exp(b_Ae), b_s, input_precision=PRECISION) + tl.dot(b_Lak, b_v, input_precision="ieee")
    b_u = tl.dot(b_X, b_u, input_precision="ieee")  # [BT, BV]
    b_r = tl.load(r + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_Mrb = tl.zeros([BT, BT], dtype=tl.float32)
    b_Mrk = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):  # key token j: column j of M_rb and M_rk
        sel = o_t[:, None] == j
        b_bj = tl.sum(tl.where(sel, b_b, 0.0), axis=0)
        b_kj = tl.sum(tl.where(sel, b_k, 0.0), axis=0)
        b_Aj = tl.sum(tl.where(sel, b_A, 0.0), axis=0)
        m_from = o_t >= j
        b_re = b_r * tl.exp(tl.where(m_from[:, None], b_A - b_Aj[None, :], 0.0))
        col = o_t[None, :] == j
        b_Mrb += tl.where(col, tl.where(m_from, tl.sum(b_re * b_bj[None, :], axis=1), 0.0)[:, None], 0.0)
        b_Mrk += tl.where(col, tl.where(m_from, tl.sum(b_re * b_kj[None, :], axis=1), 0.0)[:, None], 0.0)
    b_o = tl.dot(b_r * tl.exp(b_A), b_s, input_precision=PRECISION)
    b_o += tl.dot(b_Mrb, b_u, input_precision="ieee") + tl.dot(b_Mrk, b_v, input_precision="ieee")
    tl.store(o + p_tv, b_o, mask=m_tv)


class DPLRChunkParallelTiles(NamedTuple):
    """Launch parameters: per-chunk launches use ``[BT, BK]`` / ``[BT, BV]`` / ``[BK, BV]`` tiles; the state pass
    carries ``[BK, BVP]`` state columns per program."""

    BT: int
    BK: int
    BV: int
    BVP: int
    KB: int
    launch: Launch
    pass_launch: Launch


def dplr_chunk_parallel_tiles(K: int, V: int, chunk_size: int, dtype: torch.dtype, target: Target) -> DPLRChunkParallelTiles:
    """BT = 16 whatever ``chunk_size`` (the smallest ``tl.dot`` dimension; the WY terms cost ``BT * BT * K`` exps per
    chunk); BK holds all of K; BV at most 32; 4 warps (8 above K = 64), no software pipelining. The state pass: BVP = 16
    columns per program, products in KB = 16-wide slices of K, the same warps; the chunk-state kernel builds ``M_c`` in
    the same KB-wide column slices. So no launch spills on sm_80 / 86 / 89 / 90 at K = 64 or 128
    (benchmarks/kernel_resources.py). The same on every target and input dtype."""
    BK = max(triton.next_power_of_2(K), 16)
    BV = max(min(triton.next_power_of_2(V), 32), 16)
    warps = 4 if BK <= 64 else 8
    return DPLRChunkParallelTiles(16, BK, BV, 16, 16, Launch(warps, 1), Launch(warps, 1))


def dplr_cp_pass(kernel, states, trans, edge, index: ChunkIndex | None, K: int, V: int, tiles, **flag) -> None:
    """Launch a state pass ``kernel`` (:func:`_dplr_cp_pass_kernel`, or the backward's, ``flag`` its ``HAS_S0`` /
    ``HAS_DS``) in place on ``states`` with the transitions ``trans``; ``edge`` the initial state (the final state's
    gradient), None: zeros. Grid ``(cdiv(V, BVP), B * H)`` on ``states [B * H, NT + 1, K, V]``; packed documents
    (``index``): ``(cdiv(V, BVP), N * H)`` on ``states [H * (NT + N), K, V]``, ``trans [H * NT, K, K]``, ``edge [N, H,
    K, V]``."""
    common = dict(K=K, V=V, BK=tiles.BK, BVP=tiles.BVP, KB=tiles.KB, **flag, **tiles.pass_launch._asdict())
    edge_arg = states if edge is None else edge
    if index is None:
        kernel[(triton.cdiv(V, tiles.BVP), states.shape[0])](states, trans, edge_arg, None, states.shape[1] - 1, **common)
    else:
        kernel[(triton.cdiv(V, tiles.BVP), index.N * index.H)](
            states, trans, edge_arg, index.offsets, index.NT, H=index.H, IS_VARLEN=True, **common)


def dplr_cp_fwd(r, w, k, v, a, b, initial_state, chunk_size: int, cu_seqlens=None):
    """Launch the three forward kernels on contiguous inputs. Returns fp32 ``(o, final_state, states, trans, table)``,
    ``states`` ``[B * H, NT + 1, K, V]`` = the state entering every chunk, then the final one; ``trans`` the ``M_c``
    ``[B * H, NT, K, K]`` (both kept for the backward). Packed documents (``cu_seqlens``, a
    :class:`~zoo.kernels.backends.CuSeqlens` over ``B = 1``): every document's chunks from its own start
    (:func:`~zoo.kernels.chunk_pass.chunk_index`), ``states [H * (NT + N), K, V]``, ``trans [H * NT, K, K]``,
    per-chunk grids ``(NT, NV, H)`` over all documents' ``NT = sum NT_n`` chunks, the pass ``(cdiv(V, BVP), N * H)``,
    final states ``[N, H, K, V]``; ``table`` the index's device table (None without documents), which the backward
    reuses."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    target = launch_target(r.device)
    tiles = dplr_chunk_parallel_tiles(K, V, chunk_size, r.dtype, target)
    NT, NV, dims = chunk_dims(tiles, T, H, K, V, dot_precision(dot_dtype(r, k, v), target))
    buf = chunk_states(cu_seqlens, tiles.BT, B, H, K, V, NT, NV, r.device)
    states, index, NT, grid = buf
    varlen, flag = buf.varlen
    f32 = dict(dtype=torch.float32, device=r.device)
    trans = torch.empty(B * H, NT, K, K, **f32) if index is None else torch.empty(H * NT, K, K, **f32)  # packed: NT of all documents
    o = torch.empty(B, T, H, V, **f32)
    _dplr_cp_chunk_state_kernel[grid](w, k, v, a, b, states, trans, *varlen, T, NT, KB=tiles.KB, **dims, **flag)
    dplr_cp_pass(_dplr_cp_pass_kernel, states, trans, initial_state, index, K, V, tiles, HAS_S0=initial_state is not None)
    _dplr_cp_output_kernel[grid](r, w, k, v, a, b, states, o, *varlen, T, NT, **dims, **flag)
    final = buf.edge(True, B, H, K, V)
    final = final.clone() if index is None else final  # a slot's view, or already gathered
    return o, final, states, trans, None if index is None else index.table


def _dplr_cp_bwd(*args):
    """:func:`.triton_chunk_bwd.dplr_cp_bwd` (imported here: it imports this module's WY helper)."""
    from zoo.kernels.dplr_delta_rule.triton_chunk_bwd import dplr_cp_bwd

    return dplr_cp_bwd(*args)


def _state_elements(r, w, k, v, *_):
    return r.shape[0] * r.shape[2] * r.shape[3] * v.shape[-1]


DPLRChunkParallelFunction = scan_function(dplr_cp_fwd, _dplr_cp_bwd, n_config=2, layout="tttttt",
                                           state_elements=_state_elements)


def dplr_delta_rule_chunk_parallel(r, w_log, k, v, a, b, initial_state=None, chunk_size: int = 16, cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.dplr_delta_rule.dplr_delta_rule` (fp32 / bf16 / fp16 inputs, fp32 outputs): the chunk-parallel
    forward of this module, the chunk-parallel backward of :mod:`.triton_chunk_bwd` (every gradient, the initial
    state's included). Chunks are 16 tokens whatever ``chunk_size`` (checked, unused):
    :func:`dplr_chunk_parallel_tiles`. Packed documents (``cu_seqlens``, a ``CuSeqlens``): one launch sequence over
    all of them (each document's chunks from its own start) when
    :func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch`, else one call per document."""
    args = (r, w_log, k, v, a, b, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    K = check_head_inputs("dplr_delta_rule_chunk_parallel", dplr_delta_rule_keys(r, w_log, k, a, b), v, one[6], chunk_size)[3]
    if cu_seqlens is not None and not dplr_cp_varlen_in_one_launch(cu_seqlens, r, v, chunk_size):
        return BACKENDS.per_document(dplr_delta_rule_chunk_parallel, args, cu_seqlens)
    n = r.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    check_triton_call("dplr_delta_rule_chunk_parallel", _dplr_cp_output_kernel, r, w_log, k, v, a, b, initial_state, head_dim=K,
                      batch_heads=n * r.shape[2])
    return DPLRChunkParallelFunction.apply(*args, cu_seqlens)


def dplr_cp_varlen_in_one_launch(cu_seqlens, r, v, chunk_size: int) -> bool:
    """Whether packed documents ``cu_seqlens`` over ``r [1, T, H, K]``, ``v [1, T, H, V]`` run in one launch
    sequence of these kernels (:func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch` at their BT); else the
    caller runs each document alone."""
    BT = dplr_chunk_parallel_tiles(r.shape[3], v.shape[-1], chunk_size, r.dtype, launch_target(r.device)).BT
    return chunk_varlen_in_one_launch(cu_seqlens, _state_elements(r, None, None, v), BT, r.shape[2])
