"""What every zoo Triton kernel checks before launching: supported dtypes, one device, and, for CPU tensors, the
Triton interpreter. Imported by the Triton kernel files only."""
from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # kernels that hold a [K, BV] state in registers refuse larger head dims


def check_triton_inputs(op: str, kernel, *tensors: torch.Tensor | None) -> None:
    """Raise a ValueError prefixed with ``op`` unless every given tensor is fp32/bf16/fp16 on the first one's device,
    and CPU tensors run where ``kernel`` (any of the op's ``@triton.jit`` kernels) is interpreted."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: inputs must be float32, bfloat16 or float16, got {t.dtype}; use the torch backend")
        if t.device != device:
            raise ValueError(f"{op}: all inputs must be on {device}, got one on {t.device}")
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise ValueError(f"{op}: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported")


def check_head_dim(op: str, K: int) -> None:
    if K > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim K={K} exceeds {MAX_HEAD_DIM} (the state is held in registers)")
