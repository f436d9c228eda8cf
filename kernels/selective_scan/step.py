"""One-token step of the selective scan (the decode form): ``h = exp(dt A) h + dt u B``, ``y = C h + D u``, gated,
on one ``[B, D, N]`` state without the recurrent form's autograd function and checkpoints."""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off

from .inputs import prepare_inputs, skip_and_gate


@autocast_off
def selective_scan_step(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True, initial_state=None):
    """Same contract as :func:`zoo.kernels.selective_scan.selective_scan` for ``T = 1``; the new state is a new tensor
    (``initial_state`` is not modified)."""
    dtype, dt, uf, h0 = prepare_inputs(u, delta, A, delta_bias, delta_softplus, initial_state)
    dt0 = dt[:, 0, :, None]  # [B, D, 1]
    Bt, Ct = B[:, 0].to(dtype), C[:, 0].to(dtype)  # [B, N]
    h = torch.addcmul((dt0 * uf[:, 0, :, None]) * Bt[:, None, :], torch.exp(dt0 * A.to(dtype)), h0)  # [B, D, N]
    y = torch.matmul(h, Ct[:, :, None]).transpose(1, 2)  # C h: [B, 1, D]
    return skip_and_gate(y, uf, D, z, u.dtype), h
