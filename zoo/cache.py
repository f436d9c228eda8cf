"""The decoding cache: :class:`ZooCache`, a transformers ``Cache`` of per-layer block states with rollback."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from zoo.compat import crop_keep, query_length
from zoo.layers.attention import AttentionState


def kv_state(state: Any) -> Any:
    """The KV cache in a layer's state (alone, or first of a ``(mixer_state, ffn_state)`` pair); None for others."""
    if isinstance(state, tuple) and not hasattr(state, "_fields") and state:
        state = state[0]
    return state if getattr(state, "is_kv_cache", False) else None


def map_rows(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every batch-first tensor of a state; a state type with tensors of no batch (a static KV
    cache's shared slot counter) says which are batch-first by its own ``map_rows``."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if callable(getattr(state, "map_rows", None)):
        return state.map_rows(fn)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(map_rows(part, fn) for part in state))
    if isinstance(state, (tuple, list)):
        return type(state)(map_rows(part, fn) for part in state)
    raise TypeError(f"cannot map over a state of type {type(state).__name__}")


class Recorded(NamedTuple):
    """A layer's state before one recorded call of ``tokens`` tokens; ``replay(k)`` gives the state after its first k."""

    state: Any
    tokens: int
    replay: Callable[[int], Any] | None


class ZooCacheLayer(CacheLayerMixin):
    """One layer's block state in a :class:`ZooCache`: a KV cache, a recurrent state, an LSTM's (h, c), ...

    A KV cache shows as ``keys``/``values`` ``[B, H_kv, S, Dh]`` and grows by :meth:`update` like transformers'
    ``DynamicLayer``; other states are opaque to transformers, which only moves their batch rows (beam search).
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, max_length: int | None = None):
        # CacheLayerMixin.__init__ is not called: keys and values are views of ``state``, not attributes of their own.
        self.state: Any = None
        self.seen_tokens = 0
        self.max_length = max_length
        # Rollback of a state that cannot be cut (see ZooCache.activate_past_recording): the calls since the last crop.
        self.record_past = False
        self.recurrent_states_to_keep = 0
        self.history: list[Recorded] = []

    @property
    def state_can_crop(self) -> bool:
        """Whether the state itself can be cut back to an earlier token (a KV cache can; a recurrent state cannot)."""
        return self.state is None or callable(getattr(self.state, "crop", None))

    def remember(self, tokens: int, replay: Callable[[int], Any] | None) -> None:
        """Called while recording, before this layer's block consumes ``tokens`` more tokens from ``state``: keeps
        that state, and ``replay(k)``, which recomputes the state after the first ``k`` of those tokens."""
        if self.record_past:
            self.history.append(Recorded(self.state, tokens, replay))

    def rollback_problem(self, remove: int) -> str | None:
        """Why this layer cannot drop its last ``remove`` tokens (None when it can)."""
        recorded = sum(entry.tokens for entry in self.history)
        if remove == 0 or self.state_can_crop or remove <= recorded:
            return None
        if not self.record_past:
            return (f"its {type(self.state).__name__} (a recurrent state) cannot roll back; only KV caches can, unless the "
                    "cache records states (activate_past_recording, transformers >= 5.25)")
        return f"it recorded {recorded} tokens since recording began or the last crop, not {remove}"

    def roll_back(self, remove: int, keep: int) -> None:
        """Drop the last ``remove`` tokens (``keep`` remain): cut a KV cache, or go back through the recorded calls to
        the one holding the first dropped token and restore the state before it (replaying its kept tokens)."""
        if self.state is not None and self.state_can_crop:
            self.state = self.state.crop(keep)
        for entry in reversed(self.history if remove else []):
            if remove >= entry.tokens:
                self.state, remove = entry.state, remove - entry.tokens
            else:
                if entry.replay is None:
                    raise ValueError("ZooCache: a recorded call's rows were reordered (beam search); it cannot be replayed")
                self.state, remove = entry.replay(entry.tokens - remove), 0
            if not remove:
                break
        self.history = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.state).__name__})"

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def keys(self) -> torch.Tensor | None:
        kv = kv_state(self.state)
        return None if kv is None else kv.k

    @property
    def values(self) -> torch.Tensor | None:
        kv = kv_state(self.state)
        return None if kv is None else kv.v

    @property
    def max_batch_size(self) -> int | None:
        tensors: list[torch.Tensor] = []
        map_rows(self.state, lambda t: tensors.append(t) or t)
        return tensors[0].shape[0] if tensors else None

    @property
    def max_cache_len(self) -> int:
        return self.get_max_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: the first forward creates the state."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``[B, H_kv, T, Dh]`` to this layer's KV cache (``DynamicLayer.update``)."""
        state = AttentionState(None, None) if self.state is None else self.state
        if not getattr(state, "is_kv_cache", False):
            raise ValueError(f"ZooCacheLayer.update: this layer keeps a {type(state).__name__} state, not a growing KV cache")
        self.state, keys, values, _ = state.append(key_states, value_states)
        return keys, values

    def get_seq_length(self, *args: Any) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for a query of ``query`` tokens (transformers >= 5.24) or positions (earlier)."""
        return self.seen_tokens + query_length(query), 0

    def get_max_length(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0
        self.history = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.state = map_rows(self.state, fn)
        self.history = [Recorded(map_rows(e.state, fn), e.tokens, e.replay if e.tokens == 1 else None) for e in self.history]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        raise NotImplementedError("ZooCache keeps every state on the model's device (no offloading)")

    def prefetch(self) -> None:
        raise NotImplementedError("ZooCache keeps every state on the model's device (no offloading)")


class ZooCache(Cache):
    """Per-layer block states for generation, as a transformers ``Cache``: KV caches, recurrent states, LSTM (h, c).

    Each of ``layers`` is a :class:`ZooCacheLayer`; ``states`` lists their states. ``seen_tokens`` counts the tokens
    every layer has consumed, recurrent layers included, so transformers may slice the inputs of a continued
    ``generate`` by :meth:`get_seq_length` for every layer: ``is_linear`` (which tells transformers not to) is False
    for each layer. A KV cache rolls back by cutting it (:meth:`crop`, used by assisted and prompt-lookup decoding);
    a recurrent state rolls back to a state recorded while :meth:`activate_past_recording` is on. With ``max_length`` (``cache_implementation="static"``) the first forward's KV caches
    become preallocated buffers of ``max_length`` slots that later steps fill in place (as :mod:`zoo.decoding`).
    """

    def __init__(self, n_layers: int, max_length: int | None = None):
        super().__init__(layers=[ZooCacheLayer(max_length) for _ in range(n_layers)])
        self.max_length = max_length
        self.is_static = False  # True once the states are static buffers (after the first forward with max_length)

    @property
    def states(self) -> list[Any]:
        return [layer.state for layer in self.layers]

    @states.setter
    def states(self, states: list[Any]) -> None:
        if len(states) != len(self.layers):
            raise ValueError(f"ZooCache.states: expected {len(self.layers)} layer states, got {len(states)}")
        for layer, state in zip(self.layers, states):
            layer.state = state

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen_tokens if self.layers else 0

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        for layer in self.layers:
            layer.seen_tokens = value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_length is None else self.max_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.get_max_length()

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_croppable(self) -> bool:
        return all(layer.state_can_crop or layer.record_past for layer in self.layers)

    def crop(self, length: int) -> None:
        """Drop the last ``-length`` tokens (``length <= 0``, transformers >= 5.24) or keep the first ``length``
        (``length > 0``, earlier transformers). KV caches are cut; a recurrent state returns to the one recorded
        before the first dropped token (see :meth:`activate_past_recording`). Nothing changes if a layer cannot."""
        keep = crop_keep(length, self.seen_tokens)
        if keep < 0:
            raise ValueError(f"ZooCache.crop({length}): the cache holds only {self.seen_tokens} tokens")
        remove = self.seen_tokens - keep
        for i, layer in enumerate(self.layers):
            problem = layer.rollback_problem(remove)
            if problem is not None:
                raise ValueError(f"ZooCache.crop({length}): layer {i} cannot drop its last {remove} tokens: {problem}")
        for layer in self.layers:
            layer.roll_back(remove, keep)
        self.seen_tokens = keep

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs: Any) -> None:
        """Record what a rollback needs (transformers' contract, used by assisted and prompt-lookup decoding): each
        layer whose state cannot be cut keeps, for every call since the last :meth:`crop`, its state before the call
        and its input, so a crop restores that state and replays the kept tokens of the call (one chunked block
        call, only where drafts were rejected). ``recurrent_states_to_keep`` is reported back to transformers; zoo
        needs no bound (it keeps every call since the last crop). KV caches need no record."""
        for layer in self.layers:
            layer.record_past = True
            layer.recurrent_states_to_keep = int(recurrent_states_to_keep or 0)

    def is_recording_past(self, layer_idx: int) -> bool:
        return self.layers[layer_idx].record_past

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """How many of a step's last tokens get a recorded state (0 when not recording); the most over layers for None."""
        keep = 0
        for layer in self.layers if layer_idx is None else [self.layers[layer_idx]]:
            keep = max(keep, layer.recurrent_states_to_keep if layer.record_past else 0)
        return keep

    def reset(self) -> None:
        super().reset()
        self.is_static = False


def replay_of(layer: Any, hidden: torch.Tensor, state: Any, conditioning: torch.Tensor | None,
            shared: dict[str, torch.Tensor]) -> Callable[[int], Any]:
    """``replay(k)``: ``layer``'s state after the first ``k`` tokens of ``hidden [B, T, D]``, from ``state`` (the
    layer's state before them), reading the first ``k`` positions of this call's cross-layer tensors."""

    @torch.no_grad()
    def replay(k: int) -> Any:
        if k == 0:
            return state
        prefix = {name: t[:, :k] for name, t in shared.items()}  # [B, k, ...]
        return layer(hidden[:, :k], state, conditioning, prefix)[1]

    return replay
