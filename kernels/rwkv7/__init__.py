"""RWKV-7 (Goose) WKV operator: ``rwkv7(r, w_log, k, v, a, b, initial_state) -> (o, final_state)``."""
from __future__ import annotations

from zoo.kernels.backends import Backend, BackendTable
from zoo.kernels.checks import check_head_inputs

from .chunked import rwkv7_chunked
from .delta_rule import GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_rule, kda_rule
from .fla_backend import rwkv7_fla
from .naive import rwkv7_naive
from .recurrent import rwkv7_recurrent
from .step import rwkv7_step


def rwkv7_keys(r, w_log, k, a, b) -> dict:
    """The ``[B, T, H, K]`` inputs of :func:`rwkv7` by name, for :func:`zoo.kernels.checks.check_head_inputs`."""
    return {"r": r, "w_log": w_log, "k": k, "a": a, "b": b}


__all__ = ["BACKENDS", "GATED_DELTA_BACKENDS", "KDA_BACKENDS", "gated_delta_rule", "kda_rule", "rwkv7", "rwkv7_chunked", "rwkv7_naive", "rwkv7_step", "rwkv7_triton", "rwkv7_triton_chunk"]


def rwkv7(r, w_log, k, v, a, b, initial_state=None, chunk_size: int = 16, backend: str = "torch", cu_seqlens=None):
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
    check_head_inputs("rwkv7", rwkv7_keys(r, w_log, k, a, b), v, one[6], chunk_size)
    return BACKENDS(backend, *args, cu_seqlens=cu_seqlens)


def rwkv7_torch(r, w_log, k, v, a, b, initial_state, chunk_size):
    """The torch backend: the one-token step for ``T = 1`` (decode); else on CPU the recurrent form, elsewhere the
    chunked one."""
    if r.shape[1] == 1:
        return rwkv7_step(r, w_log, k, v, a, b, initial_state)
    form = rwkv7_recurrent if r.device.type == "cpu" else rwkv7_chunked
    return form(r, w_log, k, v, a, b, initial_state, chunk_size)


BACKENDS = BackendTable("rwkv7", {
    "torch": Backend(rwkv7_torch),
    "triton_recurrent": Backend("zoo.kernels.rwkv7.triton_rwkv7:rwkv7_triton", "triton", varlen=True),
    "triton_chunk": Backend("zoo.kernels.rwkv7.triton_chunk_parallel:rwkv7_chunk_parallel", "triton"),
    "fla": Backend(rwkv7_fla, "fla", varlen=True),
}, aliases={"triton": "triton_recurrent"}, layout="tttttts.")
__getattr__ = BACKENDS.exports(__name__, rwkv7_triton="triton_recurrent", rwkv7_triton_chunk="triton_chunk")
