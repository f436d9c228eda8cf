"""Triton SSD scan (Mamba-2), forward and backward, chunk-parallel (Dao & Gu 2024, Section 6; mamba-ssm's
``mamba_chunk_scan_combined`` structure), with the dt preprocessing fused in.

Per head, with ``dt = clamp(softplus(dt + dt_bias), *dt_limit)`` and the chunk's cumulative log-decay
``a_cum[l] = sum_{k <= l} dt[k] A`` (``a_end = a_cum[L - 1]``), the sequence is cut into chunks of ``L`` steps:

1. chunk states, parallel over chunks: ``S_c = (dt x * exp(a_end - a_cum))^T @ B``, ``[P, N]`` from a zero start;
2. state passing, sequential over chunks, parallel over state entries: ``h_c = exp(a_end_{c-1}) h_{c-1} + S_{c-1}``
   (``h_0`` the initial state), the start state of every chunk and the final state;
3. chunk outputs, parallel over chunks: ``y = ((C B^T) * exp(segsum)) @ (dt x) + exp(a_cum) * (C @ h_c^T) + D x``.

The backward mirrors it: chunk-local state gradients ``(dy * exp(a_cum))^T @ C`` (1), passed in reverse (2, which
also gives ``exp(a_end) <dh_end, h_start>``, the gradient of each chunk's total decay through its start state), then
every gradient of a chunk in parallel (3), one program per chunk and head looping over head-channel and d_state
blocks. The chunk cumsum of ``dt A`` is recomputed in each chunk kernel (``L`` values per program) instead of a
separate launch and buffer. The chunk-state and output kernels take ``BLOCK_P`` head channels per program and loop
over d_state in blocks of ``BLOCK_N`` (``C B^T`` and ``C h^T`` accumulate over them). Products are ``tl.dot``, all
accumulated in fp32: those of 16-bit inputs alone (``C B^T``, ``x dy^T``, ``dy x^T``) take bf16 / fp16 operands on
GPUs (:func:`~zoo.kernels.triton_common.operand_dtype`, exact products); every other one fp32 operands, exact
(``ieee``) for fp32 inputs, tf32x3 tensor-core products (fp32 accuracy) for bf16 / fp16 inputs on NVIDIA
(:func:`~zoo.kernels.triton_common.dot_precision`). dB and dC (sums over the heads of a group) are accumulated with
fp32 atomic adds, so their last bits depend on the order the programs run in; ddt is written once per step.
Parallelism at batch 1, T = 16k, 16 heads of 64, d_state 128, L = 64 (H100: 132 SMs): the chunk-state and output
kernels run ``256 x 16 x 2`` (bf16) or ``x 4`` (fp32) programs, the backward ``256 x 16``, the state passing
``128 x 16``: every launch >= 4 per SM.
Softplus and sigmoid are written inline: a nested ``@triton.jit`` call makes the interpreter re-patch triton.language.

Packed documents (``cu_seqlens`` over ``B = 1``, fla's convention; states ``[N_docs, H, P, N]``): each document's
chunks start at its own first token (document n has ``NT_n = cdiv(len_n, L)`` chunks, ``NT = sum_n NT_n``), so no
chunk holds two documents and no mask by document is needed; the same six launches run over all of them
(``IS_VARLEN``). The chunk-state, output and backward kernels run grid ``(NT, H, cdiv(P, BLOCK_P))`` (the backward
``(NT, H)``): program c reads (document n, chunk j in it) from the host-built int32 table
(:func:`~zoo.kernels.chunk_pass.chunk_index`, built once per call, the backward reusing the forward's) through
:func:`~zoo.kernels.triton_common.chunk_span`: tokens ``cu[n] + j L + [0, min(L, cu[n + 1] - cu[n] - j L))``, the
steps past the document's end masked as past T are. Per-chunk buffers (states, start states, their gradients
``[1, H, NT, P, N]``; aend, dA, dD ``[H, NT]``) keep the layout of one row of NT chunks. The state passing runs
grid ``(cdiv(P * N, BLOCK), N_docs * H)``: program ``(i, n * H + h)`` walks chunks ``C_n .. C_n + NT_n - 1`` of head h
from document n's initial state (zeros when None) and writes its final state; in reverse, from ``d final_state[n]``
to ``d initial_state[n]``. When the documents do not fit one launch sequence
(:func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch`: ``N_docs * H`` over grid axis y, or more chunks than
one segment's), each document runs alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.chunk_pass import ChunkIndex, chunk_index, chunk_varlen_in_one_launch
from zoo.kernels.ssd import BACKENDS, check_ssd_shapes
from zoo.kernels.triton_common import (
    Launch, Target, check_triton_call, chunk_span, dot_dtype, dot_precision, launch_target, operand_dtype, scan_function,
)


@triton.jit
def _chunk_rows(chunk_indices, cu, c, pid_b, T, n_chunks, offs_l, L: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(mask_t [L], row0)`` of chunk program c: which of its L steps are tokens (``t0 + i < T``; packed, the
    document's: ``i < cu[n + 1] - t0``) and the row of its first token in ``[B * T]`` (``pid_b * T + t0``; packed,
    ``B = 1``: ``t0 = cu[n] + j L``, from :func:`~zoo.kernels.triton_common.chunk_span` with H = 1, its state rows unused:
    the per-chunk buffers keep one row of NT chunks)."""
    t0 = c * L
    t0, T_end, _, _, _, _ = chunk_span(chunk_indices, cu, c, t0, T, n_chunks, 1, L, IS_VARLEN)
    if IS_VARLEN:
        mask_t = offs_l < (T_end - t0).to(tl.int32)  # the document's steps in this chunk
        row0 = t0
    else:
        mask_t = t0 + offs_l < T_end
        row0 = pid_b * T + t0
    return mask_t, row0


