"""RWKV-6 (Finch) WKV operator: ``rwkv6(r, k, v, w_log, u, initial_state) -> (o, final_state)``."""
from __future__ import annotations


from .chunked import rwkv6_chunked
from .naive import rwkv6_naive


def rwkv6_triton(*args, **kwargs):
    """zoo's Triton kernel (:mod:`.triton_rwkv6`, same arguments as :func:`rwkv6`); Triton is imported on first use,
    so ``import zoo`` never loads it. CPU tensors need ``TRITON_INTERPRET=1`` set before that first use."""
    from .triton_rwkv6 import rwkv6_triton as kernel

    return kernel(*args, **kwargs)

__all__ = ["rwkv6", "rwkv6_chunked", "rwkv6_naive", "rwkv6_triton"]


def rwkv6(r, k, v, w_log, u, initial_state=None, chunk_size: int = 16, backend: str = "torch"):
    """Multi-head WKV with data-dependent decay; ``backend`` ``torch`` (chunked) or ``triton``.

    Shapes: ``r, k, w_log [B, T, H, K]`` (``w_log`` = log decay, <= 0), ``v [B, T, H, V]``, ``u [H, K]``,
    ``initial_state [B, H, K, V]`` or None (zeros). Returns ``(o [B, T, H, V], final_state [B, H, K, V])``;
    both in fp32, or fp64 for fp64 inputs.
    """
    if r.dim() != 4:
        raise ValueError(f"rwkv6: expected r of shape [B, T, H, K], got {list(r.shape)}")
    B, T, H, K = r.shape
    for name, t in (("k", k), ("w_log", w_log)):
        if t.shape != r.shape:
            raise ValueError(f"rwkv6: expected {name} of shape {list(r.shape)} like r, got {list(t.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"rwkv6: expected v of shape [{B}, {T}, {H}, V], got {list(v.shape)}")
    if u.shape != (H, K):
        raise ValueError(f"rwkv6: expected u of shape [{H}, {K}], got {list(u.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"rwkv6: expected initial_state of shape [{B}, {H}, {K}, {v.shape[-1]}], got {list(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"rwkv6: chunk_size must be >= 1, got {chunk_size}")
    if backend == "triton":
        return rwkv6_triton(r, k, v, w_log, u, initial_state, chunk_size)
    if backend != "torch":
        raise ValueError(f"rwkv6: unknown backend '{backend}'; choose torch or triton")
    if T == 1:
        return rwkv6_naive(r, k, v, w_log, u, initial_state)
    return rwkv6_chunked(r, k, v, w_log, u, initial_state, chunk_size)
