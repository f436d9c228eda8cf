"""One residual layer: pre-norm mixer + residual, then pre-norm FFN + residual."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SequenceMixer, cat_states
from .norm import RMSNorm


class ResidualLayer(nn.Module):
    """The layer's state is the mixer's, or ``(mixer_state, ffn_state)`` when the FFN is stateful
    (``ffn.stateful``: ``forward(x, state) -> (y, state)``, e.g. RWKV channel-mix's token shift)."""

    def __init__(self, mixer: SequenceMixer, ffn: nn.Module | None, d_model: int, norm_eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(d_model, norm_eps) if ffn is not None else None
        self.ffn = ffn
        self.ffn_stateful = bool(getattr(ffn, "stateful", False))

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        mixer_state, ffn_state = state if self.ffn_stateful and state is not None else (state, None)
        h, mixer_state = self.mixer(self.mixer_norm(x), mixer_state)
        x = x + h
        if self.ffn is None:
            return x, mixer_state
        if not self.ffn_stateful:
            return x + self.ffn(self.ffn_norm(x)), mixer_state
        h, ffn_state = self.ffn(self.ffn_norm(x), ffn_state)
        return x + h, (mixer_state, ffn_state)

    def stack_row_states(self, states: list[Any]) -> Any:
        """One batch state from single-row layer states (see :meth:`SequenceMixer.stack_row_states`)."""
        if not self.ffn_stateful:
            return self.mixer.stack_row_states(states)
        mixer_states, ffn_states = zip(*states)
        return self.mixer.stack_row_states(list(mixer_states)), cat_states(list(ffn_states))
