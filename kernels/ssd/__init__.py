"""Mamba-2 state-space duality (SSD) scan: ``ssd_scan`` (checked entry point), the chunked form and the naive reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels.backends import Backend, BackendTable

from .chunked import ssd_chunked
from .mamba_ssm_backend import ssd_mamba_ssm
from .naive import ssd_naive
from .step import ssd_step


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "torch",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD with scalar decay per head: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``.

    ``dt = clamp(softplus(dt + dt_bias), *dt_limit)``. Shapes: x ``[B, T, H, P]``; dt ``[B, T, H]``; A, D, dt_bias
    ``[H]``; B, C ``[B, T, G, N]`` (G divides H); initial_state ``[B, H, P, N]`` (None: zeros).
    Returns ``(y [B, T, H, P], final_state [B, H, P, N])``; the state is fp32 (fp64 for fp64 inputs).
    ``backend`` (:data:`BACKENDS`): ``torch`` (chunked; one token: the step form), ``triton_chunk`` (zoo's
    chunk-parallel kernels) or ``mamba_ssm`` (its ``mamba_chunk_scan_combined``); ``auto`` is torch. Packed
    documents: ``cu_seqlens [n_docs + 1]`` over ``B = 1``, states ``[n_docs, H, P, N]`` (:mod:`zoo.kernels.backends`).
    """
    args = (x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)
    check_ssd_shapes("ssd_scan", *one[:7], one[9], chunk_size)
    return BACKENDS(backend, *args, cu_seqlens=cu_seqlens)


def ssd_torch(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, chunk_size):
    """The torch backend of :func:`ssd_scan`: the dt transform, then the one-token step for ``T = 1`` (decode), else
    the chunked form."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    if x.shape[1] == 1:
        return ssd_step(x, dt, A, B, C, D, initial_state)
    return ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size)


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


BACKENDS = BackendTable("ssd_scan", {
    "torch": Backend(ssd_torch),
    "triton_chunk": Backend("zoo.kernels.ssd.triton_ssd:ssd_triton", "triton", varlen=True),
    "mamba_ssm": Backend(ssd_mamba_ssm, "mamba_ssm", varlen=True),
}, aliases={"triton": "triton_chunk"}, layout="tt.tt....s.")
__getattr__ = BACKENDS.exports(__name__, ssd_triton="triton_chunk")

__all__ = ["BACKENDS", "check_ssd_shapes", "ssd_scan", "ssd_chunked", "ssd_naive", "ssd_step", "ssd_triton"]
