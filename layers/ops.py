"""Pieces several blocks share: the token shift and the WKV state (RWKV-6/7), a depthwise causal convolution with a
carried state (short conv, conv, Mamba, Mamba-2) and Mamba's time-step bias initialization."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .base import Documents


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or in its own dtype when that is wider (an fp64 block stays fp64 throughout)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_shift(x: torch.Tensor, last: torch.Tensor | None, documents: Documents | None = None) -> torch.Tensor:
    """The previous token of each position of ``x [B, T, D]``; ``last [B, D]`` (or zeros) precedes x[:, 0]. Packed
    ``documents``: zeros at each document's first token."""
    if documents is not None:
        return document_shift(x, 1, documents)
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    if x.shape[1] == 1:  # decode: the carried token itself
        return first
    return torch.cat((first, x[:, :-1]), dim=1)


def document_shift(x: torch.Tensor, j: int, documents: Documents) -> torch.Tensor:
    """``x [1, T, C]`` moved ``j`` tokens later within each packed document: position t holds x[t - j] when that token
    is in t's document, else zeros (what a sequence of its own would see before its start)."""
    shifted = F.pad(x, (0, 0, j, 0))[:, : x.shape[1]]  # [1, T, C]
    return torch.where((documents.positions >= j)[None, :, None], shifted, torch.zeros((), dtype=x.dtype, device=x.device))


class WKVState(NamedTuple):
    """The state of RWKV-6 and RWKV-7 time mixing."""

    shift: torch.Tensor  # [B, D] the last token's (normalized) input
    wkv: torch.Tensor  # [B, H, K, V]

    @classmethod
    def zeros(cls, batch_size: int, d_model: int, n_heads: int, head_dim: int, device, dtype) -> "WKVState":
        shift = torch.zeros(batch_size, d_model, device=device, dtype=dtype)
        return cls(shift, torch.zeros(batch_size, n_heads, head_dim, head_dim, device=device, dtype=dtype))

    @staticmethod
    def size(d_model: int, n_heads: int, head_dim: int) -> int:
        """Numbers per sequence."""
        return d_model + n_heads * head_dim * head_dim


def causal_conv(x: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                documents: Documents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of ``x [B, C, T]`` (taps ``weight [C, 1, K]``, ``bias [C]`` or None) continuing from the
    last ``K-1`` inputs ``prev [B, C, K-1]``.

    Returns the conv output ``[B, C, T]`` (no activation) and the new last ``K-1`` inputs in ``prev``'s dtype (under
    autocast ``x`` is in the compute dtype; the state keeps its own). Blocks pass their own parameters or a
    ``nn.Conv1d``'s ``weight`` and ``bias``. Packed ``documents`` (``x [1, C, T]``, ``prev`` zeros): no tap reaches
    into another document; the returned inputs are the last document's."""
    if documents is not None:
        return _document_conv(x, prev, weight, bias, documents)
    full = torch.cat((prev.to(x.dtype), x), dim=-1)  # [B, C, K-1+T]
    if x.shape[-1] == 1:
        out = conv_window_step(full, weight, bias)  # decode: a dot over the window
    else:
        out = F.conv1d(full, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=weight.shape[0])  # [B, C, T]
    keep = weight.shape[-1] - 1
    return out, full[:, :, full.shape[-1] - keep :].to(prev.dtype)


def _document_conv(x: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   documents: Documents) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_conv` of packed documents: tap ``i`` of ``K`` reads the input ``K - 1 - i`` tokens back, masked
    to zero where that token is in an earlier document."""
    K = weight.shape[-1]
    taps = weight[:, 0].to(x.dtype)  # [C, K]
    rows = x.transpose(1, 2)  # [1, T, C]
    out = sum(document_shift(rows, K - 1 - i, documents) * taps[:, i] for i in range(K))  # [1, T, C]
    if bias is not None:
        out = out + bias.to(x.dtype)
    last = F.pad(x[:, :, documents.last_start :], (K - 1, 0))  # [1, C, K-1 + the last document's length]
    return out.transpose(1, 2), last[:, :, last.shape[-1] - (K - 1) :].to(prev.dtype)


def conv_window_step(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One output of a depthwise causal conv, the decode form: each channel's window ``[B, C, K]`` (its last K inputs)
    dotted with its taps ``weight [C, 1, K]``, plus ``bias [C]``; ``[B, C, 1]``. No convolution call for one token."""
    out = (window * weight[:, 0].to(window.dtype)).sum(-1, keepdim=True)
    return out if bias is None else out + bias.to(window.dtype)[:, None]


def init_causal_conv(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """PyTorch's default init of a depthwise conv's taps ``weight [C, 1, K]`` (uniform in ``+-K^-1/2``, as the reference
    Mamba and Zoology keep it) and a zero ``bias``."""
    from transformers import initialization as init

    bound = weight.shape[-1] ** -0.5
    init.uniform_(weight, -bound, bound)
    if bias is not None:
        init.zeros_(bias)


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, device, floor: float = 1e-4) -> torch.Tensor:
    """``softplus^-1`` of time steps drawn log-uniformly in ``[dt_min, dt_max]`` (Mamba's dt bias init)."""
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
