"""One-token step of retention (the decode form of Eq. 6): ``S = gamma S + k^T v``, ``o = q S``."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def retention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~zoo.kernels.retention.naive.retention_recurrent` for ``T = 1``: q, k ``[B, 1, H, K]``,
    v ``[B, 1, H, V]``; returns ``o [B, 1, H, V]`` and the new state ``[B, H, K, V]`` (compute dtype; a new tensor)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, 1, X]
    kv = k.transpose(-1, -2) * v  # k^T v: [B, H, K, V]
    if initial_state is None:
        state = kv
    else:
        state = torch.addcmul(kv, initial_state.to(dtype), log_decay.to(dtype).exp()[:, None, None])
    return torch.matmul(q, state).transpose(1, 2), state
