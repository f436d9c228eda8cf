"""RWKV-6 (Finch) WKV operator: ``rwkv6(r, k, v, w_log, u, initial_state) -> (o, final_state)``."""
from __future__ import annotations


from zoo.kernels.backends import Backend, BackendTable
from zoo.kernels.checks import check_head_inputs

from .chunked import rwkv6_chunked
from .fla_backend import rwkv6_fla
from .naive import rwkv6_naive
from .step import rwkv6_step


def check_rwkv6_inputs(op: str, r, k, v, w_log, u, initial_state, chunk_size: int) -> tuple[int, int, int, int]:
    """The shapes of :func:`rwkv6`'s contract (shared with the Triton kernel); returns ``(B, T, H, K)``."""
    B, T, H, K = check_head_inputs(op, {"r": r, "k": k, "w_log": w_log}, v, initial_state, chunk_size)
    if u.shape != (H, K):
        raise ValueError(f"{op}: u must be [H, K] = [{H}, {K}], got {list(u.shape)}")
    return B, T, H, K


__all__ = ["BACKENDS", "check_rwkv6_inputs", "rwkv6", "rwkv6_chunked", "rwkv6_naive", "rwkv6_step", "rwkv6_triton", "rwkv6_triton_chunk"]


def rwkv6(r, k, v, w_log, u, initial_state=None, chunk_size: int = 16, backend: str = "torch", cu_seqlens=None):
    """Multi-head WKV with data-dependent decay; ``backend`` (:data:`BACKENDS`; ``auto`` is torch): ``torch`` (chunked;
    one token: the step form), ``triton_recurrent`` (fused recurrent), ``triton_chunk`` (chunk-parallel) or ``fla``.

    Shapes: ``r, k, w_log [B, T, H, K]`` (``w_log`` = log decay, <= 0), ``v [B, T, H, V]``, ``u [H, K]``,
    ``initial_state [B, H, K, V]`` or None (zeros). Returns ``(o [B, T, H, V], final_state [B, H, K, V])``;
    both in fp32, or fp64 for fp64 inputs. Packed documents: ``cu_seqlens [n_docs + 1]`` over ``B = 1``, states
    ``[n_docs, H, K, V]`` (:mod:`zoo.kernels.backends`).
    """
    args = (r, k, v, w_log, u, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)
    check_rwkv6_inputs("rwkv6", *one)
    return BACKENDS(backend, *args, cu_seqlens=cu_seqlens)


def rwkv6_torch(r, k, v, w_log, u, initial_state, chunk_size):
    """The torch backend: the one-token step for ``T = 1`` (decode), else chunked."""
    if r.shape[1] == 1:
        return rwkv6_step(r, k, v, w_log, u, initial_state)
    return rwkv6_chunked(r, k, v, w_log, u, initial_state, chunk_size)


BACKENDS = BackendTable("rwkv6", {
    "torch": Backend(rwkv6_torch),
    "triton_recurrent": Backend("zoo.kernels.rwkv6.triton_rwkv6:rwkv6_triton", "triton", varlen=True),
    "triton_chunk": Backend("zoo.kernels.rwkv6.triton_chunk_parallel:rwkv6_chunk_parallel", "triton", varlen=True),
    "fla": Backend(rwkv6_fla, "fla", varlen=True),
}, aliases={"triton": "triton_recurrent"}, layout="tttt.s.")
__getattr__ = BACKENDS.exports(__name__, rwkv6_triton="triton_recurrent", rwkv6_triton_chunk="triton_chunk")
