"""Feed-forward modules that follow a mixer in each layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.typed import bounded, checked

from .registry import FFNS


@dataclass
@checked
class SwiGLUConfig:
    hidden_size: int | None = bounded(None, ge=1)  # None: 8/3 * d_model rounded up to a multiple of `multiple_of`
    multiple_of: int = bounded(64, ge=1)

    def validate(self, d_model: int) -> None:
        """Bounds only (declared on the fields)."""

    def resolved_hidden_size(self, d_model: int) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        hidden = int(8 * d_model / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of


@FFNS.register("swiglu", SwiGLUConfig)
class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, with Llama's parameter names."""

    def __init__(self, config: SwiGLUConfig, d_model: int, layer_idx: int):
        super().__init__()
        hidden = config.resolved_hidden_size(d_model)
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
