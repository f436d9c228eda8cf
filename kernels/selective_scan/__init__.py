"""Mamba-1 selective scan: ``selective_scan`` (checked entry point), the chunked PyTorch form and the naive reference."""
from __future__ import annotations

import torch

from zoo.kernels.backends import Backend, BackendTable

from .chunked import selective_scan_chunked
from .mamba_ssm_backend import selective_scan_mamba_ssm
from .naive import selective_scan_naive
from .recurrent import selective_scan_recurrent
from .step import selective_scan_step


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "torch",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = (C_t h_t + D u_t) * silu(z_t)``.

    Shapes (time second, unlike mamba_ssm's ``[B, D, T]``): u, delta, z ``[B, T, D]``; A ``[D, N]``;
    B, C ``[B, T, N]``; D, delta_bias ``[D]``; initial_state ``[B, D, N]`` (None: zeros).
    Returns ``(y [B, T, D], final_state [B, D, N])``; the state is fp32 (fp64 for fp64 inputs).
    Torch forms: on CPU the recurrent one with a hand-written backward (cache-sized working set), elsewhere the
    chunked one (few large operations); one token: the step form; ``chunk_size`` is the chunk length of either. ``backend``: ``torch``,
    ``triton_recurrent`` (zoo's fused recurrent kernel) or ``mamba_ssm`` (mamba-ssm's CUDA kernels). Packed documents:
    ``cu_seqlens [n_docs + 1]`` over ``B = 1``, states ``[n_docs, D, N]`` (:mod:`zoo.kernels.backends`).
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size)
    one, cu_seqlens = BACKENDS.one_document(args, cu_seqlens)
    check_scan_shapes("selective_scan", *one[:8], one[9])
    return BACKENDS(backend, *args, cu_seqlens=cu_seqlens)


def selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size):
    """The torch backend: the one-token step for ``T = 1`` (decode); else the recurrent form on CPU, the chunked one
    elsewhere."""
    if u.shape[1] == 1:
        return selective_scan_step(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    form = selective_scan_recurrent if u.device.type == "cpu" else selective_scan_chunked
    return form(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size)


def _mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size):
    return selective_scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)


def check_scan_shapes(op: str, u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Raise a ValueError, prefixed with ``op``, naming the first input whose shape breaks the contract:
    u, delta, z ``[B, T, D]``; A ``[D, N]``; B, C ``[B, T, N]``; D, delta_bias ``[D]``; initial_state ``[B, D, N]``."""
    if u.dim() != 3:
        raise ValueError(f"{op}: u must be [B, T, D], got {list(u.shape)}")
    batch, T, dim = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"{op}: delta must match u {list(u.shape)}, got {list(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{op}: A must be [D={dim}, N], got {list(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, T, n):
            raise ValueError(f"{op}: {name} must be [B, T, N] = {[batch, T, n]}, got {list(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{op}: {name} must be [D={dim}], got {list(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"{op}: z must match u {list(u.shape)}, got {list(z.shape)}")
    if initial_state is not None and initial_state.shape != torch.Size((batch, dim, n)):
        raise ValueError(f"{op}: initial_state must be [B, D, N] = {[batch, dim, n]}, got {list(initial_state.shape)}")


BACKENDS = BackendTable("selective_scan", {
    "torch": Backend(selective_scan_torch),
    "triton_recurrent": Backend("zoo.kernels.selective_scan.triton_scan:selective_scan_triton", "triton"),
    "mamba_ssm": Backend(_mamba_ssm, "mamba_ssm"),
}, aliases={"triton": "triton_recurrent"}, layout="tt.tt.t..s.")
__getattr__ = BACKENDS.exports(__name__, selective_scan_triton="triton_recurrent")


__all__ = ["BACKENDS", "check_scan_shapes", "selective_scan", "selective_scan_chunked", "selective_scan_naive", "selective_scan_recurrent", "selective_scan_step",
           "selective_scan_triton"]
