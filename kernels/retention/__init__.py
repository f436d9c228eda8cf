"""Retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models").

Three equivalent forms: ``recurrent`` (Eq. 6, :mod:`.naive`), ``parallel`` (Eq. 5) and ``chunk`` (Eq. 7).
"""
from __future__ import annotations

import torch

from .chunked import retention_chunked
from .naive import retention_recurrent
from .parallel import retention_parallel


def retention_triton(*args, **kwargs):
    """zoo's Triton kernel (:mod:`.triton_retention`, same arguments as :func:`retention`); Triton is imported on first use,
    so ``import zoo`` never loads it. CPU tensors need ``TRITON_INTERPRET=1`` set before that first use."""
    from .triton_retention import retention_triton as kernel

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
    ``backend``: ``torch`` (the ``form`` given) or ``triton`` (zoo's kernels: ``form`` ``recurrent`` runs the fused
    recurrent one, the others the chunked one).
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"retention: q and k must both be [B, T, H, K], got {list(q.shape)} and {list(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"retention: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    if log_decay.shape != (H,):
        raise ValueError(f"retention: log_decay must be [H] = [{H}], got {list(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"retention: initial_state must be [B, H, K, V] = {[B, H, K, v.shape[-1]]}, got {list(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"retention: chunk_size must be >= 1, got {chunk_size}")
    if backend == "triton":
        o, final = retention_triton(q, k, v, log_decay, initial_state, form, chunk_size)
    elif backend != "torch":
        raise ValueError(f"retention: unknown backend '{backend}'; choose torch or triton")
    elif form == "chunk":
        o, final = retention_chunked(q, k, v, log_decay, initial_state, chunk_size)
    elif form == "parallel":
        o, final = retention_parallel(q, k, v, log_decay, initial_state)
    elif form == "recurrent":
        o, final = retention_recurrent(q, k, v, log_decay, initial_state)
    else:
        raise ValueError(f"retention: unknown form '{form}'; choose one of {', '.join(FORMS)}")
    return o.to(v.dtype), final


__all__ = ["FORMS", "retention", "retention_chunked", "retention_parallel", "retention_recurrent", "retention_triton"]
