"""Triton SSD scan (Mamba-2), forward and backward: chunked (Dao & Gu 2024, Section 6), dt preprocessing fused in.

One program per (batch, head, block of ``BLOCK_P`` head channels) walks the chunks of ``L`` steps in order with the
state ``[BLOCK_P, N]`` in registers. Inside a chunk, with ``a_cum`` the cumulative log-decay, the outputs are the
quadratic form ``((C B^T) * exp(segsum)) @ (dt x)`` plus the start state read out by ``C``, all ``tl.dot`` on
``[L, L]`` / ``[L, N]`` tiles; the state moves to the next chunk in one update. The forward writes each chunk's start
state (``T / L`` states); the backward walks the chunks in reverse from those, carrying the state's gradient.
Per-step reductions over head channels (dB, dC, ddt) are written per channel block and summed in PyTorch.
Softplus and sigmoid are written inline: a nested ``@triton.jit`` call makes the interpreter re-patch triton.language.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.triton_checks import Launch, Target, check_triton_inputs, launch_target

from .checks import check_ssd_shapes


@triton.jit
def _ssd_chunk_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, ckpt_ptr,
    T, H, G, P, n_chunks, dt_min, dt_max, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B, H, cdiv(P, BLOCK_P))``: program ``(b, h, i)`` walks the ``cdiv(T, L)`` chunks with the state
    rows of head channels ``[i * BLOCK_P, (i + 1) * BLOCK_P)`` of batch ``b``, head ``h``."""
    pid_b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    group = head // (H // G)
    offs_l = tl.arange(0, L)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    causal = offs_l[:, None] >= offs_l[None, :]  # [L, L]: step i sees step j <= i
    state_offs = offs_p[:, None] * N + offs_n[None, :]  # [BLOCK_P, BLOCK_N]
    bh = pid_b * H + head
    A = tl.load(A_ptr + head).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + head).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    # element offsets inside one chunk (int32; the chunk's first row goes into the scalar base pointer)
    offs_lp = offs_l[:, None] * (H * P) + offs_p[None, :]  # [L, BLOCK_P] of x / y
    offs_ln = offs_l[:, None] * (G * N) + offs_n[None, :]  # [L, BLOCK_N] of B / C
    h = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + bh * P * N + state_offs, mask=mask_pn, other=0.0).to(tl.float32)
    for c in range(n_chunks):
        tl.store(ckpt_ptr + (bh * n_chunks + c) * P * N + state_offs, h, mask=mask_pn)
        t = c * L + offs_l
        mask_t = t < T
        row0 = pid_b * T + c * L  # the chunk's first row of [B * T]
        dt = tl.load(dt_ptr + (row0 + offs_l) * H + head, mask=mask_t, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
        dt = tl.where(mask_t, tl.minimum(tl.maximum(dt, dt_min), dt_max), 0.0)  # steps past T leave the state alone
        a = dt * A  # [L] log-decays
        a_cum = tl.sum(tl.where(causal, a[None, :], 0.0), axis=1)  # [L] inclusive cumulative sum
        a_end = tl.sum(a, axis=0)
        X = tl.load(x_ptr + (row0 * H + head) * P + offs_lp, mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        Bc = tl.load(B_ptr + (row0 * G + group) * N + offs_ln, mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + (row0 * G + group) * N + offs_ln, mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        xd = X * dt[:, None]  # [L, BLOCK_P]
        seg = tl.exp(tl.where(causal, a_cum[:, None] - a_cum[None, :], float("-inf")))  # [L, L] decay j -> i
        scores = tl.dot(Cc, tl.trans(Bc), input_precision="ieee") * seg  # [L, L]
        y = tl.dot(scores, xd, input_precision="ieee")
        y += tl.exp(a_cum)[:, None] * tl.dot(Cc, tl.trans(h), input_precision="ieee") + Dv * X  # [L, BLOCK_P]
        tl.store(y_ptr + (row0 * H + head) * P + offs_lp, y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_p[None, :])
        decay_to_end = tl.exp(a_end - a_cum)  # [L]
        h = tl.exp(a_end) * h + tl.dot(tl.trans(xd * decay_to_end[:, None]), Bc, input_precision="ieee")
    tl.store(hT_ptr + bh * P * N + state_offs, h, mask=mask_pn)


@triton.jit
def _ssd_chunk_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, ckpt_ptr, dy_ptr, dhT_ptr,
    dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dh0_ptr,
    T, H, G, P, n_chunks, dt_min, dt_max, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr, SOFTPLUS: tl.constexpr,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B, H, cdiv(P, BLOCK_P))``, the forward's: program ``(b, h, i)`` walks the chunks in reverse."""
    pid_b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    pid_p = tl.program_id(2)
    n_pblocks = tl.num_programs(2)
    group = head // (H // G)
    offs_l = tl.arange(0, L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    causal = offs_l[:, None] >= offs_l[None, :]
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    bh = pid_b * H + head
    part = bh * n_pblocks + pid_p  # index of this program's partial sums
    A = tl.load(A_ptr + head).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + head).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head).to(tl.float32)
    # element offsets inside one chunk (int32; the chunk's first row goes into the scalar base pointer)
    offs_lp = offs_l[:, None] * (H * P) + offs_p[None, :]  # [L, BLOCK_P] of x / dy / dx
    offs_ln = offs_l[:, None] * (G * N) + offs_n[None, :]  # [L, BLOCK_N] of B / C
    offs_part = offs_l[:, None] * N + offs_n[None, :]  # [L, BLOCK_N] of this program's dB / dC partial sums
    dh = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)  # gradient of the state at the end of the current chunk
    if HAS_DHT:
        dh = tl.load(dhT_ptr + bh * P * N + state_offs, mask=mask_pn, other=0.0).to(tl.float32)
    dA = tl.sum(tl.zeros([L], tl.float32), axis=0)  # fp32 scalars carried through the loop
    dD = dA
    for ci in range(n_chunks):
        c = n_chunks - 1 - ci
        # recompute the chunk's forward quantities
        h = tl.load(ckpt_ptr + (bh * n_chunks + c) * P * N + state_offs, mask=mask_pn, other=0.0)  # state at chunk start
        t = c * L + offs_l
        mask_t = t < T
        mask_lp = mask_t[:, None] & mask_p[None, :]
        mask_ln = mask_t[:, None] & mask_n[None, :]
        row0 = pid_b * T + c * L  # the chunk's first row of [B * T]
        dt_in = tl.load(dt_ptr + (row0 + offs_l) * H + head, mask=mask_t, other=0.0).to(tl.float32) + bias
        dt_pos = dt_in
        if SOFTPLUS:
            dt_pos = tl.where(dt_in > 20.0, dt_in, tl.log(1.0 + tl.exp(tl.minimum(dt_in, 20.0))))  # softplus
        dt = tl.where(mask_t, tl.minimum(tl.maximum(dt_pos, dt_min), dt_max), 0.0)
        a = dt * A
        a_cum = tl.sum(tl.where(causal, a[None, :], 0.0), axis=1)
        a_end = tl.sum(a, axis=0)
        X = tl.load(x_ptr + (row0 * H + head) * P + offs_lp, mask=mask_lp, other=0.0).to(tl.float32)
        Bc = tl.load(B_ptr + (row0 * G + group) * N + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + (row0 * G + group) * N + offs_ln, mask=mask_ln, other=0.0).to(tl.float32)
        dY = tl.load(dy_ptr + (row0 * H + head) * P + offs_lp, mask=mask_lp, other=0.0).to(tl.float32)
        xd = X * dt[:, None]
        seg = tl.exp(tl.where(causal, a_cum[:, None] - a_cum[None, :], float("-inf")))
        CB = tl.dot(Cc, tl.trans(Bc), input_precision="ieee")  # [L, L]
        e_cum = tl.exp(a_cum)
        e_end = tl.exp(a_end)
        decay_to_end = tl.exp(a_end - a_cum)
        dD += tl.sum(tl.sum(dY * X, axis=1), axis=0)
        # dC and dB are stored as soon as they are complete and h is not needed past d_aend (fewer live registers);
        # the reductions over head channels go through the [L, BLOCK_N] products that dC and dB need anyway:
        # sum_p dY (C h^T) = sum_n C (dY h) and sum_p xd (B dh^T) = sum_n B (xd dh).
        # y_off = exp(a_cum) * (C @ h_start^T)
        dY_h = tl.dot(dY, h, input_precision="ieee")  # [L, BLOCK_N]
        d_aend = e_end * tl.sum(tl.sum(dh * h, axis=1), axis=0)  # the last use of h
        d_acum = e_cum * tl.sum(Cc * dY_h, axis=1)
        dC = e_cum[:, None] * dY_h
        # y_diag = (CB * seg) @ xd
        dCB = tl.dot(dY, tl.trans(xd), input_precision="ieee") * seg  # [L, L]
        dC += tl.dot(dCB, Bc, input_precision="ieee")
        tl.store(dC_ptr + (part * T + c * L) * N + offs_part, dC, mask=mask_ln)
        dseg = dCB * CB  # gradient of the log-decay difference a_cum[i] - a_cum[j]
        d_acum += tl.sum(dseg, axis=1) - tl.sum(dseg, axis=0)
        # h_end = exp(a_end) h_start + (xd * decay_to_end)^T @ B
        xd_dh = tl.dot(xd, dh, input_precision="ieee")  # [L, BLOCK_N]
        d_decay = tl.sum(Bc * xd_dh, axis=1) * decay_to_end  # [L]
        dB = tl.dot(tl.trans(dCB), Cc, input_precision="ieee") + decay_to_end[:, None] * xd_dh
        tl.store(dB_ptr + (part * T + c * L) * N + offs_part, dB, mask=mask_ln)
        dxd = tl.dot(tl.trans(CB * seg), dY, input_precision="ieee")  # [L, BLOCK_P]
        dxd += decay_to_end[:, None] * tl.dot(Bc, tl.trans(dh), input_precision="ieee")
        d_aend += tl.sum(d_decay, axis=0)
        d_acum -= d_decay
        dh = e_end * dh + tl.dot(tl.trans(dY * e_cum[:, None]), Cc, input_precision="ieee")  # at the chunk start
        # a_cum[i] = sum_{k <= i} a[k] and a_end = sum_k a[k]
        da = tl.sum(tl.where(causal, d_acum[:, None], 0.0), axis=0) + d_aend  # [L]
        ddt = da * A + tl.sum(dxd * X, axis=1)
        dA += tl.sum(da * dt, axis=0)
        dX = dY * Dv + dxd * dt[:, None]
        ddt = tl.where(mask_t & (dt_pos >= dt_min) & (dt_pos <= dt_max), ddt, 0.0)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-dt_in))  # softplus derivative
        tl.store(dx_ptr + (row0 * H + head) * P + offs_lp, dX.to(dx_ptr.dtype.element_ty), mask=mask_lp)
        tl.store(ddt_ptr + part * T + t, ddt, mask=mask_t)
    tl.store(dh0_ptr + bh * P * N + state_offs, dh, mask=mask_pn)
    tl.store(dA_ptr + part, dA)
    tl.store(dD_ptr + part, dD)