@triton.jit
def _ssd_chunk_state_kernel(
    src_ptr, dt_ptr, A_ptr, bias_ptr, mat_ptr, states_ptr, aend_ptr, chunk_indices, cu,
    T, H, G, P, n_chunks, dt_min, dt_max, N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, GRAD: tl.constexpr,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr = False,
):
    """Chunk-local states. Grid ``(cdiv(T, L), B * H, cdiv(P, BLOCK_P))``: program ``(c, b * H + h, i)`` writes
    ``states[b, h, c, i * BLOCK_P:(i + 1) * BLOCK_P, :]`` (``[B, H, cdiv(T, L), P, N]`` fp32).
    Forward (``GRAD`` False): src = x ``[B, T, H, P]``, mat = B ``[B, T, G, N]``,
    ``S_c = (dt x * exp(a_end - a_cum))^T @ B``; it also writes ``aend [B, H, cdiv(T, L)]``.
    Backward (``GRAD`` True): src = dy, mat = C, ``S_c = (dy * exp(a_cum))^T @ C`` (the start state's gradient from
    the chunk's own outputs). ``IS_VARLEN``: see the module docstring (program c: chunk c of all documents' NT)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    pid_b = bh // H
    head = (bh % H).to(tl.int32)
    group = head // (H // G)
    offs_l = tl.arange(0, L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    causal = offs_l[:, None] >= offs_l[None, :]  # [L, L]
    mask_t, row0 = _chunk_rows(chunk_indices, cu, c, pid_b, T, n_chunks, offs_l, L, IS_VARLEN)
    A = tl.load(A_ptr + head).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    dt = tl.load(dt_ptr + (row0 + offs_l) * H + head, mask=mask_t, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
    dt = tl.where(mask_t, tl.minimum(tl.maximum(dt, dt_min), dt_max), 0.0)  # steps past T leave the state alone
    a = dt * A  # [L] log-decays
    a_cum = tl.sum(tl.where(causal, a[None, :], 0.0), axis=1)  # [L] inclusive cumulative sum
    a_end = tl.sum(a, axis=0)
    src = tl.load(src_ptr + (row0 * H + head) * P + offs_l[:, None] * (H * P) + offs_p[None, :],
                  mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)  # [L, BLOCK_P]
    if GRAD:
        w = tl.exp(a_cum)
    else:
        w = dt * tl.exp(a_end - a_cum)
        tl.store(aend_ptr + bh * n_chunks + c, a_end, mask=pid_p == 0)
    src = src * w[:, None]
    for n0 in range(0, N, BLOCK_N):  # blocks of d_state
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mat = tl.load(mat_ptr + (row0 * G + group) * N + offs_l[:, None] * (G * N) + offs_n[None, :],
                      mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # [L, BLOCK_N]
        S = tl.dot(tl.trans(src), mat, input_precision=PRECISION)  # [BLOCK_P, BLOCK_N]
        state_offs = offs_p[:, None] * N + offs_n[None, :]
        tl.store(states_ptr + (bh * n_chunks + c) * P * N + state_offs, S, mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _ssd_state_passing_kernel(
    states_ptr, aend_ptr, init_ptr, out_ptr, final_ptr, prev_ptr, daend_ptr, chunk_offsets,
    n_chunks, PN,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr, H: tl.constexpr = 1,
    IS_VARLEN: tl.constexpr = False,
):
    """State passing between chunks. Grid ``(cdiv(P * N, BLOCK), B * H)``: program ``(i, b * H + h)`` walks the
    chunks with state entries ``[i * BLOCK, (i + 1) * BLOCK)`` of the flattened ``[P, N]`` state of (b, h).
    states, out, prev ``[B, H, cdiv(T, L), P, N]`` fp32 (out may be states: each entry is read before it is written);
    aend ``[B, H, cdiv(T, L)]``; init, final ``[B, H, P, N]``.
    Forward: ``out[c] = h`` (the start state of chunk c), then ``h = exp(aend[c]) h + states[c]``, chunks in order;
    final = the final state. Backward (``REVERSE``): the same recurrence over the chunks in reverse on gradients, so
    ``out[c]`` is the gradient of the state at the end of chunk c and final the initial state's gradient; it also
    writes ``daend [B * H, cdiv(T, L), cdiv(P * N, BLOCK)] = exp(aend[c]) <out[c], prev[c]>`` over its entries
    (prev: the forward's start states). ``IS_VARLEN`` (packed documents, ``B = 1``, ``n_chunks`` = NT, all
    documents' chunks): grid ``(cdiv(P * N, BLOCK), N_docs * H)``, program ``(i, n * H + h)`` walks document n's
    ``NT_n = chunk_offsets[n + 1] - C_n`` chunks, rows ``h * NT + C_n + [0, NT_n)`` of states, out, prev, aend and
    daend (``C_n = chunk_offsets[n]``, :class:`~zoo.kernels.chunk_pass.ChunkIndex`'s offsets), from init
    ``[N_docs, H, P, N]`` to final ``[N_docs, H, P, N]``."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    h = tl.zeros([BLOCK], tl.float32)
    if HAS_INIT:
        h = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    if IS_VARLEN:
        C_n = tl.load(chunk_offsets + bh // H).to(tl.int64)
        NT_n = (tl.load(chunk_offsets + bh // H + 1) - C_n).to(tl.int32)
        row = (bh % H) * n_chunks + C_n  # document n's first chunk row of head h
    else:
        NT_n = n_chunks
        row = bh * n_chunks
    for i in range(NT_n):
        c = i
        if REVERSE:
            c = NT_n - 1 - i
        base = (row + c) * PN
        s = tl.load(states_ptr + base + offs, mask=mask, other=0.0)
        e = tl.exp(tl.load(aend_ptr + row + c))
        tl.store(out_ptr + base + offs, h, mask=mask)
        if REVERSE:
            start = tl.load(prev_ptr + base + offs, mask=mask, other=0.0)
            tl.store(daend_ptr + (row + c) * n_blocks + pid, e * tl.sum(h * start, axis=0))
        h = e * h + s
    tl.store(final_ptr + bh * PN + offs, h, mask=mask)


@triton.jit
def _ssd_chunk_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, starts_ptr, y_ptr, chunk_indices, cu,
    T, H, G, P, n_chunks, dt_min, dt_max, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr,
    IS_VARLEN: tl.constexpr = False,
):
    """Chunk outputs. Grid ``(cdiv(T, L), B * H, cdiv(P, BLOCK_P))``: program ``(c, b * H + h, i)`` writes
    ``y[b, cL:(c+1)L, h, i * BLOCK_P:(i + 1) * BLOCK_P] = ((C B^T) * exp(segsum)) @ (dt x) + exp(a_cum) * (C @ h_c^T)
    + D x`` with ``h_c`` = starts ``[B, H, cdiv(T, L), P, N]``; x, y ``[B, T, H, P]``, B, C ``[B, T, G, N]``.
    ``IS_VARLEN``: see the module docstring."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    pid_b = bh // H
    head = (bh % H).to(tl.int32)
    group = head // (H // G)
    offs_l = tl.arange(0, L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    causal = offs_l[:, None] >= offs_l[None, :]  # [L, L]: step i sees step j <= i
    mask_t, row0 = _chunk_rows(chunk_indices, cu, c, pid_b, T, n_chunks, offs_l, L, IS_VARLEN)
    mask_lp = mask_t[:, None] & mask_p[None, :]
    A = tl.load(A_ptr + head).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + head).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    dt = tl.load(dt_ptr + (row0 + offs_l) * H + head, mask=mask_t, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
    dt = tl.where(mask_t, tl.minimum(tl.maximum(dt, dt_min), dt_max), 0.0)
    a_cum = tl.sum(tl.where(causal, (dt * A)[None, :], 0.0), axis=1)  # [L]
    offs_lp = offs_l[:, None] * (H * P) + offs_p[None, :]  # [L, BLOCK_P] of x / y
    X = tl.load(x_ptr + (row0 * H + head) * P + offs_lp, mask=mask_lp, other=0.0).to(tl.float32)
    CB = tl.zeros([L, L], tl.float32)
    Ch = tl.zeros([L, BLOCK_P], tl.float32)
    for n0 in range(0, N, BLOCK_N):  # blocks of d_state: C B^T and C h^T accumulate over them
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_ln = mask_t[:, None] & mask_n[None, :]
        offs_ln = offs_l[:, None] * (G * N) + offs_n[None, :]  # [L, BLOCK_N] of B / C
        Bc = tl.load(B_ptr + (row0 * G + group) * N + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + (row0 * G + group) * N + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        h = tl.load(starts_ptr + (bh * n_chunks + c) * P * N + offs_p[:, None] * N + offs_n[None, :],
                    mask=mask_p[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_P, BLOCK_N]
        CB += tl.dot(Cc.to(OPERAND), tl.trans(Bc.to(OPERAND)), input_precision=PRECISION)  # 16-bit inputs alone
        Ch += tl.dot(Cc, tl.trans(h), input_precision=PRECISION)
    seg = tl.exp(tl.where(causal, a_cum[:, None] - a_cum[None, :], float("-inf")))  # [L, L] decay j -> i
    y = tl.dot(CB * seg, X * dt[:, None], input_precision=PRECISION)
    y += tl.exp(a_cum)[:, None] * Ch + Dv * X  # [L, BLOCK_P]
    tl.store(y_ptr + (row0 * H + head) * P + offs_lp, y.to(y_ptr.dtype.element_ty), mask=mask_lp)


@triton.jit
def _rows_gram(a_base, b_base, offs_l, mask_t, stride, width, L: tl.constexpr, BLOCK: tl.constexpr,
               PRECISION: tl.constexpr, OPERAND: tl.constexpr):
    """``a b^T [L, L]`` of two chunks' ``[L, width]`` rows (``stride`` apart: x and dy, or B and C), summed over
    column blocks of ``BLOCK``; 16-bit inputs alone, so the operands take ``OPERAND``."""
    acc = tl.zeros([L, L], tl.float32)
    for j0 in range(0, width, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        offs = offs_l[:, None] * stride + offs_j[None, :]  # [L, BLOCK]
        mask = mask_t[:, None] & (offs_j < width)[None, :]
        a = tl.load(a_base + offs, mask=mask, other=0.0)
        b = tl.load(b_base + offs, mask=mask, other=0.0)
        acc += tl.dot(a.to(OPERAND), tl.trans(b.to(OPERAND)), input_precision=PRECISION)
    return acc


@triton.jit
def _ssd_chunk_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, starts_ptr, dh_ptr, daend_ptr, dy_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, chunk_indices, cu,
    T, H, G, P, n_chunks, dt_min, dt_max, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr,
    IS_VARLEN: tl.constexpr = False,
):
    """Every gradient of one chunk of one head. Grid ``(cdiv(T, L), B * H)``: program ``(c, b * H + h)`` loops over
    the head channels in blocks of ``BLOCK_P`` and over d_state in blocks of ``BLOCK_N``. It reads the chunk's start
    state (starts) and the gradient of its end state (dh), both ``[B, H, cdiv(T, L), P, N]``, and daend
    ``[B * H, cdiv(T, L)]`` (the end-decay gradient through the start state). It writes dx ``[B, T, H, P]``, ddt
    ``[B, T, H]`` and its dA and dD terms ``[B * H, cdiv(T, L)]``; adds (atomically, fp32: the heads of a group share
    them) to dB, dC ``[B, T, G, N]``. ``IS_VARLEN``: see the module docstring.

    Register pressure sets the order (tf32x3 products hold a high and a low part of each fp32 operand): one [L, L]
    matrix at a time crosses a loop of products (B C^T * seg^T in the dx pass, dCB in the dC pass, dCB^T in the dB
    pass), the [L, L] terms of dB and dC come last, when only a few [L] vectors are still live, and their x dy^T is
    recomputed there (a 16-bit product) rather than held. Each [L, L] matrix is a product of its own, never tl.trans
    of a dot result: a transposed wgmma accumulator fed to another dot is what Triton 3.4 <= v < 3.7.1 miscompiles on
    Hopper (fla-org/flash-linear-attention#640)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_b = bh // H
    head = (bh % H).to(tl.int32)
    group = head // (H // G)
    offs_l = tl.arange(0, L)
    mask_t, row0 = _chunk_rows(chunk_indices, cu, c, pid_b, T, n_chunks, offs_l, L, IS_VARLEN)
    A = tl.load(A_ptr + head).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + head).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    dt_in = tl.load(dt_ptr + (row0 + offs_l) * H + head, mask=mask_t, other=0.0).to(tl.float32) + bias
    dt_pos = dt_in
    if SOFTPLUS:
        dt_pos = tl.where(dt_in > 20.0, dt_in, tl.log(1.0 + tl.exp(tl.minimum(dt_in, 20.0))))  # softplus
    dt = tl.where(mask_t, tl.minimum(tl.maximum(dt_pos, dt_min), dt_max), 0.0)
    a_cum = tl.cumsum(dt * A, axis=0)  # [L]; no [L, L] mask held for it
    a_end = tl.sum(dt * A, axis=0)
    e_cum = tl.exp(a_cum)
    decay_to_end = tl.exp(a_end - a_cum)
    x_base = x_ptr + (row0 * H + head) * P  # x, dy, dx: [L, P] rows H * P apart
    dy_base = dy_ptr + (row0 * H + head) * P
    bc_base = (row0 * G + group) * N  # B, C, dB, dC: [L, N] rows G * N apart
    state_base = (bh * n_chunks + c) * P * N  # starts, dh: [P, N]
    BC = _rows_gram(B_ptr + bc_base, C_ptr + bc_base, offs_l, mask_t, G * N, N, L, BLOCK_N, PRECISION,
                    OPERAND)  # (C B^T)^T, [L(j), L(i)]
    XdY = _rows_gram(x_base, dy_base, offs_l, mask_t, H * P, P, L, BLOCK_P, PRECISION, OPERAND)  # x dy^T, [L(j), L(i)]
    # y_diag = (C B^T * seg) @ xd with xd = x * dt: dCB = (dy xd^T) * seg, its transpose (xd dy^T) * seg^T
    seg_t = tl.exp(tl.where(offs_l[:, None] <= offs_l[None, :], a_cum[None, :] - a_cum[:, None], float("-inf")))
    BCs = BC * seg_t
    dseg_t = XdY * dt[:, None] * BCs  # transposed gradient of the log-decay difference a_cum[i] - a_cum[j]
    d_acum = tl.sum(dseg_t, axis=0) - tl.sum(dseg_t, axis=1)
    # dxd = (B C^T * seg^T) @ dy + decay_to_end * (B @ dh^T), from h_end = exp(a_end) h_start + (xd * decay_to_end)^T B;
    # dx = D dy + dt dxd
    ddt_x = tl.zeros([L], tl.float32)  # sum over the head channels of dxd * x
    dD = 0.0
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        offs_lp = offs_l[:, None] * (H * P) + offs_p[None, :]  # [L, BLOCK_P]
        mask_lp = mask_t[:, None] & (offs_p < P)[None, :]
        dxd = tl.dot(BCs, tl.load(dy_base + offs_lp, mask=mask_lp, other=0.0).to(tl.float32), input_precision=PRECISION)
        dxd_h = tl.zeros([L, BLOCK_P], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            Bc = tl.load(B_ptr + bc_base + offs_l[:, None] * (G * N) + offs_n[None, :],
                         mask=mask_t[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + state_base + offs_p[:, None] * N + offs_n[None, :],
                         mask=(offs_p < P)[:, None] & (offs_n < N)[None, :], other=0.0)  # [BLOCK_P, BLOCK_N]
            dxd_h += tl.dot(Bc, tl.trans(dh), input_precision=PRECISION)
        dxd += decay_to_end[:, None] * dxd_h
        Xp = tl.load(x_base + offs_lp, mask=mask_lp, other=0.0).to(tl.float32)
        dYp = tl.load(dy_base + offs_lp, mask=mask_lp, other=0.0).to(tl.float32)
        ddt_x += tl.sum(dxd * Xp, axis=1)
        dD += tl.sum(tl.sum(dYp * Xp, axis=1), axis=0)
        tl.store(dx_ptr + (row0 * H + head) * P + offs_lp, (dYp * Dv + dxd * dt[:, None]).to(dx_ptr.dtype.element_ty),
                 mask=mask_lp)
    # the state terms of dB and dC: decay_to_end * (xd @ dh) and, from y_off = exp(a_cum) * (C @ h_start^T),
    # exp(a_cum) * (dy @ h_start)
    d_decay = tl.zeros([L], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_ln = offs_l[:, None] * (G * N) + offs_n[None, :]  # [L, BLOCK_N]
        mask_ln = mask_t[:, None] & (offs_n < N)[None, :]
        xd_dh = tl.zeros([L, BLOCK_N], tl.float32)
        dY_h = tl.zeros([L, BLOCK_N], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            offs_lp = offs_l[:, None] * (H * P) + offs_p[None, :]  # [L, BLOCK_P]
            mask_lp = mask_t[:, None] & (offs_p < P)[None, :]
            offs_pn = state_base + offs_p[:, None] * N + offs_n[None, :]  # [BLOCK_P, BLOCK_N]
            mask_pn = (offs_p < P)[:, None] & (offs_n < N)[None, :]
            xd = tl.load(x_base + offs_lp, mask=mask_lp, other=0.0).to(tl.float32) * dt[:, None]
            xd_dh += tl.dot(xd, tl.load(dh_ptr + offs_pn, mask=mask_pn, other=0.0), input_precision=PRECISION)
            dYp = tl.load(dy_base + offs_lp, mask=mask_lp, other=0.0).to(tl.float32)
            dY_h += tl.dot(dYp, tl.load(starts_ptr + offs_pn, mask=mask_pn, other=0.0), input_precision=PRECISION)
        Bc = tl.load(B_ptr + bc_base + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + bc_base + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        d_decay += tl.sum(Bc * xd_dh, axis=1)
        d_acum += e_cum * tl.sum(Cc * dY_h, axis=1)
        tl.atomic_add(dB_ptr + bc_base + offs_ln, decay_to_end[:, None] * xd_dh, mask=mask_ln, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_base + offs_ln, e_cum[:, None] * dY_h, mask=mask_ln, sem="relaxed")
    d_decay = d_decay * decay_to_end
    d_aend = tl.sum(d_decay, axis=0) + tl.load(daend_ptr + bh * n_chunks + c)
    d_acum -= d_decay
    da = tl.cumsum(d_acum, axis=0, reverse=True) + d_aend  # a_cum[i] = sum_{k <= i} a[k], a_end = sum_k a[k]
    ddt = da * A + ddt_x
    ddt = tl.where((dt_pos >= dt_min) & (dt_pos <= dt_max), ddt, 0.0)
    if SOFTPLUS:
        ddt = ddt / (1.0 + tl.exp(-dt_in))  # softplus derivative
    tl.store(ddt_ptr + (row0 + offs_l) * H + head, ddt, mask=mask_t)
    tl.store(dA_ptr + bh * n_chunks + c, tl.sum(da * dt, axis=0))
    tl.store(dD_ptr + bh * n_chunks + c, dD)
    # dC's [L, L] term dCB @ B
    YdX = _rows_gram(dy_base, x_base, offs_l, mask_t, H * P, P, L, BLOCK_P, PRECISION, OPERAND)  # dy x^T, [L(i), L(j)]
    seg = tl.exp(tl.where(offs_l[:, None] >= offs_l[None, :], a_cum[:, None] - a_cum[None, :], float("-inf")))
    dCB = YdX * (seg * dt[None, :])
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_ln = offs_l[:, None] * (G * N) + offs_n[None, :]  # [L, BLOCK_N]
        mask_ln = mask_t[:, None] & (offs_n < N)[None, :]
        Bc = tl.load(B_ptr + bc_base + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        tl.atomic_add(dC_ptr + bc_base + offs_ln, tl.dot(dCB, Bc, input_precision=PRECISION), mask=mask_ln,
                      sem="relaxed")
    # dB's [L, L] term dCB^T @ C, x dy^T recomputed. seg^T is written unlike the one above (mask operands swapped,
    # a_cum[i] + (-a_cum[j]): the same values) so the compiler does not keep that [L, L] tile live to here.
    XdY = _rows_gram(x_base, dy_base, offs_l, mask_t, H * P, P, L, BLOCK_P, PRECISION, OPERAND)  # x dy^T, [L(j), L(i)]
    seg_t = tl.exp(tl.where(offs_l[None, :] >= offs_l[:, None], a_cum[None, :] + (-a_cum)[:, None], float("-inf")))
    dCB_t = XdY * (seg_t * dt[:, None])
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_ln = offs_l[:, None] * (G * N) + offs_n[None, :]  # [L, BLOCK_N]
        mask_ln = mask_t[:, None] & (offs_n < N)[None, :]
        Cc = tl.load(C_ptr + bc_base + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        tl.atomic_add(dB_ptr + bc_base + offs_ln, tl.dot(dCB_t, Cc, input_precision=PRECISION), mask=mask_ln,
                      sem="relaxed")


class Tiles(NamedTuple):
    """Launch parameters of the SSD chunk kernels (chunk states, outputs, backward) and of the state passing."""

    L: int
    BLOCK_P: int  # head channels per chunk-state / chunk-output program
    BLOCK_N: int  # d_state block of the chunk-state and chunk-output kernels
    PRECISION: str  # of the tl.dot products of fp32 operands
    OPERAND: tl.dtype  # of the tl.dot products of 16-bit inputs alone (C B^T, x dy^T)
    launch: Launch  # chunk states and outputs
    BWD_BLOCK_P: int  # head-channel block the chunk backward loops over
    BWD_BLOCK_N: int  # its d_state block
    bwd_launch: Launch  # chunk backward
    BLOCK: int  # state entries per state-passing program
    pass_launch: Launch


# (BWD_BLOCK_P, BWD_BLOCK_N) of the chunk backward: bf16 / fp16 inputs on sm_90, everything else (tiles() says why)
_BWD_SM90_16BIT = (32, 32)
_BWD_DEFAULT = (16, 32)


def tiles(p: int, n: int, chunk_size: int, dtype: torch.dtype, target: Target) -> Tiles:
    """Chunks of ``chunk_size`` rounded to a power of two in [16, 64]. Chunk states and outputs: head channels in
    blocks of ``BLOCK_P``, 32 for bf16 / fp16 inputs, 16 for fp32 inputs (exact FMA products need more registers),
    d_state in blocks of ``BLOCK_N`` = 16 (the kernels loop over them, so the tiles do not grow with d_state); 8 warps,
    4 for fp32 inputs (at 8 ptxas kept them to 128 registers and the outputs kernel spilled on sm_80). The chunk
    backward (one program per chunk and head, 8 warps) loops over head channels in blocks of ``BWD_BLOCK_P`` and over
    d_state in blocks of ``BWD_BLOCK_N``: 16 x 32, and 32 x 32 for bf16 / fp16 inputs on sm_90, the largest that do
    not spill at L = 64 in ``python -m benchmarks.kernel_resources`` (sm_80 / 86 / 89 / 90, bf16 and fp32, head dims
    64 and 128, d_state 64 and 128). There the backward takes 244-255 registers with bf16 inputs, 231-254 with fp32,
    and 30-49 KB of shared memory; 32 x 32 spilled 56-120 B with bf16 on sm_80 / 86 / 89 and 384-440 B with fp32,
    32 x 16 40-64 B (bf16, sm_80), 16 x 64 72-712 B, 64 x 32 and 32 x 64 112-216 B (bf16, sm_90). Other targets
    get the same tiles, unmeasured. State passing: 64 entries per program (one warp), so batch 1 with 16 heads of
    ``[64, 64]`` states gets 1024 programs."""
    L = min(64, max(16, triton.next_power_of_2(chunk_size)))
    exact = dtype == torch.float32
    block_p = 16 if exact else max(16, min(triton.next_power_of_2(p), 32))
    bwd_p, bwd_n = _BWD_SM90_16BIT if not exact and target.arch == 90 else _BWD_DEFAULT
    bwd_p = max(16, min(triton.next_power_of_2(p), bwd_p))
    bwd_n = max(16, min(triton.next_power_of_2(n), bwd_n))
    return Tiles(L, block_p, 16, dot_precision(dtype, target), operand_dtype(dtype, target),
                 Launch(num_warps=4 if exact else 8, num_stages=1), bwd_p, bwd_n, Launch(num_warps=8, num_stages=1),
                 64, Launch(num_warps=1, num_stages=3))


def _chunk_args(x, B, L: int, block_p: int, index: ChunkIndex | None = None):
    """Grid of a chunk kernel ``(cdiv(T, L), B * H, cdiv(P, block_p))`` and the chunk kernels' shape arguments;
    packed documents (``index``, ``B = 1``): ``(NT, H, cdiv(P, block_p))`` over all documents' NT chunks."""
    batch, T, heads, p = x.shape
    n_chunks = triton.cdiv(T, L) if index is None else index.NT
    return (n_chunks, batch * heads, triton.cdiv(p, block_p)), (T, heads, B.shape[2], p, n_chunks)


def _varlen_args(index: ChunkIndex | None) -> tuple[tuple, dict]:
    """The chunk kernels' ``(chunk_indices, cu)`` arguments and their ``IS_VARLEN`` keyword (none without documents)."""
    return ((None, None), {}) if index is None else ((index.indices, index.cu), {"IS_VARLEN": True})


def _pass_states(states, aend, init, reverse, prev, t: Tiles, index: ChunkIndex | None = None):
    """State passing over ``states [B, H, NC, P, N]`` in place; returns (final ``[B, H, P, N]``, daend or None).
    Packed documents (``index``): ``states [1, H, NT, P, N]``, one program per document x head (x state block) from
    each document's ``init [N_docs, H, P, N]``; final ``[N_docs, H, P, N]``."""
    batch, heads, n_chunks, p, n = states.shape
    rows = batch * heads if index is None else index.N * heads  # programs on grid axis y
    grid = (triton.cdiv(p * n, t.BLOCK), rows)
    final = torch.empty(rows // heads, heads, p, n, device=states.device, dtype=torch.float32)
    daend = torch.empty(batch * heads, n_chunks, grid[0], device=states.device, dtype=torch.float32) if reverse else None
    varlen = {} if index is None else dict(H=heads, IS_VARLEN=True)
    _ssd_state_passing_kernel[grid](
        states, aend, init, states, final, prev, daend, None if index is None else index.offsets, n_chunks, p * n,
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK=t.BLOCK, **varlen, **t.pass_launch._asdict(),
    )
    return final, None if daend is None else daend.sum(2)


def _launch_forward(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_limit, chunk_size, cu_seqlens=None):
    """The three forward launches. Returns ``(y, final_state, starts [B, H, NC, P, N], aend [B, H, NC], table)``;
    packed documents (``cu_seqlens``): NC = NT of all documents, final states ``[N_docs, H, P, N]``, ``table`` the
    chunk index's device table (None without documents), which the backward reuses."""
    batch, T, heads, p = x.shape
    n = B.shape[3]
    t = tiles(p, n, chunk_size, dot_dtype(x, B, C), launch_target(x.device))
    index = None if cu_seqlens is None else chunk_index(cu_seqlens, t.L, heads, x.device)
    grid, dims = _chunk_args(x, B, t.L, t.BLOCK_P, index)
    varlen, flag = _varlen_args(index)
    limits = (float(dt_limit[0]), float(dt_limit[1]))
    states = torch.empty(batch, heads, grid[0], p, n, device=x.device, dtype=torch.float32)
    aend = torch.empty(batch, heads, grid[0], device=x.device, dtype=torch.float32)
    common = dict(N=n, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, L=t.L, BLOCK_P=t.BLOCK_P, BLOCK_N=t.BLOCK_N,
                  PRECISION=t.PRECISION, **flag, **t.launch._asdict())
    _ssd_chunk_state_kernel[grid](x, dt, A, dt_bias, B, states, aend, *varlen, *dims, *limits, GRAD=False, **common)
    final_state, _ = _pass_states(states, aend, initial_state, False, None, t, index)  # states now hold the start states
    y = torch.empty_like(x)
    _ssd_chunk_scan_kernel[grid](x, dt, A, B, C, D, dt_bias, states, y, *varlen, *dims, *limits, HAS_D=D is not None,
                                 OPERAND=t.OPERAND, **common)
    return y, final_state, states, aend, None if index is None else index.table


def _launch_backward(x, dt, A, B, C, D, dt_bias, dy, d_final, starts, aend, table, dt_softplus, dt_limit, chunk_size,
                     cu_seqlens=None):
    """The four backward launches; packed documents: the forward's chunk ``table`` reused, ``d_final`` and the
    returned initial states' gradient ``[N_docs, H, P, N]``."""
    batch, T, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    t = tiles(p, n, chunk_size, dot_dtype(x, B, C, dy), launch_target(x.device))
    index = None if cu_seqlens is None else chunk_index(cu_seqlens, t.L, heads, x.device, table)
    grid, dims = _chunk_args(x, B, t.L, t.BLOCK_P, index)
    varlen, flag = _varlen_args(index)
    limits = (float(dt_limit[0]), float(dt_limit[1]))
    f32 = dict(device=x.device, dtype=torch.float32)
    common = dict(N=n, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, L=t.L, PRECISION=t.PRECISION, **flag)
    dstates = torch.empty(batch, heads, grid[0], p, n, **f32)
    _ssd_chunk_state_kernel[grid](dy, dt, A, dt_bias, C, dstates, None, *varlen, *dims, *limits, GRAD=True,
                                  BLOCK_P=t.BLOCK_P, BLOCK_N=t.BLOCK_N, **common, **t.launch._asdict())
    dh0, daend = _pass_states(dstates, aend, d_final, True, starts, t, index)  # dstates now hold the end-state gradients
    dx = torch.empty_like(x)
    ddt = torch.empty(batch, T, heads, **f32)
    dB = torch.zeros(batch, T, groups, n, **f32)  # atomic sums over the heads of a group
    dC = torch.zeros(batch, T, groups, n, **f32)
    dA = torch.empty(batch * heads, grid[0], **f32)  # per chunk
    dD = torch.empty(batch * heads, grid[0], **f32)
    _ssd_chunk_bwd_kernel[grid[:2]](  # (cdiv(T, L), B * H); packed: (NT, H)
        x, dt, A, B, C, D, dt_bias, starts, dstates, daend, dy, dx, ddt, dB, dC, dA, dD, *varlen, *dims, *limits,
        HAS_D=D is not None, BLOCK_P=t.BWD_BLOCK_P, BLOCK_N=t.BWD_BLOCK_N, OPERAND=t.OPERAND, **common,
        **t.bwd_launch._asdict(),
    )
    dA = dA.view(batch, heads, -1).sum((0, 2))  # [B, H, cdiv(T, L)] -> [H]
    dD = dD.view(batch, heads, -1).sum((0, 2))
    dbias = ddt.sum((0, 1))  # dt + dt_bias enters the kernel as one sum
    return dx, ddt, dA, dB, dC, dD, dbias, dh0


def _state_elements(x, dt, A, B, *_):
    return x.shape[0] * x.shape[2] * x.shape[3] * B.shape[-1]  # [B, H, P, N]


SSDFn = scan_function(_launch_forward, _launch_backward, n_config=4, layout="ttpttpp", state_elements=_state_elements)


def ssd_triton(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus: bool = True, dt_limit=(0.0, float("inf")), initial_state=None,
               chunk_size: int = 64, cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.ssd.ssd_scan` (fp32, bf16 or fp16 inputs; y in x's dtype, the state fp32),
    with the dt transform computed in the kernels; ``chunk_size`` sets the kernels' chunk length (rounded to a power
    of two in [16, 64]). One token without gradients (decode) runs the step kernel (:mod:`.triton_step`), one launch.
    Packed documents (``cu_seqlens``, a :class:`~zoo.kernels.backends.CuSeqlens` over ``B = 1``; states ``[N_docs, H,
    P, N]``): one launch sequence over all of them, each document's chunks from its own start, when
    :func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch`, else one call per document.
    """
    args = (x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)  # the initial state cut to one document's
    check_ssd_shapes("ssd_triton", *one[:7], one[9], chunk_size)
    inputs = (x, dt, A, B, C, D, dt_bias, initial_state)
    step = x.shape[1] == 1 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs))
    n = x.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
    if cu_seqlens is not None and not step:
        L = tiles(x.shape[3], B.shape[3], chunk_size, dot_dtype(x, B, C), launch_target(x.device)).L
        if not chunk_varlen_in_one_launch(cu_seqlens, _state_elements(x, dt, A, B), L, x.shape[2]):
            return BACKENDS.per_document(ssd_triton, args, cu_seqlens)
    # the chunk kernels put B * H in grid y (packed: the state passing N_docs * H); the step kernel in x
    check_triton_call("ssd_triton", _ssd_chunk_scan_kernel, *inputs, batch_heads=None if step else n * x.shape[2])
    if step:
        from .triton_step import ssd_step_triton

        return ssd_step_triton(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state)
    return SSDFn.apply(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, tuple(dt_limit), chunk_size, cu_seqlens)
