"""RWKV channel mixing (the RWKV-6 FFN, "Eagle and Finch" Eqs. 10-13): token shift, squared-ReLU key, sigmoid gate.

Its token shift needs the previous call's last token, so it is a *stateful* FFN (``stateful = True``):
``forward(x, state) -> (y, state)`` with ``state = last x [B, D]``; the residual layer carries that state beside the
mixer's, so chunked prefill and one-token decode are exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from zoo.typed import bounded, checked

from .registry import FFNS
from .base import Documents
from .ops import token_shift


@dataclass
@checked
class RWKVChannelMixConfig:
    hidden_size: int | None = bounded(None, ge=1)  # None: 3.5 * d_model rounded up to a multiple of 32 (RWKV-6's size)

    def validate(self, d_model: int) -> None:
        """Bounds only (declared on the fields)."""

    def resolved_hidden_size(self, d_model: int) -> int:
        return self.hidden_size if self.hidden_size is not None else -(-int(3.5 * d_model) // 32) * 32


class _TokenShiftFFN(nn.Module):
    """A channel mix whose state is the last input ``[B, D]`` (its token shift's), carried by the residual layer."""

    stateful = True

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.d_model, device=device or self.key.weight.device, dtype=dtype or self.key.weight.dtype)


@FFNS.register("rwkv_cmix", RWKVChannelMixConfig)
class RWKVChannelMix(_TokenShiftFFN):
    """``sigmoid(receptance(x_r)) * value(relu(key(x_k))^2)`` with ``x_* = lerp(x_t, x_{t-1}, mu_*)``."""

    def __init__(self, config: RWKVChannelMixConfig, d_model: int, layer_idx: int):
        super().__init__()
        hidden = config.resolved_hidden_size(d_model)
        self.d_model = d_model
        self.time_maa_k = nn.Parameter(torch.empty(d_model))
        self.time_maa_r = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, hidden, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(hidden, d_model, bias=False)
        self.init_parameters()

    def init_parameters(self) -> None:
        ddd = torch.arange(self.d_model, device=self.time_maa_k.device, dtype=torch.float32) / self.d_model
        init.copy_(self.time_maa_k, 1 - ddd.pow(0.5))
        init.copy_(self.time_maa_r, 1 - ddd.pow(0.5))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, documents: Documents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xx = token_shift(x, state, documents) - x  # [B, T, D]
        k = torch.relu(self.key(x + xx * self.time_maa_k)).square()
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k), x[:, -1]


@dataclass
@checked
class RWKV7ChannelMixConfig:
    hidden_size: int | None = bounded(None, ge=1)  # None: 4 * d_model (RWKV-7's size)

    def validate(self, d_model: int) -> None:
        """Bounds only (declared on the fields)."""

    def resolved_hidden_size(self, d_model: int) -> int:
        return self.hidden_size if self.hidden_size is not None else 4 * d_model


@FFNS.register("rwkv7_cmix", RWKV7ChannelMixConfig)
class RWKV7ChannelMix(_TokenShiftFFN):
    """RWKV-7's channel mixing (RWKV-LM ``CMix_x070``, fla's ``RWKV7FeedForward``): ``value(relu(key(x_k))^2)`` with
    ``x_k = lerp(x_t, x_{t-1}, x_k)``; no receptance gate. Stateful like :class:`RWKVChannelMix` (state: last x ``[B, D]``)."""

    def __init__(self, config: RWKV7ChannelMixConfig, d_model: int, layer_idx: int):
        super().__init__()
        hidden = config.resolved_hidden_size(d_model)
        self.d_model = d_model
        self.x_k = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, hidden, bias=False)
        self.value = nn.Linear(hidden, d_model, bias=False)
        self.init_parameters()

    def init_parameters(self) -> None:
        """x070's ``x_k = 1 - (i / D)^(ratio^4)`` with the layer-depth ratio fixed at 0.5, as in :class:`zoo.layers.RWKV7`."""
        ddd = torch.arange(self.d_model, device=self.x_k.device, dtype=torch.float32) / self.d_model
        init.copy_(self.x_k, 1 - ddd.pow(0.5**4))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, documents: Documents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xx = token_shift(x, state, documents) - x  # [B, T, D]
        return self.value(torch.relu(self.key(x + xx * self.x_k)).square()), x[:, -1]
