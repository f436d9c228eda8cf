"""The SSD scan through mamba-ssm's Triton ``mamba_chunk_scan_combined`` (``backend: mamba_ssm``).

Packed documents (``cu_seqlens`` over ``B = 1``) run in one call of mamba-ssm's kernels with its ``seq_idx`` (the
document of each token, ``[1, T]`` int32): its chunks mask the state and the intra-chunk products across a document
change, and ``chunk_state_varlen`` gives each document's final state. mamba-ssm's own autograd function refuses a
backward with those states, so :class:`MambaSSDPacked` calls its forward and backward directly: the backward takes the
gradient of the last document's final state (the whole row's final state: mamba-ssm's ``dfinal_states``) and refuses a
gradient through any earlier document's. Packed documents with start states run one call per document (mamba-ssm's
``seq_idx`` path starts only the row's first document from a state).
"""
from __future__ import annotations

import torch

from zoo.errors import BackendUnavailableError


def on_cuda(tensor) -> bool:
    """Whether mamba-ssm's kernels can take ``tensor`` (a seam for the CPU tests of this adapter)."""
    return tensor.device.type == "cuda"


def _combined():
    """mamba-ssm's ``ssd_combined`` module, or a BackendUnavailableError that says why it does not import."""
    try:
        from mamba_ssm.ops.triton import ssd_combined
    except ImportError as err:
        raise BackendUnavailableError(f"ssd backend 'mamba_ssm': the mamba-ssm package does not import ({err})") from err
    return ssd_combined


def ssd_mamba_ssm(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")), initial_state=None,
                  chunk_size=64, cu_seqlens=None):
    """Same contract as :func:`zoo.kernels.ssd.ssd_scan` (``dt`` before bias and softplus), on CUDA tensors; packed
    documents: ``cu_seqlens`` a :class:`~zoo.kernels.backends.CuSeqlens`, final states ``[N, H, P, N_state]``."""
    combined = _combined()
    if not on_cuda(x):
        raise BackendUnavailableError(f"ssd backend 'mamba_ssm' runs on CUDA tensors only, got a {x.device.type} tensor")
    dtype = torch.promote_types(x.dtype, torch.float32)
    if cu_seqlens is not None:
        if initial_state is not None:
            from zoo.kernels.ssd import BACKENDS  # the package imports this module

            args = (x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, chunk_size)
            return BACKENDS.per_document(ssd_mamba_ssm, args, cu_seqlens)
        bounds = torch.tensor(cu_seqlens.bounds, dtype=torch.int64)
        seq_idx = torch.repeat_interleave(torch.arange(len(bounds) - 1, dtype=torch.int32), bounds.diff())[None]  # [1, T]
        y, states = MambaSSDPacked.apply(x, dt, A, B, C, D, dt_bias, seq_idx.to(x.device), cu_seqlens.on(x.device),
                                         chunk_size, dt_softplus, dt_limit, combined)
        return y, states.to(dtype)
    y, state = combined.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state, dt_softplus=dt_softplus,
        dt_limit=dt_limit, return_final_states=True,
    )
    return y, state.to(dtype)


class MambaSSDPacked(torch.autograd.Function):
    """mamba-ssm's combined SSD forward and backward over packed documents (``seq_idx [1, T]``, ``cu_seqlens [N + 1]``);
    returns ``(y [1, T, H, P], final states [N, H, P, N_state])``."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, seq_idx, cu_seqlens, chunk_size, dt_softplus, dt_limit, combined):
        out, _, _, _, _, _, states = combined._mamba_chunk_scan_combined_fwd(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
            dt_softplus=dt_softplus, dt_limit=dt_limit)
        ctx.save_for_backward(out, x, dt, A, B, C, D, dt_bias, seq_idx)
        ctx.args = (chunk_size, dt_softplus, dt_limit, combined)
        ctx.set_materialize_grads(False)
        return out, states

    @staticmethod
    def backward(ctx, dout, dstates):
        out, x, dt, A, B, C, D, dt_bias, seq_idx = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit, combined = ctx.args
        dfinal = None
        if dstates is not None:
            if dstates.shape[0] > 1 and bool(dstates[:-1].any()):  # a device sync, only when a state has a gradient
                raise BackendUnavailableError(
                    "ssd backend 'mamba_ssm': packed documents take a gradient through the last document's final state "
                    "only (mamba-ssm's seq_idx backward has one dfinal_states per row); use backend torch or "
                    "triton_chunk to differentiate an earlier document's final state")
            dfinal = dstates[-1:].float()  # [1, H, P, N_state]: the row's final state is the last document's
        if dout is None:
            dout = torch.zeros_like(out)
        dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = combined._mamba_chunk_scan_combined_bwd(
            dout, x, dt, A, B, C, out, chunk_size, D=D, dt_bias=dt_bias, dfinal_states=dfinal, seq_idx=seq_idx,
            dt_softplus=dt_softplus, dt_limit=dt_limit)
        return dx, ddt, dA, dB, dC, dD, ddt_bias, None, None, None, None, None, None
