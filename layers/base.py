"""The block contract every sequence mixer follows."""
from __future__ import annotations

import abc
import logging
from typing import Any, NamedTuple

import torch
from torch import nn

from zoo.kernels.backends import CuSeqlens

logger = logging.getLogger("zoo")


class Documents(NamedTuple):
    """Packed documents of one row ``x [1, T, D]``: each runs as its own sequence (from an empty state, positions from
    0); no token, state, convolution or token shift crosses a boundary."""

    bounds: tuple[int, ...]  # 0 = b_0 < b_1 < ... < b_N = T: document i is tokens [b_i, b_{i+1})
    cu_seqlens: torch.Tensor  # the bounds as int64 [N + 1] on the row's device (the ops' form, fla's convention)
    positions: torch.Tensor  # [T] int64: each token's position in its document (0, 1, ..., restarting at each)

    @classmethod
    def from_bounds(cls, bounds: list[int] | tuple[int, ...], device: torch.device | str) -> "Documents":
        cu_seqlens = torch.tensor(bounds, dtype=torch.int64, device=device)
        starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens.diff(), output_size=bounds[-1])  # [T]: document starts (no sync)
        return cls(tuple(bounds), cu_seqlens, torch.arange(bounds[-1], device=device) - starts)

    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each document."""
        return list(zip(self.bounds, self.bounds[1:]))

    @property
    def last_start(self) -> int:
        """Where the last document begins (a packed call's returned state is that document's)."""
        return self.bounds[-2]


def op_seqlens(documents: Documents | None) -> CuSeqlens | None:
    """The ops' ``cu_seqlens`` of ``documents``: host bounds beside the device tensor, so no op reads the tensor back
    (one device sync per op call otherwise)."""
    return None if documents is None else CuSeqlens(documents.bounds, documents.cu_seqlens)


class SequenceMixer(nn.Module, abc.ABC):
    """A sequence mixer: ``forward(x [B, T, D], state=None) -> (y [B, T, D], state)``.

    One call serves a full sequence (``state=None``), a chunk of a longer sequence (state in, state out)
    and one-token decode (``T == 1``). The returned state is new; the state passed in is never modified, with one
    exception: the preallocated buffers of static decoding (:meth:`static_state`, e.g. attention's
    ``StaticAttentionState``) are written in place by design, so a decode step allocates nothing and can be replayed
    as a CUDA graph.
    Subclasses implement :meth:`mix` and :meth:`init_state`; :meth:`forward` checks the input first.
    A state is a tensor or a (Named)tuple of tensors, each with the batch as its first dimension.

    Packed documents (``documents``, :class:`Documents`, over a row ``x [1, T, D]`` and no state): each document runs
    as its own sequence and the state returned is the last document's. A block with ``packs_documents`` takes them in
    one call (``mix(..., documents=)``: masks, restarted positions, the ops' ``cu_seqlens``); any other block is run
    once per document here.
    """

    registry_name: str = ""
    # What transformers' ``config.layer_types`` calls a layer of this block: ``linear_attention`` for a recurrent
    # state (transformers' name for Mamba, GDN, ... layers), ``full_attention`` for a growing KV cache, ``conv`` for a
    # short convolution's state (LFM2's).
    layer_type: str = "linear_attention"
    # Whether this block's state can be cut back to an earlier token (its state type then has ``crop(keep)``), as
    # assisted decoding needs after rejected draft tokens; a recurrent state cannot.
    state_can_roll_back: bool = False
    # A wrapper of registered blocks (Bidirectional), built by the model, not named in recipes.
    wraps_blocks: bool = False
    # Name of a per-token tensor this block shares with later layers in one forward (RWKV-7's value residual reads
    # layer 0's values), or None. The model tells each block that names one whether it is the first in the stack to
    # name it (:meth:`set_shared_role`); that block stores the tensor in the forward's ``shared`` dict, later ones
    # read it. Blocks that name one take ``mix(x, state, shared)``.
    shared_tensor: str | None = None
    # Whether ``mix`` takes ``documents=`` (packed documents in one call); otherwise forward runs each document alone.
    packs_documents: bool = False

    def __init__(self, config: Any, d_model: int, layer_idx: int):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, state: Any = None, shared: dict[str, torch.Tensor] | None = None,
                documents: Documents | None = None) -> tuple[torch.Tensor, Any]:
        """``shared``: the forward's cross-layer tensors (see :attr:`shared_tensor`); blocks that name none ignore it.
        ``documents``: packed documents of a one-row ``x`` (see the class docstring)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{self.registry_name} block (layer {self.layer_idx}): expected x of shape [B, T, {self.d_model}], "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}): expected a floating-point x, got {x.dtype}")
        if state is not None:
            batch = first_tensor(state).shape[0]
            if batch != x.shape[0]:
                raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}): state batch {batch} != input batch {x.shape[0]}")
        if documents is not None:
            if x.shape[0] != 1 or state is not None or documents.bounds[-1] != x.shape[1]:
                raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}): packed documents take one row "
                                 f"[1, T, D] with T = {documents.bounds[-1]} and no state, got {list(x.shape)}"
                                 + (" and a state" if state is not None else ""))
            if not self.packs_documents:
                return self._each_document(x, shared, documents)
            return self.mix(x, None, documents=documents) if self.shared_tensor is None else self.mix(x, None, shared, documents=documents)
        if self.shared_tensor is None:
            return self.mix(x, state)
        return self.mix(x, state, shared)

    def _each_document(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None, documents: Documents) -> tuple[torch.Tensor, Any]:
        """A block without :attr:`packs_documents`: each document alone; a shared tensor its producer writes comes
        back as the documents' pieces side by side (``[1, T, ...]``), one a reader reads is cut per document."""
        pieces, written, state = [], {}, None
        for start, end in documents.spans():
            own = None if shared is None else {name: t[:, start:end] for name, t in shared.items()}  # [1, end - start, ...]
            y, state = self.forward(x[:, start:end], None, own)
            pieces.append(y)
            for name, t in (own or {}).items():
                if name not in shared:
                    written.setdefault(name, []).append(t)
        if shared is not None:
            shared.update({name: torch.cat(parts, dim=1) for name, parts in written.items()})
        return torch.cat(pieces, dim=1), state

    def set_shared_role(self, producer: bool) -> None:
        """Called once by the model for a block with a :attr:`shared_tensor`: ``producer`` is True for the first
        layer of the stack that names it. Blocks that share a tensor override this (it may add parameters)."""
        raise NotImplementedError(f"{self.registry_name} block names shared tensor {self.shared_tensor!r} but takes no role")

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

    @classmethod
    def bidirectional(cls, config: Any, d_model: int, layer_idx: int) -> "SequenceMixer":
        """This block in a form whose every output sees the whole sequence (for denoisers such as masked diffusion):
        by default a :class:`Bidirectional` pair of scans; blocks that can drop causality themselves override it."""
        return Bidirectional(cls, config, d_model, layer_idx)

    def stack_row_states(self, states: list[Any]) -> Any:
        """One batch state from single-row states (``[1, ...]`` each), e.g. of prompts prefilled one by one.

        Constant-size states concatenate on the batch dimension; blocks whose state grows with the tokens seen
        (attention's KV cache) override this to align rows of different lengths."""
        return cat_states(states)

    def static_state(self, state: Any, max_length: int) -> Any:
        """This block's prefilled ``state`` as buffers for static decoding (:mod:`zoo.decoding`), which copies each
        step's new state into them. Constant-size states are cloned; blocks whose state grows with the tokens seen
        (attention) override this with a preallocated state of ``max_length`` tokens."""
        if state is None:
            raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}): static decoding starts from a prefilled state")
        return map_state(state, torch.clone)

    def state_size_per_token(self) -> int:
        """Number of state elements this block keeps per sequence for each token seen (0 for constant-size state)."""
        return 0

    def state_size(self) -> int:
        """Number of state elements per sequence that do not grow with the sequence."""
        return 0


