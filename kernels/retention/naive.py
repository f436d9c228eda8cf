"""Recurrent retention, the sequential fp32 reference (Sun et al. 2023, "Retentive Network", arXiv:2307.08621).

Eq. (6), per head with decay ``gamma``::

    S_n = gamma * S_{n-1} + K_n^T V_n        # state [K, V]
    o_n = Q_n S_n                             # output [V]

q and k come in already rotated (the ``Theta`` of Eq. (5)) and scaled; this file only does the recurrence.
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def retention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (6) token by token. q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H] (log gamma);
    initial_state [B, H, K, V]. Returns o [B, T, H, V] (compute dtype) and the final state [B, H, K, V]."""
    B, T, H, K = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    gamma = log_decay.to(dtype).exp()[None, :, None, None]  # [1, H, 1, 1]
    state = torch.zeros(B, H, K, v.shape[-1], dtype=dtype, device=q.device) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])  # [B, T, H, V]
    return o, state
