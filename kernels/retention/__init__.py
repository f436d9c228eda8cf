"""Retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models").

Three equivalent forms: ``recurrent`` (Eq. 6, :mod:`.naive`), ``parallel`` (Eq. 5) and ``chunk`` (Eq. 7).
"""
from __future__ import annotations

import warnings

import torch

from zoo.kernels.backends import Backend, BackendTable
from zoo.kernels.checks import check_head_inputs

from .chunked import retention_chunked
from .fla_backend import retention_fla
from .naive import retention_recurrent
from .parallel import retention_parallel
from .step import retention_step


FORMS = ("chunk", "parallel", "recurrent")


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    form: str = "chunk",
    chunk_size: int = 64,
    backend: str = "torch",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head retention ``o_n = Q_n S_n``, ``S_n = gamma_h S_{n-1} + K_n^T V_n``.

    q, k: [B, T, H, K] (rotated and scaled by the caller); v: [B, T, H, V]; log_decay: [H], ``log gamma_h`` (<= 0);
    initial_state: [B, H, K, V] or None (zeros). Computes in fp32 (fp64 for fp64 inputs).
    Returns o [B, T, H, V] in v's dtype and final_state [B, H, K, V] in the compute dtype.
    ``backend`` (:data:`BACKENDS`; ``auto`` is torch): ``torch`` (the ``form`` given; one token: the step form);
    zoo's Triton kernels, any ``form``: ``triton_recurrent`` (fused recurrent), ``triton_chunk_serial`` (one program
    walks the chunks) or ``triton_chunk`` (chunk-parallel); ``fla`` (fla's chunked kernel). Packed documents:
    ``cu_seqlens [n_docs + 1]`` over ``B = 1``, states ``[n_docs, H, K, V]`` (:mod:`zoo.kernels.backends`).
    """
    args = (q, k, v, log_decay, initial_state, form, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)
    check_retention_inputs("retention", *one[:5], chunk_size)
    if form not in FORMS:
        raise ValueError(f"retention: unknown form '{form}'; choose one of {', '.join(FORMS)}")
    if backend == "triton" and form == "recurrent":  # what the deprecated name ran for this form
        warnings.warn("retention backend 'triton' with form='recurrent' is a deprecated name; use 'triton_recurrent', the same kernel",
                      FutureWarning, stacklevel=2)
        backend = "triton_recurrent"
    o, final = BACKENDS(backend, *args, cu_seqlens=cu_seqlens)
    return o.to(v.dtype), final


def retention_torch(q, k, v, log_decay, initial_state, form: str, chunk_size: int):
    """The torch backend: the one-token step for ``T = 1`` (decode, any ``form``), else the ``form`` asked for."""
    if q.shape[1] == 1:
        return retention_step(q, k, v, log_decay, initial_state)
    if form == "chunk":
        return retention_chunked(q, k, v, log_decay, initial_state, chunk_size)
    if form == "parallel":
        return retention_parallel(q, k, v, log_decay, initial_state)
    return retention_recurrent(q, k, v, log_decay, initial_state)


def check_retention_inputs(op: str, q, k, v, log_decay, initial_state, chunk_size: int) -> int:
    """The shapes of :func:`retention`'s contract (shared with the Triton kernels); returns the head dim K."""
    _, _, H, K = check_head_inputs(op, {"q": q, "k": k}, v, initial_state, chunk_size)
    if log_decay.shape != (H,):
        raise ValueError(f"{op}: log_decay must be [H] = [{H}], got {list(log_decay.shape)}")
    return K


__all__ = ["BACKENDS", "FORMS", "check_retention_inputs", "retention", "retention_chunked", "retention_parallel", "retention_recurrent", "retention_step", "retention_triton",
           "retention_triton_chunk"]

TRITON = "zoo.kernels.retention.triton_retention"
BACKENDS = BackendTable("retention", {
    "torch": Backend(retention_torch),
    "triton_recurrent": Backend(f"{TRITON}:retention_triton_recurrent", "triton", varlen=True),
    "triton_chunk_serial": Backend(f"{TRITON}:retention_triton_chunk_serial", "triton"),
    "triton_chunk": Backend("zoo.kernels.retention.triton_chunk_parallel:retention_chunk_parallel", "triton", varlen=True),
    "fla": Backend(retention_fla, "fla", varlen=True),
}, aliases={"triton": "triton_chunk_serial"}, layout="ttt.s..")
__getattr__ = BACKENDS.exports(__name__, retention_triton=f"{TRITON}:retention_triton", retention_triton_chunk="triton_chunk")
