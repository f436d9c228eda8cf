"""Sequential fp32 reference of Mamba-1's selective scan (Gu & Dao 2023, "Mamba", Section 2 and Algorithm 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels.amp import autocast_off


@autocast_off
def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True, initial_state=None):
    """One step at a time: with ``dt = softplus(delta + delta_bias)``,

    ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t``  (Eq. 2a with the ZOH ``A_bar = exp(dt A)`` of Eq. 4 and the
    Euler ``B_bar = dt B`` of the reference code), ``y_t = C_t h_t + D u_t``  (Eq. 2b), then ``y_t * silu(z_t)``.
    Shapes and results: :func:`zoo.kernels.selective_scan.selective_scan`.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    batch, T, dim = u.shape
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    A, B, C, uf = A.to(dtype), B.to(dtype), C.to(dtype), u.to(dtype)
    h = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * uf[:, t])[:, :, None] * B[:, t, None, :]  # [B, D, N]
        ys.append((h * C[:, t, None, :]).sum(-1))  # [B, D]
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(batch, 0, dim)
    if D is not None:
        y = y + uf * D.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), h
