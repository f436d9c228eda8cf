"""Shape checks of the selective scan's inputs, shared by every entry point (the dispatcher and the Triton kernel)."""
from __future__ import annotations

import torch


def check_scan_shapes(op: str, u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Raise a ValueError, prefixed with ``op``, naming the first input whose shape breaks the contract:
    u, delta, z ``[B, T, D]``; A ``[D, N]``; B, C ``[B, T, N]``; D, delta_bias ``[D]``; initial_state ``[B, D, N]``."""
    if u.dim() != 3:
        raise ValueError(f"{op}: u must be [B, T, D], got {list(u.shape)}")
    batch, T, dim = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"{op}: delta must match u {list(u.shape)}, got {list(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{op}: A must be [D={dim}, N], got {list(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, T, n):
            raise ValueError(f"{op}: {name} must be [B, T, N] = {[batch, T, n]}, got {list(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{op}: {name} must be [D={dim}], got {list(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"{op}: z must match u {list(u.shape)}, got {list(z.shape)}")
    if initial_state is not None and initial_state.shape != torch.Size((batch, dim, n)):
        raise ValueError(f"{op}: initial_state must be [B, D, N] = {[batch, dim, n]}, got {list(initial_state.shape)}")
