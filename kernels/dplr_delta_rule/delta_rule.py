"""Gated DeltaNet's and Kimi Delta Attention's rules as parametrisations of the generalized delta rule
(:func:`dplr_delta_rule`).

Per head, with a ``[K, V]`` state, row vectors ``q_t, k_t [K]``, ``v_t [V]``, ``beta_t`` in (0, 1) and log decays
``g_t <= 0`` (a scalar per head for Gated DeltaNet, Yang, Kautz & Hatamizadeh, ICLR 2025; one per key channel for
KDA, Kimi Linear 2025):

- Gated DeltaNet: ``S_t = e^{g_t} (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``;
- KDA:            ``S_t = (I - beta_t k_t^T k_t) Diag(e^{g_t}) S_{t-1} + beta_t k_t^T v_t``;
- both read       ``o_t = q_t S_t``.

:func:`dplr_delta_rule` computes ``S_t = Diag(e^{w_log_t}) S_{t-1} + b_t^T (a_t S_{t-1}) + k'_t^T v_t``. Expanding the rules:
Gated DeltaNet is ``w_log = g`` on every channel, ``a = k``, ``b = -beta e^{g} k``, ``k' = beta k``
(``k (e^g S) = e^g (k S)``); KDA is ``w_log = g``, ``a = e^{g} * k``, ``b = -beta k``, ``k' = beta k``
(``k Diag(e^g) S = (e^g * k) S``). ``tests/test_gated_deltanet.py`` checks both against a direct recurrence.

``backend`` names the same algorithms as :data:`zoo.kernels.dplr_delta_rule.BACKENDS`: ``torch`` runs
:func:`dplr_delta_rule` on the parametrised inputs; ``triton_recurrent`` / ``triton_chunk`` run its kernels with the
inputs built inside the scan, one segment at a time (``triton_delta_rule.py``); ``fla`` runs fla's own ``chunk_gated_delta_rule`` / ``chunk_kda``
(``fla_delta_rule.py``).
"""
from __future__ import annotations

from typing import Callable

import torch

from zoo.kernels.backends import Backend, BackendTable


def gated_delta_inputs(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(w_log, a, b, k')`` of :func:`dplr_delta_rule` for Gated DeltaNet: ``k [B, T, H, K]``, ``g, beta [B, T, H]``."""
    k, g, beta = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (k, g, beta))
    w_log = g[..., None].expand_as(k).contiguous()  # [B, T, H, K]
    return w_log, k, -(beta * g.exp())[..., None] * k, beta[..., None] * k


def kda_inputs(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(w_log, a, b, k')`` of :func:`dplr_delta_rule` for KDA: ``k, g [B, T, H, K]``, ``beta [B, T, H]``."""
    k, g, beta = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (k, g, beta))
    return g, g.exp() * k, -beta[..., None] * k, beta[..., None] * k


def _through_dplr(params: Callable[..., tuple[torch.Tensor, ...]], backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The rule run as :func:`dplr_delta_rule` with ``backend`` on the inputs ``params`` builds."""

    def run(q, k, v, g, beta, initial_state, chunk_size, cu_seqlens=None):
        from zoo.kernels.dplr_delta_rule import dplr_delta_rule

        w_log, a, b, k_write = params(k, g, beta)
        return dplr_delta_rule(q, w_log, k_write, v, a, b, initial_state, chunk_size=chunk_size, backend=backend, cu_seqlens=cu_seqlens)

    return run


def _table(op: str, params: Callable[..., tuple[torch.Tensor, ...]], prefix: str) -> BackendTable:
    """The op's backends: torch through :func:`dplr_delta_rule` (packed documents: its own), zoo's Triton kernels with the
    parametrisation inside the scan (:mod:`.triton_delta_rule`), fla's own kernels (its ``cu_seqlens``)."""
    triton = f"zoo.kernels.dplr_delta_rule.triton_delta_rule:{prefix}"
    return BackendTable(op, {
        "torch": Backend(_through_dplr(params, "torch"), varlen=True),
        "triton_recurrent": Backend(f"{triton}_triton_recurrent", "triton", varlen=True),
        "triton_chunk": Backend(f"{triton}_triton_chunk", "triton", varlen=True),
        "fla": Backend(f"zoo.kernels.dplr_delta_rule.fla_delta_rule:{prefix}_fla", "fla", varlen=True),
    }, layout="ttttts.")


GATED_DELTA_BACKENDS = _table("gated_delta_rule", gated_delta_inputs, "gated_delta_rule")
KDA_BACKENDS = _table("kda", kda_inputs, "kda")


def _check(op: str, q, k, v, g, beta, initial_state, g_shape: tuple[int, ...]) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"{op}: q and k must be [B, T, H, K] alike, got {list(q.shape)} and {list(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    if g.shape != g_shape:
        raise ValueError(f"{op}: g must be {list(g_shape)}, got {list(g.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"{op}: beta must be [B, T, H] = {[B, T, H]}, got {list(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {[B, H, K, v.shape[-1]]}, got {list(initial_state.shape)}")


def gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size: int = 16, backend: str = "torch", cu_seqlens=None):
    """Gated DeltaNet: ``S_t = e^{g_t} (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``, ``o_t = q_t S_t``.

    ``q, k [B, T, H, K]`` (no scaling applied here), ``v [B, T, H, V]``, ``g`` (log decay <= 0), ``beta [B, T, H]``,
    ``initial_state [B, H, K, V]`` or None. Returns ``(o [B, T, H, V], final_state [B, H, K, V])`` in fp32 (fp64 for
    fp64 inputs). Launch grids: those of :func:`dplr_delta_rule`'s backend, or fla's. Packed documents: ``cu_seqlens [n_docs + 1]``
    over ``B = 1``, states ``[n_docs, H, K, V]`` (:mod:`zoo.kernels.backends`)."""
    args = (q, k, v, g, beta, initial_state, chunk_size)
    one, cu_seqlens = GATED_DELTA_BACKENDS.one_document(args, cu_seqlens)
    _check("gated_delta_rule", *one[:6], q.shape[:3])
    return GATED_DELTA_BACKENDS(backend, *args, cu_seqlens=cu_seqlens)


def kda_rule(q, k, v, g, beta, initial_state=None, chunk_size: int = 16, backend: str = "torch", cu_seqlens=None):
    """KDA: ``S_t = (I - beta_t k_t^T k_t) Diag(e^{g_t}) S_{t-1} + beta_t k_t^T v_t``, ``o_t = q_t S_t``.

    ``q, k, g [B, T, H, K]`` (``g`` log decay <= 0 per channel), ``v [B, T, H, V]``, ``beta [B, T, H]``, state
    ``[B, H, K, V]`` or None. Returns ``(o [B, T, H, V], final_state [B, H, K, V])`` as :func:`gated_delta_rule`;
    packed documents (``cu_seqlens``) as there."""
    args = (q, k, v, g, beta, initial_state, chunk_size)
    one, cu_seqlens = KDA_BACKENDS.one_document(args, cu_seqlens)
    _check("kda", *one[:6], q.shape)
    return KDA_BACKENDS(backend, *args, cu_seqlens=cu_seqlens)
