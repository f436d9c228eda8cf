"""Triton one-token SSD step (Mamba-2 decode; mamba-ssm's ``selective_state_update`` structure), the dt
preprocessing fused in: ``dt = clamp(softplus(dt + dt_bias), *dt_limit)``, ``h = exp(dt A) h + dt x B^T``,
``y = h C + D x``. One program per (batch x head, block of ``BLOCK_P`` head channels) holds its ``[BLOCK_P, N]`` rows
of the fp32 state; it reads them from ``state`` and writes them to ``out_state``, which may be ``state`` itself (an
update in place, no allocation: capturable in a CUDA graph). Forward only (decode); no autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.ssd import check_ssd_shapes
from zoo.kernels.triton_common import check_triton_call, device_guard


@triton.jit
def _ssd_step_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, C_ptr, D_ptr, state_ptr, out_state_ptr, y_ptr,
    H, G, P, N, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_STATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(B * H, cdiv(P, BLOCK_P))``: program ``(b * H + h, i)`` updates ``state[b, h, i * BLOCK_P:(i + 1) *
    BLOCK_P, :]`` and writes those channels of ``y [B, H, P]``. x ``[B, H, P]``, dt ``[B, H]``, B, C ``[B, G, N]``,
    states ``[B, H, P, N]`` fp32, all contiguous."""
    bh = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_b = bh // H
    head = (bh % H).to(tl.int32)
    group = head // (H // G)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + head).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # softplus
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(A_ptr + head).to(tl.float32))
    x = tl.load(x_ptr + bh * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)  # [BLOCK_P]
    row = (pid_b * G + group) * N
    b = tl.load(B_ptr + row + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
    c = tl.load(C_ptr + row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    offs = (bh * P + offs_p[:, None]) * N + offs_n[None, :]
    mask = mask_p[:, None] & mask_n[None, :]
    h = (dt * x)[:, None] * b[None, :]  # [BLOCK_P, BLOCK_N]
    if HAS_STATE:
        h += decay * tl.load(state_ptr + offs, mask=mask, other=0.0)
    tl.store(out_state_ptr + offs, h, mask=mask)
    y = tl.sum(h * c[None, :], axis=1)  # [BLOCK_P]
    if HAS_D:
        y += tl.load(D_ptr + head).to(tl.float32) * x
    tl.store(y_ptr + bh * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def step_blocks(p: int, n: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_N)``: the whole (power-of-two padded) state width, and head channels up to 4096 state entries
    a program (``[16, 256]`` at N = 256, ``[32, 128]`` at N = 128)."""
    block_n = triton.next_power_of_2(n)
    return min(triton.next_power_of_2(p), max(1, 4096 // block_n)), block_n


def ssd_step_triton(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus: bool = True, dt_limit=(0.0, float("inf")),
                    initial_state=None, out_state: torch.Tensor | None = None):
    """One token of :func:`zoo.kernels.ssd.ssd_scan` (x ``[B, 1, H, P]``, dt ``[B, 1, H]``, B, C ``[B, 1, G, N]``,
    initial_state ``[B, H, P, N]`` or None) in one launch. ``out_state`` (contiguous fp32 ``[B, H, P, N]``; None: a new
    tensor) receives the new state and may be ``initial_state`` itself to update it in place.
    Returns ``(y [B, 1, H, P] in x's dtype, out_state)``. No gradients (decode)."""
    check_ssd_shapes("ssd_step_triton", x, dt, A, B, C, D, dt_bias, initial_state, 1)
    check_triton_call("ssd_step_triton", _ssd_step_kernel, x, dt, A, B, C, D, dt_bias, initial_state)
    batch, T, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    if T != 1:
        raise ValueError(f"ssd_step_triton: one token at a time, got T={T}; use ssd_scan")
    shape = (batch, heads, p, n)
    if out_state is None:
        out_state = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out_state.shape != shape or out_state.dtype != torch.float32 or not out_state.is_contiguous():
        raise ValueError(f"ssd_step_triton: out_state must be contiguous float32 {list(shape)}, got {out_state.dtype} "
                         f"{list(out_state.shape)}")
    state = None
    if initial_state is not None:
        state = initial_state if initial_state is out_state else initial_state.float().contiguous()
    y = torch.empty(batch, 1, heads, p, dtype=x.dtype, device=x.device)
    block_p, block_n = step_blocks(p, n)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    with device_guard(x.device):
        _ssd_step_kernel[(batch * heads, triton.cdiv(p, block_p))](
            x, dt, A, dt_bias, B, C, D, state, out_state, y,
            heads, groups, p, n, float(dt_limit[0]), float(dt_limit[1]),
            HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_STATE=state is not None,
            BLOCK_P=block_p, BLOCK_N=block_n,
        )
    return y, out_state
