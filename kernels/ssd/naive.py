"""Sequential reference of Mamba-2's SSD recurrence (Dao & Gu 2024, "Transformers are SSMs", Eq. 1 with the
scalar-times-identity ``A_t = a_t I`` of Section 3 / Eq. 6, per head)."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def ssd_naive(x, dt, A, B, C, D=None, initial_state=None):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``, one step at a time.

    ``dt`` is the final (already softplus'd and clamped) time step; head h uses group ``h // (H/G)``. Shapes and
    results: :func:`zoo.kernels.ssd.ssd_scan`.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    batch, T, heads, p = x.shape
    rep = heads // B.shape[2]
    xf, dtf = x.to(dtype), dt.to(dtype)
    Bh = B.to(dtype).repeat_interleave(rep, dim=2)  # [B, T, H, N]
    Ch = C.to(dtype).repeat_interleave(rep, dim=2)
    n = B.shape[-1]
    h = torch.zeros(batch, heads, p, n, dtype=dtype, device=x.device) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(T):
        decay = torch.exp(dtf[:, t] * A.to(dtype))  # [B, H]
        h = decay[:, :, None, None] * h + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [B, H, P, N]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, heads, p)
    if D is not None:
        y = y + xf * D.to(dtype)[:, None]
    return y.to(x.dtype), h
