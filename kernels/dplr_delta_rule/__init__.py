"""The generalized delta rule with a diagonal-plus-rank-1 transition (fla's ``dplr_delta_rule``):
``dplr_delta_rule(r, w_log, k, v, a, b, initial_state) -> (o, final_state)``.

RWKV-7's WKV operator is this op (:mod:`zoo.kernels.rwkv7` keeps its old names); Gated DeltaNet and KDA are
parametrisations of it (:mod:`.delta_rule`).
"""
from __future__ import annotations

from zoo.kernels.backends import Backend, BackendTable
from zoo.kernels.checks import check_head_inputs

from .chunked import dplr_delta_rule_chunked
from .delta_rule import GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_rule, kda_rule
from .fla_backend import dplr_delta_rule_fla
from .naive import dplr_delta_rule_naive
from .recurrent import dplr_delta_rule_recurrent
from .step import dplr_delta_rule_step


def dplr_delta_rule_keys(r, w_log, k, a, b) -> dict:
    """The ``[B, T, H, K]`` inputs of :func:`dplr_delta_rule` by name, for :func:`zoo.kernels.checks.check_head_inputs`."""
    return {"r": r, "w_log": w_log, "k": k, "a": a, "b": b}


__all__ = ["BACKENDS", "GATED_DELTA_BACKENDS", "KDA_BACKENDS", "gated_delta_rule", "kda_rule", "dplr_delta_rule", "dplr_delta_rule_chunked", "dplr_delta_rule_naive", "dplr_delta_rule_step", "dplr_delta_rule_triton", "dplr_delta_rule_triton_chunk"]


def dplr_delta_rule(r, w_log, k, v, a, b, initial_state=None, chunk_size: int = 16, backend: str = "torch", cu_seqlens=None):
    """Generalized delta rule ``S_t = diag(exp(w_log_t)) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t``, ``o_t = r_t S_t``.

    Shapes: ``r, w_log, k, a, b [B, T, H, K]`` (``w_log`` = log decay, <= 0), ``v [B, T, H, V]``,
    ``initial_state [B, H, K, V]`` or None (zeros). Returns ``(o [B, T, H, V], final_state [B, H, K, V])``
    in fp32, or fp64 for fp64 inputs. ``backend`` (:data:`BACKENDS`; ``auto`` is torch): ``triton_recurrent`` (fused
    recurrent), ``triton_chunk`` (chunk-parallel forward and backward), ``fla`` or ``torch``: on CPU the
    recurrent form with a hand-written backward, elsewhere the chunked form (one token: the step form). Packed
    documents: ``cu_seqlens [n_docs + 1]`` over ``B = 1``, states ``[n_docs, H, K, V]`` (:mod:`zoo.kernels.backends`).
    """
    args = (r, w_log, k, v, a, b, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)
    check_head_inputs("dplr_delta_rule", dplr_delta_rule_keys(r, w_log, k, a, b), v, one[6], chunk_size)
    return BACKENDS(backend, *args, cu_seqlens=cu_seqlens)


def dplr_delta_rule_torch(r, w_log, k, v, a, b, initial_state, chunk_size):
    """The torch backend: the one-token step for ``T = 1`` (decode); else on CPU the recurrent form, elsewhere the
    chunked one."""
    if r.shape[1] == 1:
        return dplr_delta_rule_step(r, w_log, k, v, a, b, initial_state)
    form = dplr_delta_rule_recurrent if r.device.type == "cpu" else dplr_delta_rule_chunked
    return form(r, w_log, k, v, a, b, initial_state, chunk_size)


BACKENDS = BackendTable("dplr_delta_rule", {
    "torch": Backend(dplr_delta_rule_torch),
    "triton_recurrent": Backend("zoo.kernels.dplr_delta_rule.triton_dplr_delta_rule:dplr_delta_rule_triton", "triton", varlen=True),
    "triton_chunk": Backend("zoo.kernels.dplr_delta_rule.triton_chunk_parallel:dplr_delta_rule_chunk_parallel", "triton", varlen=True),
    "fla": Backend(dplr_delta_rule_fla, "fla", varlen=True),
}, aliases={"triton": "triton_recurrent"}, layout="tttttts.")
__getattr__ = BACKENDS.exports(__name__, dplr_delta_rule_triton="triton_recurrent", dplr_delta_rule_triton_chunk="triton_chunk")
