"""One residual layer: pre-norm mixer + residual, then pre-norm FFN + residual; optionally adaLN-Zero conditioned (DiT)."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .base import Documents, SequenceMixer, cat_states, map_state
from .norm import RMSNorm


class Modulation(NamedTuple):
    """adaLN parameters of one residual branch, each ``[B, 1, D]``."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class AdaLNModulation(nn.Module):
    """adaLN-Zero's projection ``Linear(SiLU(c))`` of a conditioning ``c [B, D]`` into ``n_outputs`` vectors
    ``[B, 1, D]`` (shift, scale, gate per branch). Zero at init: every shift and scale is 0, every gate closed.

    The weights are this module's own parameters (not a child ``nn.Linear``): Hugging Face's initialization only
    calls ``init_parameters`` on modules that hold parameters themselves.
    """

    def __init__(self, d_model: int, n_outputs: int):
        super().__init__()
        self.d_model = d_model
        self.n_outputs = n_outputs
        self.weight = nn.Parameter(torch.zeros(n_outputs * d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_outputs * d_model))

    def init_parameters(self) -> None:
        init.zeros_(self.weight)
        init.zeros_(self.bias)

    def forward(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(F.silu(conditioning), self.weight, self.bias)[:, None, :].chunk(self.n_outputs, dim=-1)  # each [B, 1, D]

    def extra_repr(self) -> str:
        return f"{self.d_model}, n_outputs={self.n_outputs}"


_REPLAYING = contextvars.ContextVar("zoo_replaying", default=False)


@contextlib.contextmanager
def replaying(on: bool = True) -> Iterator[None]:
    """Marks a forward as activation checkpointing's recomputation in the backward (see :func:`is_replaying`)."""
    token = _REPLAYING.set(on)
    try:
        yield
    finally:
        _REPLAYING.reset(token)


def is_replaying() -> bool:
    """True while activation checkpointing recomputes a layer: modules that record side statistics of a forward (MoE
    routing) skip the replay, which the forward already recorded."""
    return _REPLAYING.get()


def marking_replays(checkpoint: Callable) -> Callable:
    """``checkpoint(function, *args)`` whose recomputations of ``function`` (every call after the first: the backward's
    replays) run under :func:`replaying`."""

    @functools.wraps(checkpoint)
    def marked_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
        calls = itertools.count()

        def run(*inner: Any, **inner_kwargs: Any) -> Any:
            with replaying(next(calls) > 0):
                return function(*inner, **inner_kwargs)

        return checkpoint(run, *args, **kwargs)

    return marked_checkpoint


class ResidualLayer(GradientCheckpointingLayer):
    """The layer's state is the mixer's, or ``(mixer_state, ffn_state)`` when the FFN is stateful
    (``ffn.stateful``: ``forward(x, state) -> (y, state)``, e.g. RWKV channel-mix's token shift).

    ``conditioned``: adaLN-Zero (DiT, MDLM's time-conditioned DiT). A conditioning vector ``c [B, D]`` gives each
    branch a shift, scale and gate, ``x + gate * branch(norm(x) * (1 + scale) + shift)``, from ``Linear(SiLU(c))``
    initialized to zero (:class:`AdaLNModulation`), so every gate starts closed and the layer starts as the identity.

    ``norm``: the class of both pre-norms (``zoo.layers.norm.NORMS``), built as ``norm(d_model, norm_eps)``.

    Activation checkpointing: a Hugging Face ``GradientCheckpointingLayer``. With ``gradient_checkpointing`` set (by
    ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``, or by zoo's
    ``trainer.activation_checkpointing``), a training forward keeps only the layer's inputs and recomputes the layer
    in the backward through ``_gradient_checkpointing_func`` (torch's non-reentrant checkpoint by default), whose
    recomputations run under :func:`replaying` (:func:`marking_replays`), so MoE routing statistics
    are recorded once.
    """

    def __init__(self, mixer: SequenceMixer, ffn: nn.Module | None, d_model: int, norm_eps: float, conditioned: bool = False,
                 norm: type[nn.Module] = RMSNorm, block: str = ""):
        super().__init__()
        self.block = block  # the registry name of the mixer's block (activation checkpointing selects layers by it)
        self._gradient_checkpointing_func = marking_replays(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))
        self.mixer_norm = norm(d_model, norm_eps)
        self.mixer = mixer
        self.ffn_norm = norm(d_model, norm_eps) if ffn is not None else None
        self.ffn = ffn
        self.ffn_stateful = bool(getattr(ffn, "stateful", False))
        self.n_branches = 1 if ffn is None else 2
        self.modulation = AdaLNModulation(d_model, 3 * self.n_branches) if conditioned else None

    def _modulations(self, conditioning: torch.Tensor | None) -> tuple[Modulation | None, Modulation | None]:
        """``(mixer branch, FFN branch)`` adaLN parameters from ``conditioning [B, D]``; ``None`` when unconditioned."""
        layer = f"ResidualLayer (layer {self.mixer.layer_idx})"
        if self.modulation is None:
            if conditioning is not None:
                raise ValueError(f"{layer} is not conditioned (built with conditioned=False): pass conditioning=None")
            return None, None
        if conditioning is None:
            raise ValueError(f"{layer} is adaLN-conditioned: pass conditioning [batch, {self.modulation.d_model}]")
        params = self.modulation(conditioning)
        return Modulation(*params[:3]), Modulation(*params[3:]) if self.ffn is not None else None

    @staticmethod
    def _branch_input(norm: nn.Module, x: torch.Tensor, mod: Modulation | None) -> torch.Tensor:
        h = norm(x)
        return h if mod is None else h * (1 + mod.scale) + mod.shift

    @staticmethod
    def _gated(h: torch.Tensor, mod: Modulation | None) -> torch.Tensor:
        return h if mod is None else mod.gate * h

    def forward(self, x: torch.Tensor, state: Any = None, conditioning: torch.Tensor | None = None,
                shared: dict[str, torch.Tensor] | None = None, documents: Documents | None = None) -> tuple[torch.Tensor, Any]:
        """``conditioning [B, D]`` is required by a conditioned layer and refused by an unconditioned one.
        ``shared``: the forward's cross-layer tensors, one dict for all layers (see ``SequenceMixer.shared_tensor``).
        Under activation checkpointing a producer's replay writes its tensor again after every reader has replayed
        (the backward runs the layers in reverse), so readers replay with the tensor of the forward. ``documents``:
        packed documents of a one-row ``x`` (``SequenceMixer``'s; a stateful FFN takes them too)."""
        mixer_mod, ffn_mod = self._modulations(conditioning)
        mixer_state, ffn_state = state if self.ffn_stateful and state is not None else (state, None)
        h, mixer_state = self.mixer(self._branch_input(self.mixer_norm, x, mixer_mod), mixer_state, shared, documents)
        x = x + self._gated(h, mixer_mod)
        if self.ffn is None:
            return x, mixer_state
        if not self.ffn_stateful:
            return x + self._gated(self.ffn(self._branch_input(self.ffn_norm, x, ffn_mod)), ffn_mod), mixer_state
        h, ffn_state = self.ffn(self._branch_input(self.ffn_norm, x, ffn_mod), ffn_state, documents)
        return x + self._gated(h, ffn_mod), (mixer_state, ffn_state)

    @property
    def state_can_roll_back(self) -> bool:
        """Whether this layer's state can be cut back to an earlier token (see :attr:`SequenceMixer.state_can_roll_back`)."""
        return self.mixer.state_can_roll_back and not self.ffn_stateful

    def static_state(self, state: Any, max_length: int) -> Any:
        """The layer's prefilled state as static-decoding buffers (see :meth:`SequenceMixer.static_state`)."""
        if not self.ffn_stateful:
            return self.mixer.static_state(state, max_length)
        mixer_state, ffn_state = state
        return self.mixer.static_state(mixer_state, max_length), map_state(ffn_state, torch.clone)

    def stack_row_states(self, states: list[Any]) -> Any:
        """One batch state from single-row layer states (see :meth:`SequenceMixer.stack_row_states`)."""
        if not self.ffn_stateful:
            return self.mixer.stack_row_states(states)
        mixer_states, ffn_states = zip(*states)
        return self.mixer.stack_row_states(list(mixer_states)), cat_states(list(ffn_states))
