"""Triton selective scan (Mamba-1), forward and backward: a fused recurrent kernel.

Forward: one program per (batch, block of ``BLOCK_D`` channels) keeps the state ``[BLOCK_D, N]`` in registers and
walks the sequence, writing the state every ``chunk`` steps to a checkpoint buffer (``T / chunk`` states).
Backward: the same programs walk the chunks in reverse; each chunk's states are recomputed from its checkpoint into
a per-program scratch buffer (``chunk + 1`` states), then the adjoint ``dh`` runs back through the chunk.
Memory is ``O(T / chunk + chunk)`` states per program instead of ``O(T)``; all arithmetic is fp32.
The time loop stays sequential (as in mamba-ssm's CUDA kernel); the parallelism is batch x channel blocks of
``BLOCK_D`` channels, small enough that batch 1 fills a GPU. ``dB`` and ``dC`` (reductions over all channels) are
accumulated with fp32 atomic adds, so their last bits depend on the order the programs run in.
Softplus and sigmoid are written inline: a nested ``@triton.jit`` call makes the interpreter re-patch triton.language.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.selective_scan import check_scan_shapes
from zoo.kernels.triton_common import Launch, Target, check_triton_call, launch_target, scan_function


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, ckpt_ptr,
    T, DIM, N, n_chunks, chunk,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B, cdiv(D, BLOCK_D))``: program ``(b, i)`` walks the sequence with the state rows of channels
    ``[i * BLOCK_D, (i + 1) * BLOCK_D)`` of batch ``b``."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    state_offs = offs_d[:, None] * N + offs_n[None, :]  # [BLOCK_D, BLOCK_N]
    A = tl.load(A_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * DIM * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    for c in range(n_chunks):
        tl.store(ckpt_ptr + (pid_b * n_chunks + c) * DIM * N + state_offs, h, mask=mask_dn)
        for t in range(c * chunk, tl.minimum(c * chunk + chunk, T)):
            row = pid_b * T + t
            u = tl.load(u_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
            Bt = tl.load(B_ptr + row * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + row * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u  # [BLOCK_D]
            if HAS_Z:
                z = tl.load(z_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z / (1.0 + tl.exp(-z))
            tl.store(y_ptr + row * DIM + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(hT_ptr + pid_b * DIM * N + state_offs, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dy_ptr, dhT_ptr,
    scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    T, DIM, N, n_chunks, chunk,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B, cdiv(D, BLOCK_D))``, the forward's: program ``(b, i)`` walks its checkpoints in reverse.
    dB, dC ``[B, T, N]`` fp32, zero-initialised: every program adds its channels' sum with ``tl.atomic_add``."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_offs = offs_d[:, None] * N + offs_n[None, :]  # [BLOCK_D, BLOCK_N]
    block_offs = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]  # within this program's scratch slot
    scratch = scratch_ptr + (pid_b * n_dblocks + pid_d) * (chunk + 1) * BLOCK_D * BLOCK_N
    A = tl.load(A_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dh = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    if HAS_DHT:
        dh = tl.load(dhT_ptr + pid_b * DIM * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    dA = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD = tl.zeros([BLOCK_D], tl.float32)
    dbias = tl.zeros([BLOCK_D], tl.float32)
    for ci in range(n_chunks):
        c = n_chunks - 1 - ci
        t0 = c * chunk
        t1 = tl.minimum(t0 + chunk, T)
        # 1. recompute the chunk's states: slot 0 holds the state before step t0, slot k + 1 the state after t0 + k
        h = tl.load(ckpt_ptr + (pid_b * n_chunks + c) * DIM * N + state_offs, mask=mask_dn, other=0.0)
        tl.store(scratch + block_offs, h)
        for t in range(t0, t1):
            row = pid_b * T + t
            u = tl.load(u_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
            Bt = tl.load(B_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (t - t0 + 1) * BLOCK_D * BLOCK_N + block_offs, h)
        tl.debug_barrier()
        # 2. run the adjoint back through the chunk
        h_t = h
        for tt in range(0, t1 - t0):
            t = t1 - 1 - tt
            row = pid_b * T + t
            h_prev = tl.load(scratch + (t - t0) * BLOCK_D * BLOCK_N + block_offs)
            u = tl.load(u_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dt_in = tl.load(delta_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32) + bias
            dt = dt_in
            if SOFTPLUS:
                dt = tl.where(dt_in > 20.0, dt_in, tl.log(1.0 + tl.exp(tl.minimum(dt_in, 20.0))))  # softplus
            Bt = tl.load(B_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + row * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                y = tl.sum(h_t * Ct[None, :], axis=1) + Dv * u
                sig = 1.0 / (1.0 + tl.exp(-z))
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + row * DIM + offs_d, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z * sig
            dD += dy * u
            dh += dy[:, None] * Ct[None, :]
            tl.atomic_add(dC_ptr + row * N + offs_n, tl.sum(dy[:, None] * h_t, axis=0), mask=mask_n, sem="relaxed")
            decay = tl.exp(dt[:, None] * A)  # [BLOCK_D, BLOCK_N]
            d_decay = dh * h_prev * decay
            dh_B = tl.sum(dh * Bt[None, :], axis=1)  # [BLOCK_D]
            ddt = tl.sum(d_decay * A, axis=1) + dh_B * u
            dA += d_decay * dt[:, None]
            du = dy * Dv + dh_B * dt
            tl.atomic_add(dB_ptr + row * N + offs_n, tl.sum(dh * (dt * u)[:, None], axis=0), mask=mask_n, sem="relaxed")
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-dt_in))  # softplus derivative
            dbias += ddt
            tl.store(du_ptr + row * DIM + offs_d, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + row * DIM + offs_d, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            dh = dh * decay
            h_t = h_prev
        tl.debug_barrier()
    tl.store(dh0_ptr + pid_b * DIM * N + state_offs, dh, mask=mask_dn)
    tl.store(dA_ptr + pid_b * DIM * N + state_offs, dA, mask=mask_dn)
    tl.store(dD_ptr + pid_b * DIM + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + pid_b * DIM + offs_d, dbias, mask=mask_d)


class Tiles(NamedTuple):
    """Launch parameters of the selective-scan kernels (forward and backward: the backward's grid is the forward's)."""

    BLOCK_D: int
    BLOCK_N: int
    launch: Launch


def tiles(dim: int, n: int, dtype: torch.dtype, target: Target) -> Tiles:
    """Tiny channel blocks (32 state entries per program, one per thread of one warp; at N > 32 one channel and
    ``N / 32`` warps): the time loop is sequential, so parallelism comes from batch x channel blocks. At batch 1,
    d_inner 2048, N 16 that is 1024 programs (7.8 per H100 SM; 512 at BLOCK_D 4 would be under 4 per SM), at
    d_inner 1536 768. The same on every target and input dtype."""
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(triton.next_power_of_2(dim), 32 // block_n))
    return Tiles(block_d, block_n, Launch(num_warps=max(1, min(8, block_d * block_n // 32)), num_stages=3))


def _checkpoint_interval(T: int, chunk_size: int | None) -> int:
    return max(1, chunk_size or min(256, triton.next_power_of_2(math.ceil(math.sqrt(max(T, 1))))))


def _launch_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
    batch, T, dim = u.shape
    n = A.shape[1]
    t = tiles(dim, n, u.dtype, launch_target(u.device))
    block_d, block_n = t.BLOCK_D, t.BLOCK_N
    n_chunks = -(-T // chunk)
    y = torch.empty_like(u)
    final_state = torch.empty(batch, dim, n, device=u.device, dtype=torch.float32)
    ckpt = torch.empty(batch, n_chunks, dim, n, device=u.device, dtype=torch.float32)  # state before each chunk
    grid = (batch, triton.cdiv(dim, block_d))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, y, final_state, ckpt,
        T, dim, n, n_chunks, chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, **t.launch._asdict(),
    )
    return y, final_state, ckpt


def _launch_backward(u, delta, A, B, C, D, z, delta_bias, dy, d_final, ckpt, delta_softplus, chunk):
    batch, T, dim = u.shape
    n = A.shape[1]
    t = tiles(dim, n, u.dtype, launch_target(u.device))
    block_d, block_n = t.BLOCK_D, t.BLOCK_N
    n_dblocks = triton.cdiv(dim, block_d)
    n_chunks = ckpt.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    scratch = torch.empty(batch, n_dblocks, chunk + 1, block_d, block_n, **f32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, dim, n, **f32)
    dB = torch.zeros(batch, T, n, **f32)  # atomic sums over channel blocks
    dC = torch.zeros(batch, T, n, **f32)
    dD, dbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
    dh0 = torch.empty(batch, dim, n, **f32)
    _selective_scan_bwd_kernel[(batch, n_dblocks)](
        u, delta, A, B, C, D, z, delta_bias, ckpt, dy, d_final,
        scratch, du, ddelta, dz, dA, dB, dC, dD, dbias, dh0,
        T, dim, n, n_chunks, chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DHT=d_final is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_N=block_n, **t.launch._asdict(),
    )
    return du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0


SelectiveScanFn = scan_function(_launch_forward, _launch_backward, n_config=2, layout="ttpttptp",
                                state_elements=lambda u, delta, A, *_: u.shape[0] * A.numel())  # [B, D, N]


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True, initial_state=None, chunk_size: int | None = None):
    """Same contract as :func:`zoo.kernels.selective_scan.selective_scan` (fp32, bf16 or fp16 inputs; y in u's dtype,
    the state fp32); ``chunk_size`` is the checkpoint interval of the backward (None: ``sqrt(T)`` rounded up to a
    power of 2). One token without gradients (decode) runs the step kernel (:mod:`.triton_step`), one launch."""
    check_scan_shapes("selective_scan_triton", u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_triton_call("selective_scan_triton", _selective_scan_fwd_kernel, u, delta, A, B, C, D, z, delta_bias, initial_state)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.shape[1] == 1 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        from .triton_step import selective_scan_step_triton

        return selective_scan_step_triton(*inputs[:8], delta_softplus, initial_state)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"selective_scan_triton: chunk_size must be >= 1, got {chunk_size}")
    chunk = _checkpoint_interval(u.shape[1], chunk_size)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk)
