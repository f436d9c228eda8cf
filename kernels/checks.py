"""Input checks shared by the entry points of the multi-head recurrences (RWKV-6, RWKV-7, retention): the dispatcher
of each op and its Triton kernel raise the same errors. No Triton import here (``import zoo`` never loads Triton)."""
from __future__ import annotations

import torch


def check_head_inputs(op: str, keys: dict[str, torch.Tensor], v: torch.Tensor, initial_state: torch.Tensor | None,
                      chunk_size: int) -> tuple[int, int, int, int]:
    """Check ``keys`` (name -> tensor, all ``[B, T, H, K]`` like the first), ``v [B, T, H, V]``, ``initial_state
    [B, H, K, V]`` (or None) and ``chunk_size >= 1``; a ValueError prefixed with ``op`` names the first bad input.
    Returns ``(B, T, H, K)``."""
    (first_name, first), *rest = keys.items()
    if first.dim() != 4:
        raise ValueError(f"{op}: {first_name} must be [B, T, H, K], got {list(first.shape)}")
    B, T, H, K = first.shape
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} must be [B, T, H, K] = {list(first.shape)} like {first_name}, got {list(t.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {[B, H, K, v.shape[-1]]}, got {list(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    return B, T, H, K
