"""Chunked PyTorch selective scan: a short sequential scan inside every chunk (all chunks at once), then the
chunk-to-chunk state passing with cumulative log-decays. ``L + T/L`` Python steps instead of ``T``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.kernels.amp import autocast_off

from .inputs import prepare_inputs, skip_and_gate


@autocast_off
def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True, initial_state=None, chunk_size: int | None = None):
    """Same contract as :func:`zoo.kernels.selective_scan.selective_scan`; ``chunk_size`` None picks ``ceil(sqrt(T))``.

    With ``S_t`` the cumulative log-decay ``sum_{s<=t} dt_s A`` inside a chunk that starts from state ``h_0``:
    ``h_t = h_t^local + exp(S_t) * h_0``, where ``h^local`` is the scan of the chunk from a zero state.
    """
    dtype, dt, uf, h0 = prepare_inputs(u, delta, A, delta_bias, delta_softplus, initial_state)
    batch, T, dim = u.shape
    n = A.shape[1]
    if T == 0:
        return u.new_zeros(batch, 0, dim), h0
    L = chunk_size or max(1, math.ceil(math.sqrt(T)))
    L = min(L, T)
    nc = -(-T // L)
    pad = nc * L - T
    Af = A.to(dtype)
    # Padded steps have dt = 0: decay 1 and no input, so they leave the state alone.
    dt_c = F.pad(dt, (0, 0, 0, pad)).view(batch, nc, L, dim)  # [B, nc, L, D]
    dtu_c = F.pad(dt * uf, (0, 0, 0, pad)).view(batch, nc, L, dim)
    B_c = F.pad(B.to(dtype), (0, 0, 0, pad)).view(batch, nc, L, n)  # [B, nc, L, N]
    C_c = F.pad(C.to(dtype), (0, 0, 0, pad)).view(batch, nc, L, n)

    # 1. scan every chunk from a zero state, all chunks at once; per-step tensors are built inside the loop
    #    (unbind, not indexing: its backward is one stack instead of a full-size zero tensor per step).
    h = torch.zeros(batch, nc, dim, n, dtype=dtype, device=u.device)
    y_local = []
    for dt_l, dtu_l, B_l, C_l in zip(dt_c.unbind(2), dtu_c.unbind(2), B_c.unbind(2), C_c.unbind(2)):
        h = torch.addcmul(dtu_l[..., None] * B_l[:, :, None, :], torch.exp(dt_l[..., None] * Af), h)  # [B, nc, D, N]
        y_local.append((h @ C_l[..., None]).squeeze(-1))  # [B, nc, D]
    y = torch.stack(y_local, dim=2)  # [B, nc, L, D]

    # 2. pass states between chunks: log-decay from the chunk start to step l is A * cumsum(dt) (A is constant).
    dt_cum = torch.cumsum(dt_c, dim=2)  # [B, nc, L, D]
    chunk_decay = torch.exp(dt_cum[:, :, -1, :, None] * Af)  # [B, nc, D, N]
    start, starts = h0, []
    for decay_c, end_c in zip(chunk_decay.unbind(1), h.unbind(1)):
        starts.append(start)
        start = decay_c * start + end_c
    h_start = torch.stack(starts, dim=1)  # [B, nc, D, N]

    # 3. add each chunk's start state, decayed to every step: C_l . (exp(A cumsum(dt)_l) * h_start)
    carried = torch.exp(dt_cum[..., None] * Af) * h_start[:, :, None]  # [B, nc, L, D, N]
    y = (y + torch.einsum("bcldn,bcln->bcld", carried, C_c)).reshape(batch, nc * L, dim)[:, :T]  # [B, T, D]
    return skip_and_gate(y, uf, D, z, u.dtype), start
