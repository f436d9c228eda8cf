"""The input preparation and output gating the PyTorch forms of the selective scan share (the naive reference
keeps its own copy, so that it reads top to bottom)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels.amp import start_state


def prepare_inputs(u, delta, A, delta_bias, delta_softplus: bool, initial_state):
    """``(dtype, dt [B, T, D], u [B, T, D], h0 [B, D, N])`` in the compute dtype (fp32, fp64 for fp64 inputs), with
    ``dt = softplus(delta + delta_bias)`` (each part optional) and ``h0`` zeros when there is no initial state."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    batch, _, dim = u.shape
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = start_state(initial_state, (batch, dim, A.shape[1]), dtype, u.device)
    return dtype, dt, u.to(dtype), h0


def skip_and_gate(y, uf, D, z, out_dtype: torch.dtype) -> torch.Tensor:
    """``(y + D u) * silu(z)`` (each term optional), cast to ``out_dtype``."""
    if D is not None:
        y = y + uf * D.to(uf.dtype)
    if z is not None:
        y = y * F.silu(z.to(uf.dtype))
    return y.to(out_dtype)
