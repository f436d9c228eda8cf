"""fla's RWKV-6, RWKV-7 and RetNet layers and models on CPU without Triton: their Triton ops swapped for fla's own
torch references (RWKV-6: :func:`fla_rwkv6_on_torch`; RetNet: :func:`fla_retnet_on_torch`).

``fla_rwkv7_on_torch()`` (a context manager) replaces, in ``fla.layers.rwkv7`` and ``fla.models.rwkv7``, the
Triton ops fla's ``RWKV7Attention`` and ``RWKV7FeedForward`` call: ``token_shift`` (a zero-padded shift, carrying a
cache), ``fused_addcmul_rwkv7`` -> ``torch_addcmul_rwkv7``, ``fused_k_rwkv7`` -> ``k_update_ref``,
``gate_output_correction`` -> ``gate_output_correction_ref``, and ``chunk_rwkv7`` / ``fused_mul_recurrent_rwkv7``
-> fla's sequential ``dplr_recurrence`` (``fla.ops.generalized_delta_rule.dplr.naive``). fla's chunked kernel itself
is checked against zoo's reference in tests/test_fla_backend.py. Build fla models with ``fuse_norm=False`` so
LayerNorm and GroupNorm are torch's.
"""
import contextlib

import pytest
import torch


def _token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **kwargs):
    """``delta = x_{t-1} - x_t`` with ``x_{-1}`` the cache (zeros without); the new cache is the last token ``[B, 1, D]``."""
    prev = torch.zeros_like(x[:, :1]) if cache is None else cache.reshape(x.shape[0], 1, x.shape[2]).to(x)
    delta = torch.cat((prev, x[:, :-1]), dim=1) - x  # [B, T, D]
    return (delta, x[:, -1:]) if output_cache else delta


def _dplr(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, **kwargs):
    """fla's sequential generalized delta rule on ``[B, T, H, K]`` inputs (it takes ``[B, H, T, K]`` and scales q by K^-0.5)."""
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    q = r * scale * r.shape[-1] ** 0.5
    o, state = dplr_recurrence(*(t.transpose(1, 2) for t in (q, k, v, a, b, w)), initial_state, output_final_state=True)
    return o.transpose(1, 2), state if output_final_state else None


def _mul_recurrent(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False, **kwargs):
    return _dplr(r, w, k, v, -kk, kk * a, scale, initial_state, output_final_state)


# fla's Triton activations (built into layers at construction) in torch
TORCH_ACTIVATIONS = {"swish": torch.nn.functional.silu, "sqrelu": lambda x: torch.relu(x).square()}


def _rwkv6(r, k, v, w, u, scale=1.0, initial_state=None, output_final_state=False, **kwargs):
    """fla's sequential RWKV-6 on ``[B, T, H, K]`` inputs (it takes ``[B, H, T, K]``)."""
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    o, state = naive_recurrent_rwkv6(*(t.transpose(1, 2) for t in (r, k, v, w)), u, scale, initial_state, output_final_state)
    return o.transpose(1, 2), state


@contextlib.contextmanager
def fla_rwkv6_on_torch():
    """fla's RWKV-6 with its torch references: the token shift, ``naive_recurrent_rwkv6`` for ``chunk_rwkv6`` and
    ``fused_recurrent_rwkv6``, ``GroupNormRef`` for the Triton GroupNorm and torch activations (models must be built
    inside: layers keep their norm and activation from construction)."""
    pytest.importorskip("fla")
    import fla.layers.rwkv6 as layer
    import fla.models.rwkv6.modeling_rwkv6 as modeling
    from fla.modules.norm.layernorm import GroupNormRef

    with pytest.MonkeyPatch.context() as mp:
        for module in (layer, modeling):
            mp.setattr(module, "token_shift", _token_shift)
        mp.setattr(layer, "chunk_rwkv6", _rwkv6)
        mp.setattr(layer, "fused_recurrent_rwkv6", _rwkv6)
        mp.setattr(layer, "GroupNorm", GroupNormRef)
        for module in (layer, modeling):
            mp.setattr(module, "ACT2FN", TORCH_ACTIVATIONS)
        yield


@contextlib.contextmanager
def fla_rwkv7_on_torch():
    pytest.importorskip("fla")
    import fla.layers.rwkv7 as layer
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    with pytest.MonkeyPatch.context() as mp:
        for module in (layer, modeling):
            mp.setattr(module, "token_shift", _token_shift)
        mp.setattr(layer, "fused_addcmul_rwkv7", torch_addcmul_rwkv7)
        mp.setattr(layer, "fused_k_rwkv7", lambda k, a, ka, *args, **kwargs: k_update_ref(k, a, ka))
        mp.setattr(layer, "gate_output_correction", gate_output_correction_ref)
        mp.setattr(layer, "chunk_rwkv7", _dplr)
        mp.setattr(layer, "fused_mul_recurrent_rwkv7", _mul_recurrent)
        yield


class _RMSNorm(torch.nn.Module):
    """fla's ``RMSNorm(hidden_size, elementwise_affine, eps, ...)`` in torch (RetNet's per-head output norm)."""

    def __init__(self, hidden_size, elementwise_affine=True, bias=False, eps=1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x):
        y = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return y if self.weight is None else y * self.weight


def _rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, **kwargs):
    """fla's ``rotary_embedding`` through its ``rotary_embedding_ref`` (positions from an int offset)."""
    from fla.modules.rotary.ops import rotary_embedding_ref

    T = x.shape[1]
    return rotary_embedding_ref(x, cos[seqlen_offsets : seqlen_offsets + T], sin[seqlen_offsets : seqlen_offsets + T], interleaved)


def _retention(q, k, v, initial_state=None, output_final_state=False, **kwargs):
    """fla's parallel ``naive_retention`` on ``[B, T, H, K]`` inputs; whole sequences only (no state in or out)."""
    from fla.ops.retention.naive import naive_retention

    if initial_state is not None:
        raise NotImplementedError("the torch stand-in of fla's retention runs whole sequences only")
    return naive_retention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2), None


@contextlib.contextmanager
def fla_retnet_on_torch():
    """fla's RetNet with its torch references: ``naive_retention`` for the retention kernels (full forwards, no
    cache), ``rotary_embedding_ref`` for the rotary kernel and a torch RMSNorm for the per-head output norm. Build
    models inside with ``fuse_norm=False, fuse_swiglu=False`` and run them with ``use_cache=False``."""
    pytest.importorskip("fla")
    import fla.layers.multiscale_retention as layer
    import fla.modules.mlp as mlp
    import fla.modules.rotary.ops as rotary

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer, "RMSNorm", _RMSNorm)
        mp.setattr(layer, "chunk_retention", _retention)
        mp.setattr(layer, "fused_recurrent_retention", _retention)
        mp.setattr(rotary, "rotary_embedding", _rotary)
        mp.setattr(mlp, "swiglu", lambda gate, y: torch.nn.functional.silu(gate) * y)
        yield
