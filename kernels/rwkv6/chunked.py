"""Chunked PyTorch form of the RWKV-6 WKV recurrence (same maths as ``naive.py``).

Within a chunk of ``C`` tokens, with inclusive cumulative log decays ``A_t = sum_{j<=t} w_log_j`` (per channel)
and exclusive ones ``A'_t = A_t - w_log_t``:

    o_t = (r_t * exp(A'_t)) S_0 + sum_{i<t} (sum_k r_tk k_ik exp(A'_tk - A_ik)) v_i + (r_t * u * k_t) v_t
    S_C = exp(A_{C-1}) * S_0 + sum_i (k_i * exp(A_{C-1} - A_i))^T v_i

Every exponent is a difference ``A_later - A_earlier`` of cumulative logs, so it is <= 0: no division by tiny
cumulative products, no overflow for decays near 0. Pairwise decays are a ``[C, C, K]`` tensor per chunk.
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off, from_chunks, start_state, to_chunks


@autocast_off
def rwkv6_chunked(r, k, v, w_log, u, initial_state=None, chunk_size: int = 16):
    """Chunked WKV. ``r, k, w_log [B, T, H, K]``, ``v [B, T, H, V]``, ``u [H, K]``, state ``[B, H, K, V]``.

    Returns ``(o [B, T, H, V], final_state [B, H, K, V])``; computes in fp32 (fp64 if given).
    """
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    S = start_state(initial_state, (B, H, K, V), dtype, r.device)
    if T == 0:
        return torch.zeros(B, 0, H, V, dtype=dtype, device=r.device), S
    r, k, w_log, v = to_chunks(C, dtype, r, k, w_log, v)  # [B, H, N, C, K] (v: [B, H, N, C, V])
    N = r.shape[2]
    u = u.to(dtype)[None, :, None, None, :]  # [1, H, 1, 1, K]

    A = w_log.cumsum(dim=-2)  # [B, H, N, C, K] inclusive
    A_excl = A - w_log  # exclusive
    A_last = A[..., -1:, :]  # [B, H, N, 1, K]

    strict = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)  # i < t
    diff = A_excl[..., :, None, :] - A[..., None, :, :]  # [B, H, N, C(t), C(i), K]
    decay = diff.masked_fill(~strict[:, :, None], float("-inf")).exp()
    att = (r[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)  # [B, H, N, C, C]
    bonus = (r * u * k).sum(-1, keepdim=True)  # [B, H, N, C, 1]
    o = att @ v + bonus * v  # [B, H, N, C, V]

    r_dec = r * A_excl.exp()  # [B, H, N, C, K]
    k_dec = k * (A_last - A).exp()  # [B, H, N, C, K]
    kv_chunk = k_dec.transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = A_last.squeeze(-2).exp()[..., None]  # [B, H, N, K, 1]
    starts = []
    for n in range(N):
        starts.append(S)
        S = chunk_decay[:, :, n] * S + kv_chunk[:, :, n]
    S_start = torch.stack(starts, dim=2)  # [B, H, N, K, V]
    o = o + r_dec @ S_start
    return from_chunks(o, T), S
