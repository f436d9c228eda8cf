"""One-token step of the RWKV-6 WKV (the decode form of Eqs. 21-22): ``o = r (S + diag(u) k^T v)``,
``S = diag(w) S + k^T v``."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def rwkv6_step(r, k, v, w_log, u, initial_state=None):
    """Same contract as :func:`~zoo.kernels.rwkv6.naive.rwkv6_naive` for ``T = 1``: r, k, w_log ``[B, 1, H, K]``,
    v ``[B, 1, H, V]``, u ``[H, K]``; returns ``o [B, 1, H, V]`` and the new state ``[B, H, K, V]`` (compute dtype)."""
    dtype = torch.promote_types(r.dtype, torch.float32)
    r, k, v, w_log = (t.to(dtype).transpose(1, 2) for t in (r, k, v, w_log))  # [B, H, 1, X]
    kv = k.transpose(-1, -2) * v  # [B, H, K, V]
    # r (S + diag(u) k^T v) = r S + ((r * u) . k) v
    o = ((r * u.to(dtype)[:, None]) * k).sum(-1, keepdim=True) * v  # [B, H, 1, V]
    if initial_state is None:
        return o.transpose(1, 2), kv
    S = initial_state.to(dtype)
    o = o + torch.matmul(r, S)
    return o.transpose(1, 2), torch.addcmul(kv, S, w_log.transpose(-1, -2).exp())
