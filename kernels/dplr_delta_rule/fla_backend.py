"""``backend="fla"`` for :func:`zoo.kernels.dplr_delta_rule.dplr_delta_rule`: flash-linear-attention's
``chunk_rwkv7`` in zoo's contract.

fla's ``chunk_rwkv7`` is its diagonal-plus-low-rank delta rule (``fla.ops.generalized_delta_rule.dplr``) with
``q = r`` and ``gk = w``: per head ``S_t = diag(exp(w_t)) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t`` on a
``[K, V]`` state, ``o_t = r_t S_t``: the same recurrence, layout and argument order as zoo's, with ``a`` the vector
that reads the state and ``b`` the one that writes it (an RWKV-7 layer passes ``a = -kappa_hat``,
``b = kappa_hat * alpha`` to both; checked against :func:`zoo.kernels.dplr_delta_rule.dplr_delta_rule_naive` in
``tests/test_fla_backend.py``). The adapter passes ``scale=1.0`` explicitly, casts ``o`` to fp32 and lets fla
choose its chunk length. fla is imported on first use.
"""
from __future__ import annotations

from zoo.kernels.backends import fla_varlen
from zoo.kernels.rwkv6.fla_backend import check_fla_dtypes


def dplr_delta_rule_fla(r, w_log, k, v, a, b, initial_state, chunk_size, cu_seqlens=None):
    """:func:`zoo.kernels.dplr_delta_rule.dplr_delta_rule` through ``fla.ops.rwkv7.chunk_rwkv7``; returns fp32
    ``(o, final_state)``."""
    from fla.ops.rwkv7 import chunk_rwkv7

    check_fla_dtypes("dplr_delta_rule", r, w_log, k, v, a, b, initial_state)
    o, final = chunk_rwkv7(
        r, w_log, k, v, a, b, scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True,
        **fla_varlen(cu_seqlens, r.device),
    )
    return o.float(), final.float()
