"""Chunked SSD (Dao & Gu 2024, Section 6 / Listing 1): quadratic attention-like form inside each chunk, then a scan
of the chunk states. Exact for any T (the tail chunk is padded with dt = 0, which leaves the state alone)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels.amp import autocast_off, start_state


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{j < k <= i} a[..., k]`` for ``j <= i``, ``-inf`` above the diagonal (stable, no subtraction)."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)  # [..., L(k), L(j)]
    a = a.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1), 0)
    out = torch.cumsum(a, dim=-2)  # [..., i, j]
    return out.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device)), float("-inf"))


@autocast_off
def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64):
    """Same contract as :func:`~zoo.kernels.ssd.naive.ssd_naive`."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    batch, T, heads, p = x.shape
    n = B.shape[-1]
    rep = heads // B.shape[2]
    h0 = start_state(initial_state, (batch, heads, p, n), dtype, x.device)
    if T == 0:
        return x.new_zeros(batch, 0, heads, p), h0
    L = min(chunk_size, T)
    nc = -(-T // L)
    pad = nc * L - T
    xf = x.to(dtype)
    dtf = F.pad(dt.to(dtype), (0, 0, 0, pad))  # [B, T', H]
    xdt = (F.pad(xf, (0, 0, 0, 0, 0, pad)) * dtf[..., None]).view(batch, nc, L, heads, p)  # [B, c, L, H, P]
    Bh = F.pad(B.to(dtype), (0, 0, 0, 0, 0, pad)).repeat_interleave(rep, dim=2).view(batch, nc, L, heads, n)
    Ch = F.pad(C.to(dtype), (0, 0, 0, 0, 0, pad)).repeat_interleave(rep, dim=2).view(batch, nc, L, heads, n)
    a = (dtf * A.to(dtype)).view(batch, nc, L, heads).permute(0, 3, 1, 2)  # [B, H, c, L] log-decays
    a_cum = torch.cumsum(a, dim=-1)  # [B, H, c, L]

    # 1. inside each chunk: y_l = sum_{s <= l} C_l.B_s exp(a_{s+1} + ... + a_l) dt_s x_s
    decay = torch.exp(segsum(a))  # [B, H, c, L, L]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay, xdt)
    # 2. each chunk's final state from a zero start
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [B, H, c, L]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xdt)  # [B, c, H, P, N]
    # 3. pass states between chunks: start of chunk c = sum_{z <= c} decay(z -> c) * state_z
    chunk_states = torch.cat((h0[:, None], chunk_states), dim=1)  # [B, c+1, H, P, N]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [B, H, c+1, c+1]
    starts = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)  # [B, c+1, H, P, N]
    starts, final = starts[:, :-1], starts[:, -1]
    # 4. contribution of each chunk's start state to its outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, starts, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(batch, nc * L, heads, p)[:, :T]  # [B, T, H, P]
    if D is not None:
        y = y + xf * D.to(dtype)[:, None]
    return y.to(x.dtype), final
