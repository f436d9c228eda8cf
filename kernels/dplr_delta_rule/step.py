"""One-token step of the generalized delta rule (the decode form):
``S = diag(exp(w)) S + b^T (a S) + k^T v``, ``o = r S``."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def dplr_delta_rule_step(r, w_log, k, v, a, b, initial_state=None):
    """Same contract as :func:`~zoo.kernels.dplr_delta_rule.naive.dplr_delta_rule_naive` for ``T = 1``: r, w_log, k, a, b
    ``[B, 1, H, K]``, v ``[B, 1, H, V]``; returns ``o [B, 1, H, V]`` and the new state ``[B, H, K, V]`` (compute dtype)."""
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, _, H, K = r.shape
    r, w_log, k, v, a, b = (t.to(dtype).transpose(1, 2) for t in (r, w_log, k, v, a, b))  # [B, H, 1, X]
    state = k.transpose(-1, -2) * v  # k^T v: [B, H, K, V]
    if initial_state is not None:
        S = initial_state.to(dtype)
        state = torch.addcmul(state, S, w_log.transpose(-1, -2).exp())
        state = state + b.transpose(-1, -2) * torch.matmul(a, S)  # b^T (a S_{t-1})
    return torch.matmul(r, state).transpose(1, 2), state
