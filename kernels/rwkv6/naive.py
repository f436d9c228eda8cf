"""Sequential fp32 reference of the RWKV-6 (Finch) WKV recurrence.

Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (arXiv:2404.05892),
Sec. 4.2.2 (Finch time mixing), per head with state S [K, V], in the paper's recurrent form, Eqs. (21)-(22):

    wkv_t = S_{t-1} + diag(u) k_t^T v_t          (21: output-side bonus for the current token)
    o_t   = r_t · wkv_t                          (the r_i · wkv_i inside Eq. 20)
    S_t   = diag(w_t) S_{t-1} + k_t^T v_t        (22; w_t = exp(-exp(d_t)), Eq. 18)

This is the paper's parallel form, Eq. (19), wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i,
unrolled one token at a time.
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def rwkv6_naive(r, k, v, w_log, u, initial_state=None):
    """Token-by-token WKV. ``r, k, w_log [B, T, H, K]``, ``v [B, T, H, V]``, ``u [H, K]``, state ``[B, H, K, V]``.

    ``w_log`` is the log of the decay (``-exp(d_t)``, <= 0). Computes in fp32 (fp64 if given); returns
    ``(o [B, T, H, V], final_state [B, H, K, V])``, both in the compute dtype.
    """
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, T, H, K = r.shape
    V = v.shape[-1]
    r, k, v, w_log, u = (t.to(dtype) for t in (r, k, v, w_log, u))
    S = torch.zeros(B, H, K, V, dtype=dtype, device=r.device) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        wkv = S + u[None, :, :, None] * kv
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], wkv))
        S = w_log[:, t].exp()[..., None] * S + kv
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, S
