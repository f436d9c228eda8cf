"""Chunkwise retention (Sun et al. 2023, Eq. (7)): parallel inside chunks of ``C`` tokens, recurrent across them.

For chunk i with cumulative in-chunk log decays ``b_j = (j + 1) log gamma``::

    O_[i]   = (Q_[i] K_[i]^T ⊙ D) V_[i] + (Q_[i] R_{i-1}) ⊙ xi,   xi_j = gamma^(j+1)
    R_i     = K_[i]^T (V_[i] ⊙ zeta) + gamma^C R_{i-1},          zeta_j = gamma^(C-j-1)

A last partial chunk is padded with zero k, v and zero log decay, so padding neither writes nor decays the state.
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off, from_chunks, start_state, to_chunks


@autocast_off
def retention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (7). Shapes as :func:`retention`; any T (the last chunk may be partial)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    C = max(1, min(chunk_size, T))
    q, k, v = to_chunks(C, dtype, q, k, v)  # [B, H, N, C, K], [B, H, N, C, K], [B, H, N, C, V]
    N = q.shape[2]
    real = (torch.arange(N * C, device=q.device) < T).view(N, C)
    g = torch.where(real[None], log_decay.to(dtype)[:, None, None], torch.zeros((), dtype=dtype, device=q.device))  # [H, N, C]
    b = g.cumsum(-1)  # [H, N, C], log of the decay from the chunk start to (and including) position j
    b_last = b[..., -1:]  # [H, N, 1]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    rel = b[..., :, None] - b[..., None, :]  # [H, N, C, C], log gamma^(i-j)
    decay = torch.where(causal, rel, torch.full_like(rel, float("-inf"))).exp()
    intra = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C]
    o = intra @ v  # [B, H, N, C, V]
    k_to_end = k * (b_last - b).exp()[..., None]  # [B, H, N, C, K], zeta folded into K
    chunk_kv = k_to_end.transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = b_last.exp()[..., None]  # [H, N, 1, 1], gamma^C (gamma^(real length) for the last chunk)
    state = start_state(initial_state, (B, H, K, V), dtype, q.device)
    starts = []
    for n in range(N):
        starts.append(state)
        state = chunk_decay[:, n] * state + chunk_kv[:, :, n]
    prev = torch.stack(starts, dim=2)  # [B, H, N, K, V], state entering each chunk
    o = o + (q * b.exp()[..., None]) @ prev  # xi folded into Q
    return from_chunks(o, T), state
