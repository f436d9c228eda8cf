"""``model.<block>.short_conv: K``: a depthwise causal convolution in front of any block (Zoology's attention
baseline runs one before attention; the blocks that solve MQAR have a token shift or short convolution)."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .base import Documents, SequenceMixer, cat_states, map_state
from .ops import causal_conv


class ShortConvState(NamedTuple):
    conv: torch.Tensor  # [B, D, K-1]: the last inputs of the convolution
    inner: Any  # the wrapped block's state


class ShortConv(SequenceMixer):
    """``inner(conv(x))`` with ``conv`` depthwise, causal, of kernel ``kernel_size``, initialized to the identity (last
    tap 1, others and bias 0), so a wrapped block starts as the block itself. The state carries the convolution's last
    ``kernel_size - 1`` inputs with the inner block's state: prefill + token-by-token decode equals the full forward."""

    wraps_blocks = True

    def __init__(self, inner: SequenceMixer, kernel_size: int):
        super().__init__(inner.config, inner.d_model, inner.layer_idx)
        self.registry_name = f"{inner.registry_name} (short_conv {kernel_size})"
        self.kernel_size = kernel_size
        # [D, 1, K], as a depthwise Conv1d's: parameters of this module itself, not of a child nn.Conv1d (Hugging Face's
        # initialization only calls init_parameters on modules that hold parameters themselves)
        self.weight = nn.Parameter(torch.empty(inner.d_model, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(inner.d_model))
        self.inner = inner
        if self.weight.device.type != "meta":
            self.init_parameters()

    @property
    def shared_tensor(self) -> str | None:
        return self.inner.shared_tensor

    def set_shared_role(self, producer: bool) -> None:
        self.inner.set_shared_role(producer)

    @property
    def backend(self) -> str:
        return str(getattr(self.inner, "backend", "-"))

    def init_parameters(self) -> None:
        from transformers import initialization as init

        identity = torch.zeros_like(self.weight)  # [D, 1, K]
        identity[:, :, -1] = 1
        init.copy_(self.weight, identity)
        init.zeros_(self.bias)

    def init_state(self, batch_size, device=None, dtype=None) -> ShortConvState:
        dtype = dtype or self.weight.dtype
        device = device or self.weight.device
        conv = torch.zeros(batch_size, self.d_model, self.kernel_size - 1, device=device, dtype=dtype)
        return ShortConvState(conv, self.inner.init_state(batch_size, device, dtype))

    @classmethod
    def wrap(cls, mixer: SequenceMixer, kernel_size: int) -> SequenceMixer:
        """``mixer`` behind a short convolution of ``kernel_size`` taps; ``mixer`` itself for 0."""
        return cls(mixer, kernel_size) if kernel_size else mixer

    packs_documents = True

    def mix(self, x: torch.Tensor, state: ShortConvState | None, shared: dict | None = None,
            documents: Documents | None = None) -> tuple[torch.Tensor, ShortConvState]:
        """Packed ``documents`` reach the convolution and the inner block (which runs them packed, or one by one)."""
        # A fresh start passes the inner block no state (a Bidirectional block takes none).
        prev = torch.zeros(x.shape[0], self.d_model, self.kernel_size - 1, device=x.device, dtype=x.dtype) if state is None else state.conv
        conv_out, conv = causal_conv(x.transpose(1, 2), prev, self.weight, self.bias, documents)  # [B, D, T], conv [B, D, K-1]
        y, inner = self.inner(conv_out.transpose(1, 2), None if state is None else state.inner, shared, documents)
        return y, ShortConvState(conv, inner)

    def stack_row_states(self, states: list[ShortConvState]) -> ShortConvState:
        return ShortConvState(cat_states([s.conv for s in states]), self.inner.stack_row_states([s.inner for s in states]))

    def static_state(self, state: ShortConvState, max_length: int) -> ShortConvState:
        if state is None:
            raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}): static decoding starts from a prefilled state")
        return ShortConvState(map_state(state.conv, torch.clone), self.inner.static_state(state.inner, max_length))

    def state_size_per_token(self) -> int:
        return self.inner.state_size_per_token()

    def state_size(self) -> int:
        return self.d_model * (self.kernel_size - 1) + self.inner.state_size()
