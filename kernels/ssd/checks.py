"""Shape checks of the SSD scan's inputs, shared by every entry point (the dispatcher and the Triton kernel)."""
from __future__ import annotations


def check_ssd_shapes(op: str, x, dt, A, B, C, D, dt_bias, initial_state, chunk_size: int) -> None:
    """Raise a ValueError, prefixed with ``op``, naming the first input that breaks the contract: x ``[B, T, H, P]``;
    dt ``[B, T, H]``; A, D, dt_bias ``[H]``; B, C ``[B, T, G, N]`` (G divides H); initial_state ``[B, H, P, N]``;
    ``chunk_size >= 1``."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [B, T, H, P], got {list(x.shape)}")
    batch, T, heads, p = x.shape
    if dt.shape != (batch, T, heads):
        raise ValueError(f"{op}: dt must be [B, T, H] = {[batch, T, heads]}, got {list(dt.shape)}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (heads,):
            raise ValueError(f"{op}: {name} must be [H={heads}], got {list(t.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, T) or heads % B.shape[2]:
        raise ValueError(f"{op}: B must be [B, T, G, N] with G dividing H={heads}, got {list(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"{op}: C must match B {list(B.shape)}, got {list(C.shape)}")
    n = B.shape[-1]
    if initial_state is not None and initial_state.shape != (batch, heads, p, n):
        raise ValueError(f"{op}: initial_state must be [B, H, P, N] = {[batch, heads, p, n]}, got {list(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
