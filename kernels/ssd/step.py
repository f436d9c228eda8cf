"""One-token step of the SSD recurrence (the decode form): the plain update ``h = exp(dt A) h + dt x B^T``,
``y = h C + D x`` on one ``[B, H, P, N]`` state, without the chunked form's segment sums, masks and padding."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off


@autocast_off
def ssd_step(x, dt, A, B, C, D=None, initial_state=None):
    """Same contract as :func:`~zoo.kernels.ssd.naive.ssd_naive` for ``T = 1``; the new state is a new tensor
    (``initial_state`` is not modified)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    batch, _, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    xf = x[:, 0].to(dtype)  # [B, H, P]
    dtf = dt[:, 0].to(dtype)  # [B, H]
    decay = torch.exp(dtf * A.to(dtype)).view(batch, groups, rep, 1, 1)
    inject = (dtf[..., None] * xf).view(batch, groups, rep, p, 1) * B[:, 0].to(dtype).view(batch, groups, 1, 1, n)
    if initial_state is None:
        h = inject  # [B, G, H/G, P, N]
    else:
        h = torch.addcmul(inject, initial_state.to(dtype).view(batch, groups, rep, p, n), decay)
    y = torch.matmul(h, C[:, 0].to(dtype).view(batch, groups, 1, n, 1)).view(batch, 1, heads, p)  # h C per head
    if D is not None:
        y = y + xf[:, None] * D.to(dtype)[:, None]
    return y.to(x.dtype), h.reshape(batch, heads, p, n)
