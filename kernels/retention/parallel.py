"""Parallel retention (Sun et al. 2023, Eq. (5)): ``(Q K^T ⊙ D) V`` with the causal decay mask
``D_nm = gamma^(n-m)`` for ``n >= m`` (else 0), plus the initial state's contribution ``gamma^(n+1) Q_n S_0``."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def retention_parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5) over the whole sequence at once (memory O(T^2)). Shapes as :func:`retention`."""
    B, T, H, K = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = log_decay.to(dtype)  # [H]
    pos = torch.arange(T, device=q.device, dtype=dtype)
    diff = pos[:, None] - pos[None, :]  # [T, T], n - m
    causal = diff >= 0
    # Mask the exponent before exp so the upper triangle cannot overflow.
    decay = torch.where(causal, diff[None] * g[:, None, None], torch.full_like(diff, float("-inf"))).exp()  # [H, T, T]
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * decay  # [B, H, T, T]
    o = torch.einsum("bhnm,bmhv->bnhv", scores, v)  # [B, T, H, V]
    to_end = ((T - 1 - pos)[None, :] * g[:, None]).exp()  # [H, T], gamma^(T-1-m)
    final = torch.einsum("bmhk,bmhv,hm->bhkv", k, v, to_end)  # [B, H, K, V]
    if initial_state is not None:
        s0 = initial_state.to(dtype)
        from_start = ((pos + 1)[None, :] * g[:, None]).exp()  # [H, T], gamma^(n+1)
        o = o + torch.einsum("bnhk,bhkv,hn->bnhv", q, s0, from_start)
        final = final + (T * g).exp()[None, :, None, None] * s0
    return o, final
