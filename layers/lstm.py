"""LSTM baseline: torch's nn.LSTM (cuDNN on GPU) with its (h, c) as the block state; packed documents as torch's
``PackedSequence`` of the documents (each from a zero state)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from zoo.typed import bounded, checked

from .base import Documents, SequenceMixer
from .registry import MIXERS


@dataclass
@checked
class LSTMConfig:
    hidden_size: int | None = bounded(None, ge=1)  # None: d_model

    def validate(self, d_model: int) -> None:
        """Bounds only (declared on the fields)."""


class LSTMState(NamedTuple):
    h: torch.Tensor  # [B, H]
    c: torch.Tensor  # [B, H]


@MIXERS.register("lstm", LSTMConfig)
class LSTM(SequenceMixer):
    """One LSTM layer followed by a projection back to d_model."""

    def __init__(self, config: LSTMConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.hidden_size = config.hidden_size or d_model
        self.lstm = nn.LSTM(d_model, self.hidden_size, batch_first=True)
        self.out_proj = nn.Linear(self.hidden_size, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> LSTMState:
        dtype = dtype or self.out_proj.weight.dtype
        device = device or self.out_proj.weight.device
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return LSTMState(zeros, zeros.clone())

    def state_size(self) -> int:
        return 2 * self.hidden_size

    packs_documents = True

    def mix(self, x: torch.Tensor, state: LSTMState | None, documents: Documents | None = None):
        """Packed ``documents``: one ``nn.LSTM`` call over them as a ``PackedSequence`` (a batch of the documents,
        each from a zero state); the state is the last document's."""
        seq: torch.Tensor | nn.utils.rnn.PackedSequence = x
        if documents is not None:
            spans = documents.spans()
            padded = nn.utils.rnn.pad_sequence([x[0, a:b] for a, b in spans], batch_first=True)  # [N, longest, D]
            seq = nn.utils.rnn.pack_padded_sequence(padded, torch.tensor([b - a for a, b in spans]), batch_first=True,
                                                    enforce_sorted=False)
        if state is None:
            state = self.init_state(len(documents.bounds) - 1 if documents is not None else x.shape[0], x.device, x.dtype)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN has a bf16/fp16 LSTM primitive on some CPUs only: on CPU the LSTM computes in its weights' dtype
            # (fp32 under autocast), like the torch forms of kernels/amp.py.
            with torch.autocast("cpu", enabled=False):
                y, state_out = self._run(seq, state, self.lstm.weight_ih_l0.dtype)
        else:
            # cuDNN wants h/c in the dtype the LSTM computes in (autocast's, when active).
            compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            y, state_out = self._run(seq, state, compute_dtype)
        if documents is not None:
            y = nn.utils.rnn.pad_packed_sequence(y, batch_first=True)[0]  # [N, longest, H]
            y = torch.cat([y[i, : b - a] for i, (a, b) in enumerate(documents.spans())])[None]  # [1, T, H]
            state_out = LSTMState(state_out.h[-1:], state_out.c[-1:])  # the last document's
        return self.out_proj(y), state_out

    def _run(self, x: torch.Tensor | nn.utils.rnn.PackedSequence, state: LSTMState, compute_dtype: torch.dtype):
        """nn.LSTM over ``x [B, T, D]`` (or a ``PackedSequence`` of B sequences) from ``state`` in ``compute_dtype``;
        the state keeps its dtype (the model's)."""
        h0 = state.h.to(compute_dtype).unsqueeze(0).contiguous()  # [1, B, H], as nn.LSTM wants
        c0 = state.c.to(compute_dtype).unsqueeze(0).contiguous()
        y, (h, c) = self.lstm(x.to(compute_dtype), (h0, c0))  # y: [B, T, H] (or packed)
        return y, LSTMState(h.squeeze(0).to(state.h.dtype), c.squeeze(0).to(state.c.dtype))
