"""Chunked PyTorch form of the generalized delta rule (RWKV-7's WKV operator) (same maths as ``naive.py``).

Inside a chunk, with per-channel cumulative log decays ``A_t = sum_{j<=t} w_log_j`` (inclusive), ``A'_t = A_{t-1}``
(exclusive) and the chunk's start state ``S_0``, unrolling ``S_t = diag(w_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t``
gives, with the "pseudo values" ``u_t = a_t S_{t-1}`` [V]:

    u_t = (a_t e^{A'_t}) S_0 + sum_{j<t} [(a_t e^{A'_t - A_j}) . b_j] u_j + [(a_t e^{A'_t - A_j}) . k_j] v_j
    o_t = (r_t e^{A_t}) S_0  + sum_{j<=t} [(r_t e^{A_t - A_j}) . b_j] u_j + [(r_t e^{A_t - A_j}) . k_j] v_j
    S_C = e^{A_last} S_0 + sum_j (b_j e^{A_last - A_j})^T u_j + (k_j e^{A_last - A_j})^T v_j

The first line is a unit lower-triangular system ``(I - L_ab) u = (a e^{A'}) S_0 + L_ak v`` (WY-like form), solved
once per chunk; ``u`` is linear in ``S_0`` so only a ``[C, K] @ [K, V]`` product per chunk stays sequential.
All exponents are differences later-minus-earlier of cumulative logs (<= 0): no division by cumulative products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels.amp import autocast_off, from_chunks, start_state, to_chunks


def _pair_decay(A_to: torch.Tensor, A_from: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(A_to[t] - A_from[j])`` where ``mask[t, j]``, else 0: ``[..., C, C, K]``."""
    diff = A_to[..., :, None, :] - A_from[..., None, :, :]
    return diff.masked_fill(~mask[:, :, None], float("-inf")).exp()


def _pair(x: torch.Tensor, y: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """``sum_k x[t, k] y[j, k] decay[t, j, k]``: ``[..., C, C]``."""
    return (x[..., :, None, :] * y[..., None, :, :] * decay).sum(-1)


@autocast_off
def dplr_delta_rule_chunked(r, w_log, k, v, a, b, initial_state=None, chunk_size: int = 16):
    """Chunked generalized delta rule. ``r, w_log, k, a, b [B, T, H, K]``, ``v [B, T, H, V]``, state ``[B, H, K, V]``.

    Returns ``(o [B, T, H, V], final_state [B, H, K, V])`` in fp32 (fp64 if given).
    """
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    S = start_state(initial_state, (B, H, K, V), dtype, r.device)
    if T == 0:
        return torch.zeros(B, 0, H, V, dtype=dtype, device=r.device), S
    r, w_log, k, a, b, v = to_chunks(C, dtype, r, w_log, k, a, b, v)  # [B, H, N, C, K] (v: [B, H, N, C, V])
    N = r.shape[2]

    A = w_log.cumsum(dim=-2)  # [B, H, N, C, K] inclusive
    A_excl = F.pad(A[..., :-1, :], (0, 0, 1, 0))  # exclusive
    A_last = A[..., -1:, :]  # [B, H, N, 1, K]
    ones = torch.ones(C, C, dtype=torch.bool, device=r.device)
    strict, incl = ones.tril(-1), ones.tril()

    dec_a = _pair_decay(A_excl, A, strict)  # [B, H, N, C, C, K]
    L_ab, L_ak = _pair(a, b, dec_a), _pair(a, k, dec_a)  # [B, H, N, C, C]
    dec_r = _pair_decay(A, A, incl)
    M_rb, M_rk = _pair(r, b, dec_r), _pair(r, k, dec_r)

    eye = torch.eye(C, dtype=dtype, device=r.device)
    lhs = eye - L_ab
    # u = P S_0 + Q, with P = (I - L_ab)^{-1} (a e^{A'}) [C, K] and Q = (I - L_ab)^{-1} L_ak v [C, V].
    P = torch.linalg.solve_triangular(lhs, a * A_excl.exp(), upper=False, unitriangular=True)
    Q = torch.linalg.solve_triangular(lhs, L_ak @ v, upper=False, unitriangular=True)
    tail = (A_last - A).exp()  # [B, H, N, C, K]
    b_tail, k_tail = (b * tail).transpose(-1, -2), (k * tail).transpose(-1, -2)  # [B, H, N, K, C]
    kv_chunk = k_tail @ v  # [B, H, N, K, V]
    chunk_decay = A_last.squeeze(-2).exp()[..., None]  # [B, H, N, K, 1]

    starts, us = [], []
    for n in range(N):
        u = P[:, :, n] @ S + Q[:, :, n]  # [B, H, C, V]
        starts.append(S)
        us.append(u)
        S = chunk_decay[:, :, n] * S + b_tail[:, :, n] @ u + kv_chunk[:, :, n]
    S_start, U = torch.stack(starts, dim=2), torch.stack(us, dim=2)  # [B, H, N, K, V], [B, H, N, C, V]
    o = (r * A.exp()) @ S_start + M_rb @ U + M_rk @ v  # [B, H, N, C, V]
    return from_chunks(o, T), S
