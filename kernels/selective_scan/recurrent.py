"""Recurrent PyTorch selective scan with a hand-written backward: the fast torch form on CPU.

The forward steps through time in place on one ``[B, D, N]`` state that stays in cache and keeps only every
``chunk_size``-th state; the backward recomputes one chunk of states at a time from those checkpoints and runs
the reverse recurrence. Memory is ``O(B D N (T / L + L))`` instead of autograd's ``O(B T D N)`` per operation.
"""
from __future__ import annotations

import torch

from zoo.kernels.amp import autocast_off

from .inputs import prepare_inputs, skip_and_gate


def _chunk_inputs(dt, dtu, A, B, t0, t1):
    """Per-step decay ``exp(dt A)`` and input ``dt u B`` for steps ``t0:t1``, each time-major ``[L, B, D, N]``."""
    dt_c = dt[:, t0:t1].transpose(0, 1)  # [L, B, D]
    decay = torch.exp(dt_c[..., None] * A)  # [L, B, D, N]
    inject = dtu[:, t0:t1].transpose(0, 1)[..., None] * B[:, t0:t1].transpose(0, 1)[:, :, None, :]  # [L, B, D, N]
    return decay, inject


def _scan_chunk(h: torch.Tensor, decay: torch.Tensor, inject: torch.Tensor) -> torch.Tensor:
    """States after every step of a chunk, ``[L, B, D, N]``, starting from ``h [B, D, N]``."""
    states = torch.empty_like(decay)
    for step in range(decay.shape[0]):
        h = torch.addcmul(inject[step], decay[step], h, out=states[step])
    return states


class _SelectiveScanRecurrent(torch.autograd.Function):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t . h_t`` on prepared fp32/fp64 inputs (autocast off:
    the caller is decorated with :func:`autocast_off`, and so is the backward)."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C, h0, chunk_size):
        T = dt.shape[1]
        dtu = dt * u  # [B, T, D]
        h, checkpoints, ys = h0, [], []
        for t0 in range(0, T, chunk_size):
            t1 = min(T, t0 + chunk_size)
            checkpoints.append(h)
            states = _scan_chunk(h, *_chunk_inputs(dt, dtu, A, B, t0, t1))  # [L, B, D, N]
            ys.append(torch.einsum("lbdn,bln->bld", states, C[:, t0:t1]))  # [B, L, D]
            h = states[-1].clone()
        ctx.save_for_backward(dt, u, A, B, C, *checkpoints)
        ctx.chunk_size = chunk_size
        return torch.cat(ys, dim=1), h

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dh_final):
        # Everything in the saved tensors' dtype (the incoming gradients too), whatever autocast is active.
        dt, u, A, B, C, *checkpoints = ctx.saved_tensors
        T, L = dt.shape[1], ctx.chunk_size
        dtu = dt * u
        dh = torch.zeros_like(checkpoints[0]) if dh_final is None else dh_final.to(dt.dtype, copy=True)
        dy = torch.zeros_like(dt) if dy is None else dy.to(dt.dtype)
        d_dt_decay, d_dtu, dB, dC = torch.empty_like(dt), torch.empty_like(dt), torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        for index in reversed(range(len(checkpoints))):
            t0 = index * L
            t1 = min(T, t0 + L)
            decay, inject = _chunk_inputs(dt, dtu, A, B, t0, t1)
            states = _scan_chunk(checkpoints[index], decay, inject)  # [L, B, D, N]
            dy_c = dy[:, t0:t1].transpose(0, 1)  # [L, B, D]
            dC[:, t0:t1] = torch.einsum("lbdn,lbd->bln", states, dy_c)
            # Gradient reaching each state: from its own output plus from the next state through the decay.
            d_states = dy_c[..., None] * C[:, t0:t1].transpose(0, 1)[:, :, None, :]  # [L, B, D, N]
            for step in reversed(range(t1 - t0)):
                dh = d_states[step].add_(dh)
                dh = dh * decay[step]
            prev = torch.cat((checkpoints[index][None], states[:-1]), dim=0)  # h_{t-1}, [L, B, D, N]
            # dL/d(dt u B) is dL/dh_t itself.
            d_dtu[:, t0:t1] = torch.einsum("lbdn,bln->bld", d_states, B[:, t0:t1])
            dB[:, t0:t1] = torch.einsum("lbdn,bld->bln", d_states, dtu[:, t0:t1])
            d_log_decay = d_states.mul_(prev).mul_(decay)  # dL/d(dt A), reusing d_states' memory
            d_dt_decay[:, t0:t1] = torch.einsum("lbdn,dn->bld", d_log_decay, A)
            dA += torch.einsum("lbdn,bld->dn", d_log_decay, dt[:, t0:t1])
        d_dt = d_dt_decay + d_dtu * u
        du = d_dtu * dt
        return d_dt, du, dA, dB, dC, dh, None


@autocast_off
def selective_scan_recurrent(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True, initial_state=None, chunk_size: int | None = None):
    """Same contract as :func:`zoo.kernels.selective_scan.selective_scan`; ``chunk_size`` (default 32) is the checkpoint
    interval."""
    dtype, dt, uf, h0 = prepare_inputs(u, delta, A, delta_bias, delta_softplus, initial_state)
    batch, T, dim = u.shape
    if T == 0:
        return u.new_zeros(batch, 0, dim), h0
    y, h = _SelectiveScanRecurrent.apply(
        dt.contiguous(), uf.contiguous(), A.to(dtype).contiguous(), B.to(dtype).contiguous(), C.to(dtype).contiguous(),
        h0.contiguous(), chunk_size or 32,
    )
    return skip_and_gate(y, uf, D, z, u.dtype), h
