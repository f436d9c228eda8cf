"""The SSD scan through mamba-ssm's Triton ``mamba_chunk_scan_combined`` (``backend: mamba_ssm``)."""
from __future__ import annotations

import torch

from zoo.errors import BackendUnavailableError


def on_cuda(tensor) -> bool:
    """Whether mamba-ssm's kernels can take ``tensor`` (a seam for the CPU tests of this adapter)."""
    return tensor.device.type == "cuda"


def ssd_mamba_ssm(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")), initial_state=None, chunk_size=64):
    """Same contract as :func:`zoo.kernels.ssd.ssd_scan` (``dt`` before bias and softplus), on CUDA tensors."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as err:
        raise BackendUnavailableError(f"ssd backend 'mamba_ssm': the mamba-ssm package does not import ({err})") from err
    if not on_cuda(x):
        raise BackendUnavailableError(f"ssd backend 'mamba_ssm' runs on CUDA tensors only, got a {x.device.type} tensor")
    y, state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state, dt_softplus=dt_softplus,
        dt_limit=dt_limit, return_final_states=True,
    )
    return y, state.to(torch.promote_types(x.dtype, torch.float32))
