"""Autocast and the torch forms of the kernels.

A torch form casts its inputs to its compute dtype (fp32, fp64 for fp64 inputs) and keeps its states and scans in
it. Under autocast (Lightning's ``bf16-mixed`` / ``16-mixed``) its matmuls and einsums would silently run in
bf16/fp16 instead: states rounded at every read, final states handed back in the low dtype, and hand-written
backward passes mixing fp32 saved tensors with low-precision gradients. :func:`autocast_off` prevents all three.
"""
from __future__ import annotations

import functools

import torch


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


def input_dtypes(*tensors: torch.Tensor | None) -> list[torch.dtype | None]:
    """Each input's dtype (None for an absent one), for :func:`grads_in_input_dtypes` in an autograd ``backward``."""
    return [None if t is None else t.dtype for t in tensors]


def grads_in_input_dtypes(grads, dtypes: list[torch.dtype | None]) -> list[torch.Tensor | None]:
    """A kernel's fp32 gradients cast to their inputs' dtypes (None where the input was absent)."""
    return [None if dt is None else g.to(dt) for g, dt in zip(grads, dtypes)]