class Bidirectional(SequenceMixer):
    """Two instances of a causal block: one scans the sequence forward, the other scans it time-reversed; their
    outputs are summed, so position t sees tokens 0..T-1. Whole sequences only: there is no streaming state."""

    wraps_blocks = True

    def __init__(self, block_cls: type[SequenceMixer], config: Any, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.registry_name = f"bidirectional {block_cls.registry_name}"
        self.forward_mixer = block_cls(config, d_model, layer_idx)
        self.backward_mixer = block_cls(config, d_model, layer_idx)

    def mix(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        if state is not None:
            raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}) reads whole sequences and takes no state")
        y_forward, _ = self.forward_mixer(x)
        y_backward, _ = self.backward_mixer(x.flip(1))  # [B, T, D], time-reversed
        return y_forward + y_backward.flip(1), None

    def init_state(self, batch_size, device=None, dtype=None) -> None:
        raise ValueError(f"{self.registry_name} block (layer {self.layer_idx}) reads whole sequences and keeps no state")


def cat_states(states: list[Any]) -> Any:
    """Concatenate states of the same structure on their batch (first) dimension."""
    first = states[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(cat_states(list(parts)) for parts in zip(*states)))
    if isinstance(first, (tuple, list)):
        return type(first)(cat_states(list(parts)) for parts in zip(*states))
    raise TypeError(f"cannot concatenate states of type {type(first).__name__}")


def first_tensor(state: Any) -> torch.Tensor:
    """The first tensor of a (nested tuple / NamedTuple) state: its first dimension is the batch."""
    if isinstance(state, torch.Tensor):
        return state
    for part in state:
        if part is not None:
            return first_tensor(part)
    raise TypeError(f"state of type {type(state).__name__} holds no tensor")


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


def describe_backends(mixers: list[nn.Module]) -> str:
    """One line naming each block type's backend in a model (logged once per model)."""
    seen: dict[str, str] = {}
    for mixer in mixers:
        seen.setdefault(getattr(mixer, "registry_name", type(mixer).__name__), str(getattr(mixer, "backend", "-")))
    return ", ".join(f"{name}: {backend}" for name, backend in seen.items())
