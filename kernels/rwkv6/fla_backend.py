"""``backend="fla"`` for :func:`zoo.kernels.rwkv6.rwkv6`: flash-linear-attention's ``chunk_rwkv6`` in zoo's contract.

Both use the ``[B, T, H, K]`` layout, a log decay ``w`` (<= 0), the bonus ``u [H, K]`` and a ``[B, H, K, V]`` state, so
the adapter only converts what differs: fla scales ``r`` by ``K ** -0.5`` unless told ``scale=1.0`` (zoo's RWKV-6
has no scale), returns ``o`` in the input dtype (zoo: fp32) and chooses its own chunk length (zoo's ``chunk_size``
is not used). Packed documents go to fla as its own ``cu_seqlens``. fla is imported on first use.
"""
from __future__ import annotations

import torch

from zoo.kernels.backends import fla_varlen


def rwkv6_fla(r, k, v, w_log, u, initial_state, chunk_size, cu_seqlens=None):
    """:func:`zoo.kernels.rwkv6.rwkv6` through ``fla.ops.rwkv6.chunk_rwkv6``; returns fp32 ``(o, final_state)``."""
    from fla.ops.rwkv6 import chunk_rwkv6

    check_fla_dtypes("rwkv6", r, k, v, w_log, u, initial_state)
    o, final = chunk_rwkv6(
        r, k, v, w_log, u, scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True,
        **fla_varlen(cu_seqlens, r.device),
    )
    return o.float(), final.float()


def check_fla_dtypes(op: str, *tensors: torch.Tensor | None) -> None:
    """fla's Triton kernels take fp32 / bf16 / fp16; zoo's contract also allows fp64 (the torch backend's)."""
    for t in tensors:
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{op}: the fla backend takes float32, bfloat16 or float16 inputs, got {t.dtype}; use backend torch")
