"""The selective scan through mamba-ssm's CUDA kernels (``backend: mamba_ssm``), adapting zoo's time-second layout.

mamba-ssm's ``selective_scan_fn`` takes no initial state, so a call with a state runs only for one token, through
its ``selective_state_update``; chunked prefill from a state needs the torch or triton backend.
"""
from __future__ import annotations

import torch

from zoo.errors import BackendUnavailableError


def on_cuda(tensor) -> bool:
    """Whether mamba-ssm's kernels can take ``tensor`` (a seam for the CPU tests of this adapter)."""
    return tensor.device.type == "cuda"


def selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """Same contract as :func:`zoo.kernels.selective_scan.selective_scan`, on CUDA tensors."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError as err:
        raise BackendUnavailableError(f"selective_scan backend 'mamba_ssm': the mamba-ssm package does not import ({err})") from err
    if not on_cuda(u):
        raise BackendUnavailableError(f"selective_scan backend 'mamba_ssm' runs on CUDA tensors only, got a {u.device.type} tensor")
    if initial_state is None:
        y, state = selective_scan_fn(
            u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,  # [B, D, T], [B, N, T]
            z=None if z is None else z.transpose(1, 2), delta_bias=delta_bias, delta_softplus=delta_softplus,
            return_last_state=True,
        )
        return y.transpose(1, 2), state.to(torch.promote_types(u.dtype, torch.float32))  # [B, T, D]
    if u.shape[1] != 1:
        raise BackendUnavailableError(
            "selective_scan backend 'mamba_ssm': mamba-ssm cannot start a multi-token scan from a state "
            f"(got T={u.shape[1]} with an initial state); use backend torch or triton for chunked prefill"
        )
    state = initial_state.clone()  # selective_state_update writes the state in place
    y = selective_state_update(
        state, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, z=None if z is None else z[:, 0],
        dt_bias=delta_bias, dt_softplus=delta_softplus,
    )
    return y[:, None], state  # [B, 1, D]
