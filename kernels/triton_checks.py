"""What every zoo Triton kernel checks before launching (supported dtypes, one device, and, for CPU tensors, the
Triton interpreter) and the target its launcher picks tiles for. Imported by the Triton kernel files only."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
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


class Target(NamedTuple):
    """What a launcher's tile choice depends on besides shape and dtype."""

    arch: int  # 10 * major + minor of the CUDA capability (80, 86, 89, 90, ...); 0: none of them


# The safe tiles (those of the GPUs without a table of their own): CPU tensors (the interpreter) and ROCm, whose
# capabilities (9.0 for MI250, 9.4 for MI300) are not NVIDIA's.
DEFAULT_TARGET = Target(0)


def launch_target(device: torch.device) -> Target:
    """The target of a launch on ``device``: its CUDA capability (what fla and mamba-ssm key their tiles on), or
    :data:`DEFAULT_TARGET` for CPU tensors and ROCm."""
    if device.type == "cpu" or torch.version.hip:
        return DEFAULT_TARGET
    major, minor = torch.cuda.get_device_capability(device)
    return Target(10 * major + minor)


class Launch(NamedTuple):
    """The compile options of one kernel launch."""

    num_warps: int
    num_stages: int


class RecurrentTiles(NamedTuple):
    """Launch parameters of a fused-recurrent kernel pair (RWKV-6, RWKV-7, retention): each program holds a
    ``[BK, BV]`` state slice; forward and backward share BK and BV (the checkpoints are ``[BK, BV]`` blocks)."""

    BK: int
    BV: int
    launch: Launch


def recurrent_tiles(K: int, V: int, dtype: torch.dtype, target: Target) -> RecurrentTiles:
    """V blocks of at most 32 (more programs when B * H is small); 4 warps up to 2048 state entries per program (16 per
    thread), 8 above (at 4, RWKV-6's forward at head dim 128 spilled on sm_86 / sm_89). The same on every target and
    input dtype."""
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)
    return RecurrentTiles(BK, BV, Launch(num_warps=4 if BK * BV <= 2048 else 8, num_stages=3))


def dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest input dtype: it sets the ``tl.dot`` precision (:func:`dot_precision`) and with it the tiles."""
    return torch.float32 if any(t.dtype == torch.float32 for t in tensors) else tensors[0].dtype


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; bf16 / fp16 inputs lose nothing to tf32 tensor-core products."""
    return "ieee" if dtype == torch.float32 else "tf32"
