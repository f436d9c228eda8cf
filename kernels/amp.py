"""What the torch forms of the kernels share: autocast kept off, and the chunking of the chunked forms.

A torch form casts its inputs to its compute dtype (fp32, fp64 for fp64 inputs) and keeps its states and scans in
it. Under autocast (Lightning's ``bf16-mixed`` / ``16-mixed``) its matmuls and einsums would silently run in
bf16/fp16 instead: states rounded at every read, final states handed back in the low dtype, and hand-written
backward passes mixing fp32 saved tensors with low-precision gradients. :func:`autocast_off` prevents all three.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def autocast_off(fn):
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    For the torch forms and for the ``forward`` and ``backward`` of their autograd Functions: a device-independent
    ``torch.amp.custom_fwd(cast_inputs=...)`` / ``custom_bwd`` (the forms cast their inputs themselves), so the
    backward computes in the saved tensors' dtype whether or not it is called inside autocast.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def start_state(initial_state: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """The state a scan starts from, in ``dtype``: ``initial_state``, or zeros of ``shape``."""
    return torch.zeros(shape, dtype=dtype, device=device) if initial_state is None else initial_state.to(dtype)


def to_chunks(chunk_size: int, dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each ``[B, T, H, X]`` tensor in ``dtype``, zero-padded to whole chunks and split: ``[B, H, N, C, X]`` with
    ``C = chunk_size``, ``N = ceil(T / C)``. The torch chunked forms pad with zeros on purpose: zero inputs and zero
    log decays neither write nor decay the state."""
    B, T, H = tensors[0].shape[:3]
    N = -(-T // chunk_size)
    pad = N * chunk_size - T
    return [F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)).view(B, N, chunk_size, H, t.shape[-1]).permute(0, 3, 1, 2, 4)
            for t in tensors]


def from_chunks(o: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, N, C, V]`` -> ``[B, T, H, V]``, the padding dropped."""
    B, H, N, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
