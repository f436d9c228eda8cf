"""``backend="fla"`` for :func:`zoo.kernels.retention.retention`: flash-linear-attention's chunked kernels.

fla's ``chunk_retention`` hard-codes RetNet's decays ``log(1 - 2^(-5 - h))`` and scales ``q`` by ``K ** -0.5``;
zoo's retention takes any ``log_decay [H]`` and gets ``q`` already scaled. Retention is simple GLA with a constant
per-head gate, so the adapter calls ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g_gamma=log_decay, scale=1.0)``
(what ``chunk_retention`` calls with its fixed decays). fla gives no gradient to ``g_gamma``: a ``log_decay`` that
requires grad is refused rather than silently left without one. ``form`` and ``chunk_size`` are not used (fla
chunks on its own); packed documents go to fla as its ``cu_seqlens``; ``o`` comes back fp32, cast to ``v``'s dtype
by :func:`retention`. fla is imported on first use.
"""
from __future__ import annotations

from zoo.kernels.backends import fla_varlen
from zoo.kernels.rwkv6.fla_backend import check_fla_dtypes


def retention_fla(q, k, v, log_decay, initial_state, form: str, chunk_size: int, cu_seqlens=None):
    """:func:`zoo.kernels.retention.retention` through ``chunk_simple_gla``; returns fp32 ``(o, final_state)``."""
    from fla.ops.simple_gla import chunk_simple_gla

    check_fla_dtypes("retention", q, k, v, initial_state)
    if log_decay.requires_grad:
        raise ValueError("retention: the fla backend gives no gradient to log_decay; pass a constant one or use backend torch/triton")
    o, final = chunk_simple_gla(
        q, k, v, g_gamma=log_decay.float(), scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True,
        **fla_varlen(cu_seqlens, q.device),
    )
    return o.float(), final.float()