class Tiles(NamedTuple):
    """Launch parameters of the SSD kernels (forward and backward)."""

    BLOCK_P: int
    BLOCK_N: int
    launch: Launch


def tiles(p: int, n: int, dtype: torch.dtype, target: Target) -> Tiles:
    """Tiles of at least 16 (the smallest ``tl.dot`` operand), at most 1024 state entries per program (head channels
    are split over programs), 8 warps, no software pipelining. The same on every target and input dtype: no spills
    at d_state 64 on sm_80 / 86 / 89 / 90 (benchmarks/kernel_resources.py); at d_state 128 the kernels spill at
    L = 32 and not at L = 16 (chunk_size 16; measured on sm_90)."""
    block_n = max(16, triton.next_power_of_2(n))
    block_p = max(16, min(triton.next_power_of_2(p), 1024 // block_n))
    return Tiles(block_p, block_n, Launch(num_warps=8, num_stages=1))


def chunk_length(chunk_size: int) -> int:
    """Kernel chunk length: ``chunk_size`` rounded up to a power of two in [16, 32] (it only changes speed and memory)."""
    return min(32, max(16, triton.next_power_of_2(chunk_size)))


def _launch_forward(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_limit, chunk):
    batch, T, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    t = tiles(p, n, x.dtype, launch_target(x.device))
    block_p, block_n = t.BLOCK_P, t.BLOCK_N
    n_chunks = -(-T // chunk)
    y = torch.empty_like(x)
    final_state = torch.empty(batch, heads, p, n, device=x.device, dtype=torch.float32)
    ckpt = torch.empty(batch, heads, n_chunks, p, n, device=x.device, dtype=torch.float32)  # state before each chunk
    _ssd_chunk_fwd_kernel[(batch, heads, triton.cdiv(p, block_p))](
        x, dt, A, B, C, D, dt_bias, initial_state, y, final_state, ckpt,
        T, heads, groups, p, n_chunks, float(dt_limit[0]), float(dt_limit[1]), N=n,
        HAS_D=D is not None, HAS_BIAS=dt_bias is not None, HAS_H0=initial_state is not None, SOFTPLUS=dt_softplus,
        L=chunk, BLOCK_P=block_p, BLOCK_N=block_n, **t.launch._asdict(),
    )
    return y, final_state, ckpt


def _launch_backward(x, dt, A, B, C, D, dt_bias, ckpt, dy, d_final, dt_softplus, dt_limit, chunk):
    batch, T, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    t = tiles(p, n, x.dtype, launch_target(x.device))
    block_p, block_n = t.BLOCK_P, t.BLOCK_N
    n_pblocks = triton.cdiv(p, block_p)
    n_chunks = ckpt.shape[2]
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    ddt = torch.empty(batch, heads, n_pblocks, T, **f32)  # partial sums per channel block
    dB = torch.empty(batch, heads, n_pblocks, T, n, **f32)
    dC = torch.empty(batch, heads, n_pblocks, T, n, **f32)
    dA, dD = (torch.empty(batch, heads, n_pblocks, **f32) for _ in range(2))
    dh0 = torch.empty(batch, heads, p, n, **f32)
    _ssd_chunk_bwd_kernel[(batch, heads, n_pblocks)](
        x, dt, A, B, C, D, dt_bias, ckpt, dy, d_final,
        dx, ddt, dA, dB, dC, dD, dh0,
        T, heads, groups, p, n_chunks, float(dt_limit[0]), float(dt_limit[1]), N=n,
        HAS_D=D is not None, HAS_BIAS=dt_bias is not None, HAS_DHT=d_final is not None, SOFTPLUS=dt_softplus,
        L=chunk, BLOCK_P=block_p, BLOCK_N=block_n, **t.launch._asdict(),
    )
    ddt = ddt.sum(2)  # [B, H, T]
    dbias = ddt.sum((0, 2))  # dt + dt_bias enters the kernel as one sum
    # heads of one group share B and C: [B, H, pblocks, T, N] -> [B, T, G, N]
    dB = dB.sum(2).view(batch, groups, heads // groups, T, n).sum(2).transpose(1, 2)
    dC = dC.sum(2).view(batch, groups, heads // groups, T, n).sum(2).transpose(1, 2)
    return dx, ddt.transpose(1, 2), dA.sum((0, 2)), dB, dC, dD.sum((0, 2)), dbias, dh0


class SSDFn(torch.autograd.Function):
    """Autograd wrapper: chunked Triton forward and backward; the chunk start states are saved between them."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_limit, chunk):
        x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
        D, dt_bias, initial_state = (None if t is None else t.contiguous() for t in (D, dt_bias, initial_state))
        y, final_state, ckpt = _launch_forward(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_limit, chunk)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, ckpt)
        ctx.dt_softplus, ctx.dt_limit, ctx.chunk = dt_softplus, dt_limit, chunk
        ctx.has_initial_state = initial_state is not None
        return y, final_state

    @staticmethod
    def backward(ctx, dy, d_final):
        x, dt, A, B, C, D, dt_bias, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        d_final = None if d_final is None else d_final.contiguous()
        dx, ddt, dA, dB, dC, dD, dbias, dh0 = _launch_backward(
            x, dt, A, B, C, D, dt_bias, ckpt, dy, d_final, ctx.dt_softplus, ctx.dt_limit, ctx.chunk
        )
        return (
            dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.to(D.dtype),
            None if dt_bias is None else dbias.to(dt_bias.dtype),
            dh0 if ctx.has_initial_state else None,
            None, None, None,
        )


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton SSD ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t`` with
    ``dt = clamp(softplus(dt + dt_bias), *dt_limit)`` computed in the kernel.

    Same contract as :func:`zoo.kernels.ssd.ssd_scan`: x ``[B, T, H, P]``; dt ``[B, T, H]``; A, D, dt_bias ``[H]``;
    B, C ``[B, T, G, N]`` (G divides H); initial_state ``[B, H, P, N]`` (None: zeros); fp32, bf16 or fp16.
    ``chunk_size`` sets the kernel's chunk length (rounded to a power of two in [16, 32]).
    Returns ``(y [B, T, H, P] in x's dtype, final_state [B, H, P, N] fp32)``; every input gets a gradient.
    """
    check_ssd_shapes("ssd_triton", x, dt, A, B, C, D, dt_bias, initial_state, chunk_size)
    check_triton_inputs("ssd_triton", _ssd_chunk_fwd_kernel, x, dt, A, B, C, D, dt_bias, initial_state)
    return SSDFn.apply(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, tuple(dt_limit), chunk_length(chunk_size))
