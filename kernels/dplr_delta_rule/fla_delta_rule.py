"""``backend="fla"`` for :func:`zoo.kernels.dplr_delta_rule.delta_rule.gated_delta_rule` and ``kda_rule``: fla 0.6's
``chunk_gated_delta_rule`` and ``chunk_kda``.

Both take zoo's layout (``q, k [B, T, H, K]``, ``v [B, T, H, V]``, log decay ``g`` ``[B, T, H]`` / ``[B, T, H, K]``,
``beta [B, T, H]`` after the sigmoid, state ``[B, H, K, V]``) and the same rules; the adapters pass ``scale=1.0``
(fla's default is ``K ** -0.5``; zoo's blocks scale q themselves), no l2norm or gate inside the kernel, cast ``o`` to
fp32, give q, k, v and beta one dtype, let fla choose its chunk length and pass packed documents as fla's own
``cu_seqlens``. fla is imported on first use.
"""
from __future__ import annotations

import torch

from zoo.kernels.backends import fla_varlen
from zoo.kernels.rwkv6.fla_backend import check_fla_dtypes


def _common_dtype(q, k, v, beta) -> tuple[torch.Tensor, ...]:
    """fla's ``tl.dot`` needs one dtype: under autocast zoo's blocks pass fp32 q, k (L2-normalised) and bf16 v."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(t.to(dtype) for t in (q, k, v, beta))


def _run_fla(op: str, fn, q, k, v, g, beta, initial_state, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's chunked rule ``fn`` on zoo's inputs: one dtype for q, k, v and beta, fp32 g and state, ``scale=1``;
    fp32 ``(o, final_state)``."""
    check_fla_dtypes(op, q, k, v, g, beta, initial_state)
    q, k, v, beta = _common_dtype(q, k, v, beta)
    o, final = fn(
        q, k, v, g.float(), beta, scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True,
        **fla_varlen(cu_seqlens, q.device),
    )
    return o.float(), final.float()


def gated_delta_rule_fla(q, k, v, g, beta, initial_state, chunk_size, cu_seqlens=None):
    """Gated DeltaNet through ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``; fp32 ``(o, final_state)``."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return _run_fla("gated_delta_rule", chunk_gated_delta_rule, q, k, v, g, beta, initial_state, cu_seqlens)


def kda_fla(q, k, v, g, beta, initial_state, chunk_size, cu_seqlens=None):
    """KDA through ``fla.ops.kda.chunk_kda``; fp32 ``(o, final_state)``."""
    from fla.ops.kda import chunk_kda

    return _run_fla("kda", chunk_kda, q, k, v, g, beta, initial_state, cu_seqlens)
