"""Triton one-token selective-scan step (Mamba-1 decode; mamba-ssm's ``selective_state_update``), the dt
preprocessing and the gate fused in: ``dt = softplus(delta + delta_bias)``, ``h = exp(dt A) h + dt u B``,
``y = (C h + D u) * silu(z)`` (each of delta_bias, softplus, D and z optional). One program per (batch, block of
``BLOCK_D`` channels) holds its ``[BLOCK_D, N]`` rows of the fp32 state; it reads them from ``state`` and writes them
to ``out_state``, which may be ``state`` itself (an update in place). Inputs are read through their strides (the
Mamba block's u, z, B and C are column slices of one projection), so a call makes no copies, no host syncs and no
allocation beyond ``y`` (and ``out_state`` when not given): capturable in a CUDA graph. Forward only; no autograd.
Softplus and sigmoid are written inline, as in :mod:`.triton_scan`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zoo.kernels.selective_scan import check_scan_shapes
from zoo.kernels.triton_common import Launch, check_triton_call, device_guard


@triton.jit
def _selective_scan_step_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, state_ptr, out_state_ptr, y_ptr,
    DIM, N,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_z_b, stride_z_d,
    stride_B_b, stride_B_n, stride_C_b, stride_C_n, stride_A_d, stride_A_n,
    stride_state_b, stride_state_d, stride_state_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B, cdiv(D, BLOCK_D))``: program ``(b, i)`` updates ``state[b, i * BLOCK_D:(i + 1) * BLOCK_D, :]`` and
    writes those channels of ``y [B, D]``. u, delta, z ``[B, D]``, B, C ``[B, N]``, A ``[D, N]``, state ``[B, D, N]``
    (any strides); D, delta_bias ``[D]`` and ``out_state [B, D, N]`` fp32 contiguous; y ``[B, D]`` contiguous."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]
    u = tl.load(u_ptr + pid_b * stride_u_b + offs_d * stride_u_d, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    dt = tl.load(delta_ptr + pid_b * stride_delta_b + offs_d * stride_delta_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + pid_b * stride_B_b + offs_n * stride_B_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
    c = tl.load(C_ptr + pid_b * stride_C_b + offs_n * stride_C_n, mask=mask_n, other=0.0).to(tl.float32)
    h = (dt * u)[:, None] * b[None, :]  # [BLOCK_D, BLOCK_N]
    if HAS_STATE:
        state_offs = pid_b * stride_state_b + offs_d[:, None] * stride_state_d + offs_n[None, :] * stride_state_n
        h += tl.exp(dt[:, None] * A) * tl.load(state_ptr + state_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_state_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask)
    y = tl.sum(h * c[None, :], axis=1)  # [BLOCK_D]
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_z_b + offs_d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z / (1.0 + tl.exp(-z))  # silu
    tl.store(y_ptr + pid_b * DIM + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


class StepTiles(NamedTuple):
    """Launch parameters of the step kernel."""

    BLOCK_D: int
    BLOCK_N: int
    launch: Launch


def step_tiles(dim: int, n: int) -> StepTiles:
    """The whole (power-of-two padded) state width and channels up to 128 state entries a program, one warp per 128
    entries (at N = 16: 8 channels, 1 warp, 256 programs at batch 1 and d_inner 2048, where mamba-ssm's blocks of
    32 run 64). A decode step reads each state entry once, so small programs spread that read over more SMs."""
    block_n = triton.next_power_of_2(n)
    block_d = min(triton.next_power_of_2(dim), max(1, 128 // block_n))
    return StepTiles(block_d, block_n, Launch(num_warps=max(1, min(8, block_d * block_n // 128)), num_stages=1))


def _strides(t: torch.Tensor | None, dims: int = 2) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


def selective_scan_step_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True,
                               initial_state=None, out_state: torch.Tensor | None = None):
    """One token of :func:`zoo.kernels.selective_scan.selective_scan` (u, delta, z ``[B, 1, D]``, B, C ``[B, 1, N]``,
    A ``[D, N]``, D, delta_bias ``[D]``, initial_state ``[B, D, N]`` or None; any strides) in one launch.
    ``out_state`` (contiguous fp32 ``[B, D, N]``; None: a new tensor) receives the new state and may be
    ``initial_state`` itself to update it in place. Returns ``(y [B, 1, D] in u's dtype, out_state)``. No gradients."""
    check_scan_shapes("selective_scan_step_triton", u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_triton_call("selective_scan_step_triton", _selective_scan_step_kernel, u, delta, A, B, C, D, z, delta_bias,
                      initial_state)
    batch, T, dim = u.shape
    n = A.shape[1]
    if T != 1:
        raise ValueError(f"selective_scan_step_triton: one token at a time, got T={T}; use selective_scan")
    shape = (batch, dim, n)
    if out_state is None:
        out_state = torch.empty(shape, dtype=torch.float32, device=u.device)
    elif out_state.shape != shape or out_state.dtype != torch.float32 or not out_state.is_contiguous():
        raise ValueError(f"selective_scan_step_triton: out_state must be contiguous float32 {list(shape)}, got "
                         f"{out_state.dtype} {list(out_state.shape)}")
    D, delta_bias = (None if t is None else t.contiguous() for t in (D, delta_bias))
    y = torch.empty(batch, 1, dim, dtype=u.dtype, device=u.device)
    t = step_tiles(dim, n)
    # [B, 1, X] -> [B, X] views: the kernels read batch and channel strides
    u0, delta0, z0, B0, C0 = (None if x is None else x[:, 0] for x in (u, delta, z, B, C))
    with device_guard(u.device):
        _selective_scan_step_kernel[(batch, triton.cdiv(dim, t.BLOCK_D))](
            u0, delta0, A, B0, C0, D, z0, delta_bias, initial_state, out_state, y,
            dim, n, *_strides(u0), *_strides(delta0), *_strides(z0), *_strides(B0), *_strides(C0), *_strides(A),
            *_strides(initial_state, 3),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_STATE=initial_state is not None, SOFTPLUS=delta_softplus, BLOCK_D=t.BLOCK_D, BLOCK_N=t.BLOCK_N,
            **t.launch._asdict(),
        )
    return y, out_state
