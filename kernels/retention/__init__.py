"""Retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models").

Three equivalent forms: ``recurrent`` (Eq. 6, :mod:`.naive`), ``parallel`` (Eq. 5) and ``chunk`` (Eq. 7).
"""
from __future__ import annotations

import torch

from zoo.kernels.backends import Backend, BackendTable
from zoo.kernels.checks import check_head_inputs

from .chunked import retention_chunked
from .fla_backend import retention_fla
from .naive import retention_recurrent
from .parallel import retention_parallel
from .step import retention_step


def retention_triton(*args, **kwargs):
    """zoo's Triton kernel (:mod:`.triton_retention`, same arguments as :func:`retention`); Triton is imported on first use,
    so ``import zoo`` never loads it. CPU tensors need ``TRITON_INTERPRET=1`` set before that first use."""
    from .triton_retention import retention_triton as kernel

    return kernel(*args, **kwargs)


def retention_triton_chunk(*args, **kwargs):
    """zoo's chunk-parallel Triton kernels (:mod:`.triton_chunk_parallel`, same arguments as :func:`retention`; ``form``
    is not used): parallel over (chunks x batch x heads), states passed between chunks by a small sequential kernel.
    Triton is imported on first use."""
    from .triton_chunk_parallel import retention_chunk_parallel as kernel

    return kernel(*args, **kwargs)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head retention ``o_n = Q_n S_n``, ``S_n = gamma_h S_{n-1} + K_n^T V_n``.

    q, k: [B, T, H, K] (rotated and scaled by the caller); v: [B, T, H, V]; log_decay: [H], ``log gamma_h`` (<= 0);
    initial_state: [B, H, K, V] or None (zeros). Computes in fp32 (fp64 for fp64 inputs).
    Returns o [B, T, H, V] in v's dtype and final_state [B, H, K, V] in the compute dtype.
    ``backend`` (:data:`BACKENDS`; ``auto`` is torch): ``torch`` (the ``form`` given; one token: the step form) or ``triton`` (zoo's kernels:
    ``form`` ``recurrent`` runs the fused recurrent one, the others the chunked one) or ``triton_chunk`` (zoo's
    chunk-parallel kernels, any ``form``).
    """
    check_retention_inputs("retention", q, k, v, log_decay, initial_state, chunk_size)
    if form not in FORMS:
        raise ValueError(f"retention: unknown form '{form}'; choose one of {', '.join(FORMS)}")
    o, final = BACKENDS(backend, q, k, v, log_decay, initial_state, form, chunk_size)
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


BACKENDS = BackendTable("retention", {"torch": Backend(retention_torch), "triton": Backend(retention_triton, "triton"), "fla": Backend(retention_fla, "fla"),
                                   "triton_chunk": Backend(retention_triton_chunk, "triton")})
