"""Gated DeltaNet and KDA on zoo's Triton kernels of the generalized delta rule, parametrised inside the scan.

``gated_delta_rule`` / ``kda_rule`` with ``backend: triton_recurrent`` or ``triton_chunk`` run the kernels of
:func:`~zoo.kernels.dplr_delta_rule.dplr_delta_rule` (:mod:`.triton_dplr_delta_rule`: grid ``(cdiv(V, BV), B * H)``;
:mod:`.triton_chunk_parallel`: per chunk ``(cdiv(T, 16), cdiv(V, BV), B * H)``; both take packed documents
(``cu_seqlens``) in one launch sequence when they fit, else run once per document) on the inputs
``(w_log, a, b, k') = params(k, g, beta)`` of :mod:`.delta_rule`. Those are built per launch, inside the scan's autograd function: under segmented recompute
(:func:`~zoo.kernels.triton_common.scan_function`) one segment's ``[B, S, H, K]`` fp32 at a time, never the whole
sequence's, and the backward rebuilds them from ``(k, g, beta)`` and takes their gradients back to ``(k, g, beta)``
through autograd of ``params`` (elementwise, one segment). So the op's saved tensors are its own inputs.
"""
from __future__ import annotations

from typing import Callable

import torch

from zoo.kernels.checks import check_head_inputs
from zoo.kernels.dplr_delta_rule.delta_rule import GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_inputs, kda_inputs
from zoo.kernels.dplr_delta_rule.triton_chunk_parallel import (
    _dplr_cp_bwd, _dplr_cp_output_kernel, dplr_cp_fwd, dplr_cp_varlen_in_one_launch,
)
from zoo.kernels.dplr_delta_rule.triton_dplr_delta_rule import _dplr_fwd_kernel, dplr_bwd, dplr_fwd
from zoo.kernels.triton_common import check_triton_call, scan_function, varlen_in_one_launch

Params = Callable[..., tuple[torch.Tensor, ...]]


def _parametrised(params: Params, fwd: Callable, bwd: Callable) -> tuple[Callable, Callable]:
    """The forward and backward launchers of a scan over ``(q, k, v, g, beta)`` from those of the generalized delta
    rule over ``(r, w_log, k', v, a, b)``, ``params(k, g, beta) -> (w_log, a, b, k')`` applied inside each."""

    def forward(q, k, v, g, beta, initial_state, *config):
        w_log, a, b, k_write = params(k, g, beta)
        return fwd(q, w_log, k_write, v, a, b, initial_state, *config)

    def backward(q, k, v, g, beta, d_out, d_final, *rest):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (k, g, beta)]
            w_log, a, b, k_write = params(*leaves)
            dr, dw, dk_write, dv, da, db, ds0 = bwd(q, *(t.detach() for t in (w_log, k_write)), v,
                                                    *(t.detach() for t in (a, b)), d_out, d_final, *rest)
            dk, dg, dbeta = torch.autograd.grad((w_log, a, b, k_write), leaves, (dw, da, db, dk_write))
        return dr, dk, dv, dg, dbeta, ds0

    return forward, backward


def _state_elements(q, k, v, *_):
    return q.shape[0] * q.shape[2] * q.shape[3] * v.shape[-1]


def _backend(op: str, params: Params, table, recurrent: bool) -> Callable:
    """The op's ``triton_recurrent`` (packed documents in one launch when
    :func:`~zoo.kernels.triton_common.varlen_in_one_launch`, else one call per document) or ``triton_chunk`` (packed
    documents in one launch sequence when :func:`.triton_chunk_parallel.dplr_cp_varlen_in_one_launch`, else one call
    per document) backend."""
    if recurrent:
        function = scan_function(*_parametrised(params, dplr_fwd, dplr_bwd), n_config=2, layout="ttttt",
                                 state_elements=_state_elements)
        kernel = _dplr_fwd_kernel
    else:
        function = scan_function(*_parametrised(params, dplr_cp_fwd, _dplr_cp_bwd), n_config=2, layout="ttttt",
                                 state_elements=_state_elements)
        kernel = _dplr_cp_output_kernel
    name = f"{op}_{'triton_recurrent' if recurrent else 'triton_chunk'}"

    def run(q, k, v, g, beta, initial_state=None, chunk_size: int = 16, cu_seqlens=None):
        args = (q, k, v, g, beta, initial_state, chunk_size)
        one, cu_seqlens = table.one_document(args, cu_seqlens)
        K = check_head_inputs(name, {"q": q, "k": k}, v, one[5], chunk_size)[3]
        if cu_seqlens is not None and not (
                varlen_in_one_launch(cu_seqlens, _state_elements(q, k, v), chunk_size, q.shape[2]) if recurrent
                else dplr_cp_varlen_in_one_launch(cu_seqlens, q, v, chunk_size)):
            return table.per_document(run, args, cu_seqlens)
        n = q.shape[0] if cu_seqlens is None else len(cu_seqlens.bounds) - 1
        check_triton_call(name, kernel, q, k, v, g, beta, initial_state, head_dim=K, batch_heads=n * q.shape[2])
        return function.apply(*args, cu_seqlens)

    return run


gated_delta_rule_triton_recurrent = _backend("gated_delta_rule", gated_delta_inputs, GATED_DELTA_BACKENDS, True)
gated_delta_rule_triton_chunk = _backend("gated_delta_rule", gated_delta_inputs, GATED_DELTA_BACKENDS, False)
kda_triton_recurrent = _backend("kda", kda_inputs, KDA_BACKENDS, True)
kda_triton_chunk = _backend("kda", kda_inputs, KDA_BACKENDS, False)
