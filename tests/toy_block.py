"""A toy block written the way the README's "Adding a block" says: one file, one registration, nothing else edited.

An exponential moving average per channel with a learned decay: ``h_t = a * h_{t-1} + (1 - a) * W_in x_t``,
``y_t = W_out h_t``, ``a = sigmoid(decay)``. Imported by ``tests/test_adding_a_block.py`` in subprocesses only, so
the registry of the main test process stays as shipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.layers import MIXERS, SequenceMixer
from zoo.typed import bounded, checked


@dataclass
@checked
class ToyEMAConfig:
    expand: int = bounded(1, ge=1)

    def validate(self, d_model: int) -> None:
        """Nothing depends on d_model."""


@MIXERS.register("toy_ema", ToyEMAConfig)
class ToyEMA(SequenceMixer):
    def __init__(self, config: ToyEMAConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.width = config.expand * d_model
        self.in_proj = nn.Linear(d_model, self.width, bias=False)
        self.out_proj = nn.Linear(self.width, d_model, bias=False)
        self.decay = nn.Parameter(torch.zeros(self.width))

    def init_state(self, batch_size, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.width, device=device or self.decay.device, dtype=dtype or self.decay.dtype)

    def mix(self, x: torch.Tensor, state: torch.Tensor | None):
        u = self.in_proj(x)  # [B, T, W]
        compute = torch.promote_types(u.dtype, torch.float32)  # fp32, fp64 for an fp64 block
        a = torch.sigmoid(self.decay.to(compute))  # [W]
        h = self.init_state(x.shape[0], x.device, compute) if state is None else state.to(compute)
        outs = []
        for t in range(x.shape[1]):
            h = a * h + (1 - a) * u[:, t].to(compute)
            outs.append(h)
        y = torch.stack(outs, dim=1) if outs else u.to(compute)  # [B, T, W]
        return self.out_proj(y.to(u.dtype)), h.to(state.dtype if state is not None else u.dtype)
