"""Sequential fp32 reference of the generalized delta rule (``dplr_delta_rule``), RWKV-7 (Goose)'s WKV recurrence.

Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution" (arXiv:2503.14456), Sec. 4 (time mixing).
The paper's state is ``S [V, K]`` updated from the right:

    S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,      o_t = S_t r_t^T
    with a_t = -kappa_hat_t and b_t = kappa_hat_t * alpha_t (alpha_t: in-context learning rate)

Here the state is kept transposed, ``S [K, V]`` (like RWKV-6's), so the same update reads

    S_t = diag(w_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t,      o_t = r_t S_t

This is the paper's Eq. 17, ``wkv_t = wkv_{t-1} (diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t)) + v_t^T k~_t``
(the transition matrix in parentheses is its ``G_t``), with the readout ``o_t = wkv_t r_t^T`` of Eq. 21 before the
GroupNorm. The paper calls the in-context learning rate ``a_t``; here ``a`` and ``b`` are the kernel's two rank-1
vectors instead. Equation numbers as in arXiv:2503.14456 v1 (see ``zoo.layers.rwkv7`` for where they were read).
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def dplr_delta_rule_naive(r, w_log, k, v, a, b, initial_state=None):
    """Token-by-token generalized delta rule. ``r, w_log, k, a, b [B, T, H, K]``, ``v [B, T, H, V]``, state ``[B, H, K, V]``.

    ``w_log`` is the log of the decay (<= 0). Returns ``(o [B, T, H, V], final_state [B, H, K, V])`` in fp32 (fp64 if given).
    """
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, T, H, K = r.shape
    V = v.shape[-1]
    r, w_log, k, v, a, b = (t.to(dtype) for t in (r, w_log, k, v, a, b))
    S = torch.zeros(B, H, K, V, dtype=dtype, device=r.device) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        sa = torch.einsum("bhk,bhkv->bhv", a[:, t], S)  # a_t S_{t-1}: [B, H, V]
        S = w_log[:, t].exp()[..., None] * S + b[:, t, :, :, None] * sa[:, :, None, :] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    o = torch.stack(outs, dim=1) if outs else torch.zeros(B, 0, H, V, dtype=dtype, device=r.device)  # [B, T, H, V]
    return o, S
