"""One residual layer: pre-norm mixer + residual, then pre-norm FFN + residual."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SequenceMixer
from .norm import RMSNorm


class ResidualLayer(nn.Module):
    def __init__(self, mixer: SequenceMixer, ffn: nn.Module | None, d_model: int, norm_eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(d_model, norm_eps) if ffn is not None else None
        self.ffn = ffn

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        h, state = self.mixer(self.mixer_norm(x), state)
        x = x + h
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, state
