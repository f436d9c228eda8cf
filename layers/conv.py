"""Gated short convolution (Zoology's ``BaseConv`` with a short kernel, Arora et al. 2023): ``conv(x) * proj(x)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.typed import bounded, checked

from .base import Documents, SequenceMixer
from .ops import causal_conv, init_causal_conv
from .registry import MIXERS


@dataclass
@checked
class ConvConfig:
    kernel_size: int = bounded(3, ge=1)  # Zoology's short kernel

    def validate(self, d_model: int) -> None:
        """Bounds only (declared on the fields)."""


@MIXERS.register("conv", ConvConfig)
class Conv(SequenceMixer):
    """A depthwise causal convolution of kernel ``kernel_size`` gated by a linear projection of the same input.

    The state is the last ``kernel_size - 1`` inputs ``[B, D, K-1]``. No recall beyond the kernel: in Zoology it is
    the convolution half of the attention baseline (``blocks: [conv, attention]``)."""

    layer_type = "conv"

    def __init__(self, config: ConvConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.weight = nn.Parameter(torch.empty(d_model, 1, config.kernel_size))  # [D, 1, K], as a depthwise Conv1d's
        self.bias = nn.Parameter(torch.empty(d_model))
        self.proj = nn.Linear(d_model, d_model)
        if self.weight.device.type != "meta":  # usable on its own, not only inside a ZooForCausalLM
            self.init_parameters()

    def init_parameters(self) -> None:
        init_causal_conv(self.weight, self.bias)

    def init_state(self, batch_size, device=None, dtype=None) -> torch.Tensor:
        dtype = dtype or self.proj.weight.dtype
        device = device or self.proj.weight.device
        return torch.zeros(batch_size, self.d_model, self.config.kernel_size - 1, device=device, dtype=dtype)

    def state_size(self) -> int:
        return self.d_model * (self.config.kernel_size - 1)

    packs_documents = True

    def mix(self, x: torch.Tensor, state: torch.Tensor | None, documents: Documents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``documents``: no tap reaches into another document."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        conv_out, state = causal_conv(x.transpose(1, 2), state, self.weight, self.bias, documents)  # [B, D, T], state [B, D, K-1]
        return conv_out.transpose(1, 2) * self.proj(x), state
