"""Recurrent PyTorch form of the generalized delta rule (RWKV-7's WKV operator) with a hand-written backward:
the fast torch form on CPU (about 2x the chunked form at the ``rwkv7_small`` shapes, single-threaded, on this project's CPU machine).

    S_t = diag(exp(w_t)) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t,      o_t = r_t S_t      (S: [K, V] per head)

The forward updates one ``[B*H, K, V]`` state (it stays in cache) and keeps every ``chunk_size``-th state; the
backward recomputes a chunk of states from those checkpoints and runs the reverse recurrence, so memory is
``O(B H K V (T/L + L))`` instead of autograd's per-step copies.
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off, start_state


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, X] -> [T, B*H, X]`` (contiguous)."""
    B, T, H, X = x.shape
    return x.permute(1, 0, 2, 3).reshape(T, B * H, X).contiguous()


def _batch_major(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """``[T, B*H, X] -> [B, T, H, X]``."""
    T, _, X = x.shape
    return x.view(T, B, H, X).permute(1, 0, 2, 3)


class _DeltaRuleRecurrence(torch.autograd.Function):
    """All inputs time-major ``[T, BH, K]`` (v: ``[T, BH, V]``); ``w`` is the log decay. Runs with autocast off: the
    caller is decorated with :func:`autocast_off`, and so is the backward."""

    @staticmethod
    def _scan(S, decay, k, v, a, b, t0, t1):
        """States after each step ``t0..t1-1`` ``[L, BH, K, V]`` and the low-rank reads ``a_t S_{t-1}`` ``[L, BH, V]``."""
        states = S.new_empty(t1 - t0, *S.shape)
        reads = S.new_empty(t1 - t0, S.shape[0], S.shape[2])
        for i, t in enumerate(range(t0, t1)):
            read = torch.bmm(a[t][:, None, :], S, out=reads[i][:, None, :])  # [BH, 1, V]
            nxt = torch.mul(S, decay[t][:, :, None], out=states[i])
            nxt.baddbmm_(b[t][:, :, None], read)
            S = nxt.baddbmm_(k[t][:, :, None], v[t][:, None, :])
        return states, reads

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, S0, chunk_size):
        T = r.shape[0]
        decay = w.exp()
        S, checkpoints, outs = S0, [], []
        for t0 in range(0, T, chunk_size):
            t1 = min(T, t0 + chunk_size)
            checkpoints.append(S)
            states, _ = _DeltaRuleRecurrence._scan(S, decay, k, v, a, b, t0, t1)  # [L, BH, K, V]
            outs.append(torch.einsum("lbk,lbkv->lbv", r[t0:t1], states))
            S = states[-1].clone()
        ctx.save_for_backward(r, w, k, v, a, b, *checkpoints)
        ctx.chunk_size = chunk_size
        return torch.cat(outs), S

    @staticmethod
    @autocast_off
    def backward(ctx, do, dS_final):
        # Everything in the saved tensors' dtype (the incoming gradients too), whatever autocast is active.
        r, w, k, v, a, b, *checkpoints = ctx.saved_tensors
        T, L = r.shape[0], ctx.chunk_size
        decay = w.exp()
        do = torch.zeros(T, *v.shape[1:], dtype=v.dtype, device=v.device) if do is None else do.to(v.dtype)
        G = torch.zeros_like(checkpoints[0]) if dS_final is None else dS_final.to(v.dtype, copy=True)  # dL/dS_t
        dr, dw, dk, dv, da, db = (torch.empty_like(t) for t in (r, w, k, v, a, b))
        for index in reversed(range(len(checkpoints))):
            t0 = index * L
            t1 = min(T, t0 + L)
            S0 = checkpoints[index]
            states, reads = _DeltaRuleRecurrence._scan(S0, decay, k, v, a, b, t0, t1)  # [L, BH, K, V]
            prev = torch.cat((S0[None], states[:-1]))  # S_{t-1}
            dr[t0:t1] = torch.einsum("lbkv,lbv->lbk", states, do[t0:t1])
            outer = torch.einsum("lbk,lbv->lbkv", r[t0:t1], do[t0:t1])  # r_t^T do_t
            grads = torch.empty_like(states)  # dL/dS_t for every step of the chunk
            d_reads = torch.empty_like(reads)
            for i in reversed(range(t1 - t0)):
                t = t0 + i
                G = torch.add(G, outer[i], out=grads[i])
                d_read = torch.bmm(b[t][:, None, :], G, out=d_reads[i][:, None, :])  # [BH, 1, V]
                G = (G * decay[t][:, :, None]).baddbmm_(a[t][:, :, None], d_read)
            dk[t0:t1] = torch.einsum("lbkv,lbv->lbk", grads, v[t0:t1])
            dv[t0:t1] = torch.einsum("lbkv,lbk->lbv", grads, k[t0:t1])
            dw[t0:t1] = torch.einsum("lbkv,lbkv->lbk", grads, prev) * decay[t0:t1]
            db[t0:t1] = torch.einsum("lbkv,lbv->lbk", grads, reads)
            da[t0:t1] = torch.einsum("lbkv,lbv->lbk", prev, d_reads)
        return dr, dw, dk, dv, da, db, G, None


@autocast_off
def dplr_delta_rule_recurrent(r, w_log, k, v, a, b, initial_state=None, chunk_size: int = 32):
    """Same contract as :func:`dplr_delta_rule_naive`: ``r, w_log, k, a, b [B, T, H, K]``, ``v [B, T, H, V]``,
    ``initial_state [B, H, K, V]``; returns ``(o [B, T, H, V], final_state [B, H, K, V])`` in fp32 (fp64 if given).
    """
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, T, H, K = r.shape
    V = v.shape[-1]
    S0 = start_state(initial_state, (B, H, K, V), dtype, r.device)
    if T == 0:
        return torch.zeros(B, 0, H, V, dtype=dtype, device=r.device), S0
    o, S = _DeltaRuleRecurrence.apply(
        *(_time_major(t.to(dtype)) for t in (r, w_log, k, v, a, b)), S0.reshape(B * H, K, V).contiguous(), chunk_size,
    )
    return _batch_major(o, B, H), S.view(B, H, K, V)
