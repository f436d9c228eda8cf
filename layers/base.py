"""The block contract every sequence mixer follows."""
from __future__ import annotations

import abc
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from zoo.errors import BackendUnavailableError

logger = logging.getLogger("zoo")


class SequenceMixer(nn.Module, abc.ABC):
    """A sequence mixer: ``forward(x [B, T, D], state=None) -> (y [B, T, D], state)``.

    One call serves a full sequence (``state=None``), a chunk of a longer sequence (state in, state out)
    and one-token decode (``T == 1``). The returned state is new; the state passed in is never modified.
    Subclasses implement :meth:`mix` and :meth:`init_state`; :meth:`forward` checks the input first.
    A state is a tensor or a (Named)tuple of tensors, each with the batch as its first dimension.
    """

    registry_name: str = ""

    def __init__(self, config: Any, d_model: int, layer_idx: int):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{self.registry_name} block (layer {self.layer_idx}): expected x of shape [B, T, {self.d_model}], "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}): expected a floating-point x, got {x.dtype}")
        return self.mix(x, state)

    @abc.abstractmethod
    def mix(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """The block's computation on a checked ``x [B, T, D]``."""

    @abc.abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        """The state before any token: what ``forward(x, state=None)`` starts from."""

    def init_parameters(self) -> None:
        """Block-specific initialization, run by the model after the generic one (which covers Linear, Conv1d,
        Embedding, LSTM and norms). Override with ``transformers.initialization`` functions, which leave weights
        loaded from a checkpoint alone."""

    def state_size_per_token(self) -> int:
        """Number of state elements this block keeps per sequence for each token seen (0 for constant-size state)."""
        return 0

    def state_size(self) -> int:
        """Number of state elements per sequence that do not grow with the sequence."""
        return 0


def map_state(state: Any, fn) -> Any:
    """Apply ``fn`` to every tensor of a (nested tuple / NamedTuple) state, keeping its structure."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(map_state(s, fn) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(s, fn) for s in state)
    raise TypeError(f"cannot map over a state of type {type(state).__name__}")


def resolve_scan_backend(block: str, backend: str, layer_idx: int) -> str:
    """Backend of a recurrent block: ``auto``/``torch`` -> the chunked PyTorch form (logged once, by layer 0).

    ``triton`` and ``mamba_ssm`` have no path in zoo yet: asking for them is an error, never a silent fallback.
    """
    if backend == "triton":
        raise BackendUnavailableError(
            f"{block} backend 'triton' was asked for but no Triton kernel exists yet; use backend: torch or auto"
        )
    if backend == "mamba_ssm":
        installed = importlib.util.find_spec("mamba_ssm") is not None
        reason = "zoo does not call mamba_ssm's kernels yet" if installed else "the mamba-ssm package is not installed"
        raise BackendUnavailableError(f"{block} backend 'mamba_ssm' is unavailable: {reason}; use backend: torch or auto")
    if layer_idx == 0:
        logger.info("%s block: backend %r -> torch (chunked PyTorch form)", block, backend)
    return "torch"
