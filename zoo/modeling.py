"""The one generic model for every block: a Hugging Face ``PreTrainedModel`` stacking zoo layers."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
try:  # transformers' per-layer config support; versions without it (< 5.24) get an AttributeError of the same meaning
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError
except ImportError:
    class AmbiguousGlobalPerLayerAttributeError(AttributeError):
        """A config attribute that differs across layers, read as one value."""
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import (
    BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput, MoeCausalLMOutputWithPast,
)

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers import FFNS, MIXERS, NORMS, MoE, ResidualLayer, map_state
from zoo.layers.attention import Attention, AttentionState, StaticAttentionState, flash_attn_available
from zoo.layers.base import describe_backends
from zoo.layers.layer import AdaLNModulation, marking_replays
from zoo.layers.short_conv import ShortConv

logger = logging.getLogger("zoo")

# transformers >= 5.24 names the decoding cache ``cache`` (forward argument and output field); 5.0-5.23 name it
# ``past_key_values``. zoo's forwards accept both and return the cache under the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# transformers >= 5.25 rolls recurrent states back for assisted and prompt-lookup decoding: the cache records the states
# of the last tokens (``activate_past_recording(recurrent_states_to_keep=N)``) and ``crop(-n)`` restores one. Earlier
# versions refuse assisted decoding for models whose state cannot roll back (``_is_stateful``).
RECURRENT_ROLLBACK = hasattr(Cache, "get_recurrent_states_to_keep")


def resolve_cache(cache: "ZooCache | None", past_key_values: "ZooCache | None") -> "ZooCache | None":
    """The cache a forward was given, under either name (``past_key_values`` is the older name of ``cache``)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decoding cache once: `cache` and `past_key_values` (its older name) were both given")
    return cache if cache is not None else past_key_values


def output_cache(output: Any) -> "ZooCache | None":
    """The cache a zoo model's output holds, whatever the installed transformers calls the field."""
    return output.get(CACHE_FIELD)


def with_saved_defaults(module_args: dict[str, Any]) -> dict[str, Any]:
    """Saved module sections with the keys they lack filled from their config class's ``SAVED_DEFAULTS`` (what a
    config written before the key existed meant); sections of unknown modules are left for validation to name."""
    out = {}
    for name, args in module_args.items():
        registry = MIXERS if name in MIXERS else FFNS if name in FFNS else None
        saved = getattr(registry.get(name).config_cls, "SAVED_DEFAULTS", {}) if registry is not None else {}
        out[name] = {**saved, **args} if isinstance(args, dict) else args
    return out


class ZooConfig(PreTrainedConfig):
    """Hugging Face face of :class:`zoo.config.ModelConfig` (``model_type = "zoo"``)."""

    model_type = "zoo"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    d_model: int = 256
    n_layers: int = 4
    blocks: list | None = None
    ffn: str | list = "swiglu"
    vocab_size: int = 259
    norm_eps: float = 1e-5
    norm: str = "rmsnorm"  # zoo.layers.NORMS; checkpoints saved before the key existed used RMSNorm
    embed_norm: bool = False
    init_std: float = 0.02
    module_args: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bidirectional: bool = False  # every layer sees the whole sequence (a denoiser): see SequenceMixer.bidirectional
    time_conditioning: bool = False  # adaLN-Zero conditioning on a diffusion time (see ZooModel)
    mask_token_id: int | None = None
    diffusion: dict | None = None  # masked-diffusion objective and sampler settings (zoo.config.DiffusionConfig)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.model_config()  # a bad value is a ConfigError naming its field (config.<key>) here, not at model build

    @classmethod
    def from_model_config(cls, model: ModelConfig, **kwargs: Any) -> "ZooConfig":
        plain = model.to_dict()
        module_args = {name: plain.pop(name) for name in model.module_args}
        if model.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer) before building a model")
        return cls(
            d_model=plain["d_model"], n_layers=plain["n_layers"], blocks=plain["blocks"], ffn=plain["ffn"],
            vocab_size=plain["vocab_size"], norm_eps=plain["norm_eps"], norm=plain["norm"], embed_norm=plain["embed_norm"],
            init_std=plain["init_std"],
            module_args=module_args, tie_word_embeddings=plain["tie_embeddings"], bidirectional=model.bidirectional,
            time_conditioning=model.time_conditioning, **kwargs,
        )

    def model_config(self) -> ModelConfig:
        """The validated zoo model spec this HF config describes: what :class:`ZooModel` builds from. Checkpoints
        written before ``time_conditioning`` was a model field keep it in ``diffusion``; it is read from there.
        A module section saved before one of its keys existed gets that key's ``SAVED_DEFAULTS`` value (the old
        behaviour) instead of the new default: ``module_args`` here are the complete sections zoo saves."""
        time_conditioning = self.time_conditioning or bool((self.diffusion or {}).get("time_conditioning"))
        return ModelConfig.from_dict(
            {
                "d_model": self.d_model, "n_layers": self.n_layers, "blocks": list(self.blocks or ["attention"]),
                "ffn": self.ffn, "vocab_size": self.vocab_size, "norm_eps": self.norm_eps, "norm": self.norm,
                "embed_norm": self.embed_norm, "init_std": self.init_std,
                "tie_embeddings": self.tie_word_embeddings, "bidirectional": self.bidirectional,
                "time_conditioning": time_conditioning, **with_saved_defaults(self.module_args or {}),
            },
            "config",
        )

    # transformers' standard attributes, derived from the validated spec on every read (``model_config()``), so they
    # always describe the model the config builds and are never saved: the spec is. Setting one to another value
    # raises (change the spec key named in the message instead).

    def _spec(self) -> ModelConfig:
        if not self.__dict__.get("_post_init_done"):
            raise AttributeError("ZooConfig: the standard attributes are derived once the config is built")
        return self.model_config()

    def _layer_values(self, name: str) -> list[Any]:
        """Each layer's value of the standard attribute ``name`` (``intermediate_size``: its FFN's hidden size)."""
        spec = self._spec()
        if name == "layer_types":
            return [_layer_type(spec, block) for block in spec.layer_blocks()]
        if name == "intermediate_size":
            return [0 if ffn == "none" else spec.args_for(ffn).resolved_hidden_size(spec.d_model) for ffn in spec.layer_ffns()]
        raise KeyError(name)

    def _attention_values(self) -> dict[str, Any]:
        """The attention layers' heads, KV heads, head size and RoPE base (one section serves every attention
        layer; ``layer_types`` says which layers they are): zero heads and None for a model without attention."""
        spec = self._spec()
        sections = {block for block in spec.layer_blocks() if issubclass(MIXERS.get(block).cls, Attention)}
        if not sections:
            return {"num_attention_heads": 0, "num_key_value_heads": 0, "head_dim": None, "rope_theta": None}
        values = [
            {"num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads,
             "head_dim": a.head_dim or spec.d_model // a.n_heads, "rope_theta": a.rope_theta}
            for a in (spec.args_for(block) for block in sorted(sections))
        ]
        if any(v != values[0] for v in values):
            raise ValueError(f"ZooConfig: the attention blocks {sorted(sections)} differ in heads or RoPE; transformers' attributes describe one kind")
        return values[0]

    def _per_layer(self, name: str) -> Any:
        """The layer's own value in a per-layer view, else the one value every layer has; layers that differ make
        the global read ambiguous, as transformers' heterogeneous configs do."""
        values = self._layer_values(name)
        layer = self.__dict__.get("_zoo_layer_idx")
        if layer is not None:
            return values[layer]
        if any(v != values[0] for v in values):
            raise AmbiguousGlobalPerLayerAttributeError(
                f"'{name}' differs across layers ({values}): read config.per_layer_config[i].{name} instead"
            )
        return values[0]

    def _refuse_change(self, name: str, value: Any, spec_key: str) -> None:
        if value != getattr(self, name):
            raise ValueError(f"ZooConfig.{name} is derived from the model spec ({spec_key}); change that key instead of setting {name}={value!r}")

    @property
    def layer_types(self) -> list[str]:
        """Each layer's kind in transformers' names (``full_attention``, ``linear_attention`` for a recurrent state,
        ``conv``, ``hybrid`` for attention behind a short convolution): the block pattern tiled to ``n_layers``."""
        return self._layer_values("layer_types")

    @layer_types.setter
    def layer_types(self, value: list[str]) -> None:
        self._refuse_change("layer_types", value, "blocks")

    @property
    def num_attention_heads(self) -> int:
        """Query heads of every attention layer (``attention.n_heads``); 0: the model has no attention."""
        return self._attention_values()["num_attention_heads"]

    @num_attention_heads.setter
    def num_attention_heads(self, value: int) -> None:
        self._refuse_change("num_attention_heads", value, "attention.n_heads")

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads of every attention layer (``attention.n_kv_heads``, GQA); 0 without attention."""
        return self._attention_values()["num_key_value_heads"]

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:
        self._refuse_change("num_key_value_heads", value, "attention.n_kv_heads")

    @property
    def head_dim(self) -> int | None:
        """Size of one attention head (``attention.head_dim``, else ``d_model / n_heads``); None without attention."""
        return self._attention_values()["head_dim"]

    @head_dim.setter
    def head_dim(self, value: int | None) -> None:
        self._refuse_change("head_dim", value, "attention.head_dim")

    @property
    def rope_theta(self) -> float | None:
        """RoPE base of the attention layers (``attention.rope_theta``); None without attention."""
        return self._attention_values()["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float | None) -> None:
        self._refuse_change("rope_theta", value, "attention.rope_theta")

    @property
    def intermediate_size(self) -> int:
        """Hidden size of the layers' FFN (an MoE's: each expert's; 0: no FFN); per layer when the FFN pattern
        mixes sizes (``per_layer_config[i].intermediate_size``)."""
        return self._per_layer("intermediate_size")

    @intermediate_size.setter
    def intermediate_size(self, value: int) -> None:
        self._refuse_change("intermediate_size", value, "the FFN section's hidden_size")

    @property
    def max_position_embeddings(self) -> None:
        """None: no block has a position limit (RoPE and recurrent states extend to any length)."""
        return None

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int | None) -> None:
        self._refuse_change("max_position_embeddings", value, "none: zoo models have no position limit")

    @property
    def is_heterogeneous(self) -> bool:
        """True when a standard attribute differs across layers (the FFN pattern mixes hidden sizes). False for a spec
        that does not validate: transformers asks while saving or listing keys, and building the model names the error."""
        if "_zoo_layer_idx" in self.__dict__:
            return False
        try:
            return len(set(self._layer_values("intermediate_size"))) > 1
        except (ConfigError, AttributeError):
            return False

    @property
    def per_layer_attributes(self) -> set[str] | None:
        return {"intermediate_size"} if self.is_heterogeneous else None

    @property
    def per_layer_config(self) -> list["ZooConfig"]:
        """Each layer's view of this config, whose attributes are that layer's (transformers' per-layer form)."""
        views = []
        for i in range(self.n_layers):
            view = copy.copy(self)
            view.__dict__["_zoo_layer_idx"] = i
            views.append(view)
        return views

    def _update_heterogeneous_to_dict_output(self, d: dict[str, Any]) -> None:
        """Nothing per layer is saved: the spec (``blocks``, ``ffn``, module sections) says it."""
        d.pop("_zoo_layer_idx", None)


def _layer_type(spec: ModelConfig, block: str) -> str:
    """transformers' ``layer_types`` name of a layer of ``block``: its class's, ``hybrid`` for attention behind a
    short convolution (a KV cache and a convolution state)."""
    layer_type = MIXERS.get(block).cls.layer_type
    return "hybrid" if layer_type == "full_attention" and spec.short_conv.get(block, 0) else layer_type


def _attention_state(state: Any) -> AttentionState | StaticAttentionState | None:
    """The KV cache in a layer's state (alone, or first of a ``(mixer_state, ffn_state)`` pair); None for others."""
    if isinstance(state, (AttentionState, StaticAttentionState)):
        return state
    if isinstance(state, tuple) and not hasattr(state, "_fields") and state and isinstance(state[0], (AttentionState, StaticAttentionState)):
        return state[0]
    return None


def _map_rows(state: Any, fn) -> Any:
    """Apply ``fn`` to every batch-first tensor of a state (a static KV cache's shared slot counter has no batch)."""
    if isinstance(state, StaticAttentionState):
        return state._replace(k=fn(state.k), v=fn(state.v), key_mask=fn(state.key_mask), positions=fn(state.positions))
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return type(state)(_map_rows(part, fn) for part in state)
    return map_state(state, fn)


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
        kv = _attention_state(self.state)
        return None if kv is None else kv.k

    @property
    def values(self) -> torch.Tensor | None:
        kv = _attention_state(self.state)
        return None if kv is None else kv.v

    @property
    def max_batch_size(self) -> int | None:
        tensors: list[torch.Tensor] = []
        _map_rows(self.state, lambda t: tensors.append(t) or t)
        return tensors[0].shape[0] if tensors else None

    @property
    def max_cache_len(self) -> int:
        return self.get_max_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: the first forward creates the state."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``[B, H_kv, T, Dh]`` to this layer's KV cache (``DynamicLayer.update``)."""
        if self.state is not None and not isinstance(self.state, AttentionState):
            raise ValueError(f"ZooCacheLayer.update: this layer keeps a {type(self.state).__name__} state, not a growing KV cache")
        if self.state is None:
            self.state = AttentionState(key_states, value_states)
        else:
            key_mask = self.state.key_mask
            if key_mask is not None:
                key_mask = torch.cat((key_mask, key_mask.new_ones(key_mask.shape[0], key_states.shape[2])), dim=1)  # [B, S + T]
            self.state = AttentionState(
                torch.cat((self.state.k, key_states), dim=2), torch.cat((self.state.v, value_states), dim=2), key_mask
            )
        return self.state.k, self.state.v

    def get_seq_length(self, *args: Any) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for a query of ``query`` tokens (transformers >= 5.24) or positions (earlier)."""
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.seen_tokens + query_length, 0

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
        self.state = _map_rows(self.state, fn)
        self.history = [Recorded(_map_rows(e.state, fn), e.tokens, e.replay if e.tokens == 1 else None) for e in self.history]

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
        keep = self.seen_tokens + length if length <= 0 else min(length, self.seen_tokens)
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


# transformers' ``attn_implementation`` names -> zoo's ``attention.backend``
ATTN_IMPLEMENTATIONS = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash_attn"}


def reported_attn_implementation(config: ZooConfig) -> str:
    """The transformers name of the attention the config's attention blocks run (``auto``: flash-attn where it is
    installed, which it uses for CUDA fp16/bf16 inputs, else SDPA)."""
    backend = (config.module_args or {}).get("attention", {}).get("backend", "auto")
    if backend == "auto":
        backend = "flash_attn" if flash_attn_available() else "sdpa"
    return {zoo_name: hf_name for hf_name, zoo_name in ATTN_IMPLEMENTATIONS.items()}[backend]


def apply_attn_implementation(config: ZooConfig, requested: str) -> None:
    """Set the attention blocks' backend from transformers' ``attn_implementation`` (a no-op when the config already
    runs it, so ``auto`` stays ``auto``)."""
    if requested == reported_attn_implementation(config):
        return
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={requested!r}: zoo's attention runs {', '.join(map(repr, ATTN_IMPLEMENTATIONS))} "
            "(model.attention.backend eager, sdpa, flash_attn)"
        )
    module_args = dict(config.module_args or {})
    module_args["attention"] = {**module_args.get("attention", {}), "backend": ATTN_IMPLEMENTATIONS[requested]}
    config.module_args = module_args


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    config: ZooConfig
    base_model_prefix = "model"
    _no_split_modules = ["ResidualLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = True  # per ResidualLayer, see set_activation_checkpointing

    def __init__(self, config: ZooConfig, *args: Any, **kwargs: Any):
        """``attn_implementation`` (of ``from_pretrained``/``from_config``) sets ``attention.backend``; the config then
        reports the attention the model runs."""
        requested = config._attn_implementation_internal
        if isinstance(requested, str):
            apply_attn_implementation(config, requested)
        super().__init__(config, *args, **kwargs)
        config._attn_implementation_internal = reported_attn_implementation(config)

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs: Any) -> None:
        """Switch every attention block's backend after loading (transformers' API)."""
        if not isinstance(attn_implementation, str):
            raise ValueError(f"attn_implementation: zoo models take one name for every layer, got {attn_implementation!r}")
        super().set_attn_implementation(attn_implementation, **kwargs)
        apply_attn_implementation(self.config, attn_implementation)
        backend = self.config.module_args["attention"]["backend"]
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_backend(backend)
        self.config._attn_implementation_internal = reported_attn_implementation(self.config)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Blocks and FFNs with special parameters (decays, A_log, ...) initialize them after the generic pass.
        init_parameters = getattr(module, "init_parameters", None)
        if callable(init_parameters):
            init_parameters()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint, **kwargs: Any) -> None:
        """Hugging Face's switch, with the checkpoint function's replays marked (:func:`~zoo.layers.layer.marking_replays`)."""
        super()._set_gradient_checkpointing(enable, marking_replays(gradient_checkpointing_func), **kwargs)

    @property
    def _is_stateful(self) -> bool:
        """True when a layer keeps a state that cannot roll back (a recurrent block, a stateful FFN) and the installed
        transformers (< 5.25) cannot record states to roll back to: it then refuses assisted and prompt-lookup decoding."""
        return not RECURRENT_ROLLBACK and not all(layer.state_can_roll_back for layer in self.base_model.layers)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # zoo layers keep their own states in a ZooCache, created by the model on the first call.
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """Hugging Face's loader. A local directory's ``config.json`` is checked first (:func:`check_config_file`);
        a truncated or corrupt ``*.safetensors`` file raises a CheckpointError naming it, weights whose shapes differ
        from the config's a ConfigError at ``config.json``."""
        from safetensors import SafetensorError

        local = Path(str(pretrained_model_name_or_path))
        if local.is_dir() and kwargs.get("config") is None:
            check_config_file(local)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:
            from zoo.reliability.io import explain_safetensors_error

            raise explain_safetensors_error(pretrained_model_name_or_path, err) from None
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            raise ConfigError(
                "config.json", f"in {pretrained_model_name_or_path}: the weights' shapes differ from what the config "
                "describes (was config.json edited? transformers' load report above lists the tensors); restore the config written with the weights",
            ) from None


REQUIRED_CONFIG_KEYS = ("model_type", "d_model", "n_layers", "vocab_size")  # saved by every zoo checkpoint


def check_config_file(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a zoo checkpoint directory as a dict; a ConfigError names a missing file, invalid
    JSON, a missing :data:`REQUIRED_CONFIG_KEYS` key or a bad value (``config.<key>``)."""
    import json

    file = directory / "config.json"
    if not file.is_file():
        raise ConfigError("config.json", f"{directory} holds no config.json; a zoo checkpoint directory is written by zoo.train (<output_dir>/hf) or zoo.convert")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("config.json", f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("config.json", f"{file} must hold a JSON object, got {type(data).__name__}")
    if data.get("model_type", ZooConfig.model_type) != ZooConfig.model_type:
        raise ConfigError("config.model_type", f"{file} describes a {data['model_type']!r} model, not a zoo model; convert it: python -m zoo.convert {directory} OUT_DIR")
    for key in REQUIRED_CONFIG_KEYS:
        if key not in data:
            raise ConfigError(f"config.{key}", f"missing from {file}; every zoo checkpoint's config.json has it")
    return data


def set_activation_checkpointing(model: nn.Module, blocks: str | list[str]) -> int:
    """Activation checkpointing (``trainer.activation_checkpointing``) for ``all`` residual layers of ``model``, the
    layers whose block is named in ``blocks``, or ``none``; returns how many layers recompute in the backward. Works
    on wrapped models too (PEFT, Lightning modules): it finds the layers by type."""
    layers = [m for m in model.modules() if isinstance(m, ResidualLayer)]
    if not layers:
        raise ValueError(f"activation checkpointing: {type(model).__name__} has no zoo residual layers")
    for layer in layers:
        layer.gradient_checkpointing = blocks == "all" or (isinstance(blocks, list) and layer.block in blocks)
    return sum(layer.gradient_checkpointing for layer in layers)


def assign_shared_roles(mixers: list[nn.Module]) -> None:
    """Tell each block that shares a cross-layer tensor (``SequenceMixer.shared_tensor``) its role: the first block
    of the stack naming a tensor produces it, later ones read it. The model passes every forward a fresh dict, so a
    shared tensor holds the current call's tokens only (full forward, each prefill chunk, each decoded token)."""
    named: set[str] = set()
    for mixer in mixers:
        name = mixer.shared_tensor
        if name is not None:
            mixer.set_shared_role(producer=name not in named)
            named.add(name)


class ZooModel(ZooPreTrainedModel):
    """Embedding (-> embed_norm) -> layers (block pattern tiled to n_layers) -> final norm (RMSNorm unless model.norm says).

    Built from the validated spec ``config.model_config()``. With ``time_conditioning`` every layer and the final
    norm are adaLN-Zero conditioned (DiT): ``forward`` then takes ``conditioning [B, D]`` (a diffusion-time
    embedding), see :class:`ResidualLayer`. With ``bidirectional`` every block sees the whole sequence.
    """

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        spec = config.model_config()
        self.conditioned = spec.time_conditioning
        self.embed = nn.Embedding(config.vocab_size, spec.d_model)
        norm = NORMS[spec.norm]
        self.embed_norm = norm(spec.d_model, spec.norm_eps) if spec.embed_norm else None
        layers = []
        for i, (block, ffn) in enumerate(zip(spec.layer_blocks(), spec.layer_ffns())):
            mixer_cls = MIXERS.get(block).cls
            build_mixer = mixer_cls.bidirectional if spec.bidirectional else mixer_cls
            mixer = ShortConv.wrap(build_mixer(spec.args_for(block), spec.d_model, i), spec.short_conv.get(block, 0))
            ffn_module = None if ffn == "none" else FFNS.get(ffn).cls(spec.args_for(ffn), spec.d_model, i)
            layers.append(ResidualLayer(mixer, ffn_module, spec.d_model, spec.norm_eps, conditioned=self.conditioned, norm=norm, block=block))
        self.layers = nn.ModuleList(layers)
        assign_shared_roles([layer.mixer for layer in layers])
        self.norm = norm(spec.d_model, spec.norm_eps)
        # adaLN on the output: shift and scale after the final norm (DiT's final layer), zero at init.
        self.final_modulation = AdaLNModulation(spec.d_model, 2) if self.conditioned else None
        logger.info(
            "zoo model: backends %s (auto = torch; triton on request)",
            describe_backends([layer.mixer for layer in self.layers]),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [batch, seq_len], got {list(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids: token ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: ZooCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        conditioning: torch.Tensor | None = None,
        past_key_values: ZooCache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """``cache`` (or its older name ``past_key_values``): the :class:`ZooCache` to continue from and update.
        ``conditioning [B, D]``: required by a conditioned model (``model.time_conditioning``), refused otherwise.

        ``output_hidden_states``: the embedding output and every layer's output, the last one after the final norm
        (``n_layers + 1`` tensors ``[B, T, D]``, as Llama). ``output_attentions``: the attention maps ``[B, H, T, S]``
        of the attention layers only (recurrent layers compute none; as transformers' Jamba), through the eager path.
        ``return_dict=False`` returns the output's non-None fields as a tuple.
        """
        cache = resolve_cache(cache, past_key_values)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
            raise ValueError(f"inputs_embeds: expected shape [batch, seq_len, {self.config.d_model}], got {list(inputs_embeds.shape)}")
        elif not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds: expected a floating-point tensor, got {inputs_embeds.dtype}")
        self._check_conditioning(conditioning, inputs_embeds.shape[0])
        inputs_embeds = self.normed_embeddings(inputs_embeds)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = ZooCache(len(self.layers))
        if not use_cache:
            cache = None
        spans = None
        if attention_mask is not None and not torch.compiler.is_compiling() and not bool(attention_mask.all()):
            spans = self._token_spans(attention_mask, inputs_embeds.shape[1], cache)
        record = _Recorder(self.layers, output_hidden_states, output_attentions)
        with record:
            if spans is None:
                hidden = self._run_layers(inputs_embeds, cache, conditioning, record)
            else:
                hidden = self._run_rows(inputs_embeds, spans, cache, conditioning, record)
        if cache is not None:
            cache.seen_tokens += hidden.shape[1]
            if cache.max_length is not None and not cache.is_static:
                cache.states = [layer.static_state(state, cache.max_length) for layer, state in zip(self.layers, cache.states)]
                cache.is_static = True
        hidden = self.norm(hidden)
        if conditioning is not None:
            shift, scale = self.final_modulation(conditioning)  # each [B, 1, D]
            hidden = hidden * (1 + scale) + shift
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=(*record.hidden_states[:-1], hidden) if output_hidden_states else None,
            attentions=tuple(record.attentions) if output_attentions else None,
            **{CACHE_FIELD: cache},
        )
        return out if return_dict else out.to_tuple()

    def normed_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """The first layer's input from the embeddings ``[B, T, D]``: through ``embed_norm`` when the model has one."""
        return embeds if self.embed_norm is None else self.embed_norm(embeds)

    def _check_conditioning(self, conditioning: torch.Tensor | None, batch_size: int) -> None:
        if not self.conditioned:
            if conditioning is not None:
                raise ValueError("conditioning: this model is not conditioned (model.time_conditioning is off); pass None")
            return
        expected = [batch_size, self.config.d_model]
        if conditioning is None:
            raise ValueError(f"conditioning: this model is adaLN-conditioned (model.time_conditioning); pass a tensor of shape {expected}")
        if list(conditioning.shape) != expected or not conditioning.is_floating_point():
            raise ValueError(f"conditioning: expected a floating-point tensor of shape {expected}, got {conditioning.dtype} {list(conditioning.shape)}")

    def _run_layers(
        self, hidden: torch.Tensor, cache: ZooCache | None, conditioning: torch.Tensor | None = None, record: "_Recorder | None" = None
    ) -> torch.Tensor:
        """Every layer over ``hidden [B, T, D]``, updating ``cache``; ``record`` keeps each layer's input and attention map.
        The layers share one fresh ``shared`` dict (cross-layer tensors of these tokens, see ``assign_shared_roles``).
        While ``cache`` records for a rollback, each layer whose state cannot be cut leaves it a replay of this call."""
        shared: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if record is not None:
                record.before_layer(hidden)
            state = cache.states[i] if cache is not None else None
            if cache is not None and cache.layers[i].record_past and not layer.state_can_roll_back:
                cache.layers[i].remember(hidden.shape[1], _replay(layer, hidden, state, conditioning, shared))
            hidden, new_state = layer(hidden, state, conditioning, shared)
            if record is not None:
                record.after_layer(layer)
            if cache is not None:
                cache.layers[i].state = new_state
        if record is not None:
            record.before_layer(hidden)
        return hidden

    def _token_spans(self, attention_mask: torch.Tensor, seq_len: int, cache: ZooCache | None) -> list[tuple[int, int]] | None:
        """Each row's ``(start, end)``: its tokens are ``[start, end)``, padding before (left) or after (right) them.

        Padding is allowed in a first call only. A causal model without a cache to keep runs right padding as tokens
        (no earlier position sees them): then None, one batched call. Otherwise the rows run one by one."""
        if attention_mask.dim() != 2 or attention_mask.shape[1] < seq_len:
            raise ValueError(f"attention_mask: expected shape [batch, >= {seq_len}], got {list(attention_mask.shape)}")
        mask = attention_mask[:, -seq_len:].bool()  # [B, T]: the positions of this call
        if cache is not None and cache.seen_tokens:
            if not bool(mask.all()):
                raise ValueError("attention_mask has padded positions after the first call; zoo models take left or right padding of the prompt only")
            return None
        if not bool(mask.any(dim=1).all()):
            raise ValueError("attention_mask: a row has no tokens at all")
        started = mask.cummax(dim=1).values  # [B, T]: at or after the row's first token
        ended = mask.flip(1).cummax(dim=1).values.flip(1)  # [B, T]: at or before the row's last token
        gap = started & ended & ~mask  # a pad between two tokens
        if bool(gap.any()):
            row = int(gap.any(dim=1).nonzero()[0])
            raise ValueError(
                f"attention_mask has a padded position between two tokens in row {row}; zoo models take left- or "
                "right-padded batches only (each row's tokens in one run)"
            )
        starts = (~started).sum(dim=1).tolist()
        ends = (seq_len - (~ended).sum(dim=1)).tolist()
        if cache is None and not self.config.bidirectional and not any(starts):
            return None
        return list(zip(starts, ends))

    def _run_rows(
        self, hidden: torch.Tensor, spans: list[tuple[int, int]], cache: ZooCache | None, conditioning: torch.Tensor | None = None,
        record: "_Recorder | None" = None,
    ) -> torch.Tensor:
        """A padded batch without changing the block contract ``forward(x, state)``.

        Each row's tokens (``hidden[b, start:end]``) run alone from an empty state, so no block ever sees a padding
        token and every row starts at position 0 (RoPE included). Layer by layer, the rows' outputs are padded with
        zeros back to one ``[B, T, D]`` tensor, which the next layer's rows read (and ``record`` returns: gradients
        reach it); each layer merges the rows' states with ``stack_row_states``: constant-size recurrent states
        concatenate on the batch, attention left-pads its KV cache and keeps a per-row key mask, so later decode steps
        of the whole batch skip the padding slots and continue every row's own positions. Costs one prefill per row;
        decode steps then run batched as usual.
        """
        T = hidden.shape[1]
        shared: list[dict[str, torch.Tensor]] = [{} for _ in spans]  # each row's cross-layer tensors
        for i, layer in enumerate(self.layers):
            if record is not None:
                record.before_layer(hidden)
            rows, states = [], []
            for b, (start, end) in enumerate(spans):
                row_conditioning = conditioning[b : b + 1] if conditioning is not None else None  # [1, D]
                row, state = layer(hidden[b : b + 1, start:end], None, row_conditioning, shared[b])  # [1, end - start, D]
                rows.append(F.pad(row, (0, 0, start, T - end)))  # [1, T, D], zeros at the padding
                states.append(state)
                if record is not None:
                    record.after_row(layer, start, end, T)
            if record is not None:
                record.after_rows()
            if cache is not None:
                cache.layers[i].state = layer.stack_row_states(states)
            hidden = torch.cat(rows)
        if record is not None:
            record.before_layer(hidden)
        return hidden


def _replay(layer: ResidualLayer, hidden: torch.Tensor, state: Any, conditioning: torch.Tensor | None,
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


def _attention_block(mixer: nn.Module) -> Attention | None:
    """A layer's attention block, also inside a short-convolution wrapper; None for every other block."""
    while isinstance(mixer, ShortConv):
        mixer = mixer.inner
    return mixer if isinstance(mixer, Attention) else None


class _Recorder:
    """What a forward returns besides its last hidden state: every layer's input (``hidden_states``) and the
    attention layers' probabilities (``attentions``); as a context, it asks the attention blocks for them."""

    def __init__(self, layers: nn.ModuleList, hidden_states: bool, attentions: bool):
        blocks = [_attention_block(layer.mixer) for layer in layers] if attentions else []
        self.attention_blocks = [block for block in blocks if block is not None]
        self.keep_hidden, self.keep_attentions = hidden_states, attentions
        self.hidden_states: list[torch.Tensor] = []
        self.attentions: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []  # the current layer's attention maps of a padded batch's rows

    def __enter__(self) -> "_Recorder":
        for block in self.attention_blocks:
            block.record_weights = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for block in self.attention_blocks:
            block.record_weights, block.attention_weights = False, None

    def before_layer(self, hidden: torch.Tensor) -> None:
        if self.keep_hidden:
            self.hidden_states.append(hidden)

    def after_layer(self, layer: nn.Module) -> None:
        block = _attention_block(layer.mixer) if self.keep_attentions else None
        if block is not None:
            self.attentions.append(block.attention_weights)
            block.attention_weights = None

    def after_row(self, layer: nn.Module, start: int, end: int, T: int) -> None:
        """A row of a padded batch ran ``layer`` over its positions ``[start, end)``: keep its attention map padded
        with zeros to the batch's ``T`` positions (``[1, H, T, T]``)."""
        block = _attention_block(layer.mixer) if self.keep_attentions else None
        if block is not None:
            self._rows.append(F.pad(block.attention_weights, (start, T - end, start, T - end)))
            block.attention_weights = None

    def after_rows(self) -> None:
        """Every row ran the layer: its attention map is the rows' maps stacked on the batch (``[B, H, T, T]``), a
        copy (no batch-wide map exists: each row attends alone), so gradients reach the rows' maps, not this one."""
        if self._rows:
            self.attentions.append(torch.cat(self._rows))
            self._rows = []


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]`` (already shifted), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


@dataclass
class ZooMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """HF's MoE output (``aux_loss``: load-balancing loss, ``router_logits``: per-layer ``[N, E]``) plus:

    ``aux_loss`` and ``z_loss`` are unweighted means over the MoE layers; ``router_loss`` is the coefficient-weighted
    total (``aux_loss_coef * aux_loss + z_loss_coef * z_loss``, averaged over layers) that ``loss`` includes when
    labels are given; ``expert_load [n_moe_layers, E]`` is each layer's fraction of routed tokens per expert.
    """

    z_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None


class ZooWithLMHead(ZooPreTrainedModel):
    """A :class:`ZooModel` with a vocabulary head (tied to the embedding when the config says so); the causal and
    the masked-diffusion models build on it."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _head_output(self, output_classes: tuple[type, type], loss, logits, fields: dict[str, Any],
                     output_router_logits: bool | None, return_dict: bool, decoding: bool = False) -> Any:
        """The head's output: ``output_classes[0]``, or for a model with MoE FFNs ``output_classes[1]`` with the router
        statistics (``loss`` then includes the router loss; router logits only on request); a tuple unless
        ``return_dict``."""
        # A decode step (``decoding``: continuing a filled cache) computes no router statistics unless there is a
        # loss or the router logits are asked for (Hugging Face's MoE models compute them only on request).
        router = self._pop_router_losses(compute=not decoding or loss is not None or bool(output_router_logits))
        if router is None:
            result = output_classes[0](loss=loss, logits=logits, **fields)
        else:
            if loss is not None:
                loss = loss + router["router_loss"].to(loss.device)
            if not output_router_logits:
                router["router_logits"] = None
            result = output_classes[1](loss=loss, logits=logits, **fields, **router)
        return result if return_dict else result.to_tuple()

    def _pop_router_losses(self, compute: bool = True) -> dict[str, Any] | None:
        """The last forward's MoE router statistics, taken off the MoE FFNs (so no graph stays alive on them), as
        ``router_loss``, ``aux_loss``, ``z_loss`` (per-layer losses averaged over the MoE layers), ``expert_load
        [n_moe_layers, E]`` and ``router_logits`` (per layer); ``None`` for a model without MoE FFNs."""
        # modules() of each layer's FFN, not the FFN itself: PEFT's target_parameters wraps an MoE FFN in ParamWrappers.
        # Only the FFNs are walked: the whole tree, every decode step, costs more than some small models' step.
        ffns = [getattr(layer, "ffn", layer) for layer in self.model.layers]
        moes = [module for ffn in ffns if ffn is not None for module in ffn.modules() if isinstance(module, MoE)]
        if not compute:  # ``compute`` False: the statistics are dropped, the router fields left None
            for module in moes:
                module.discard_stats()
            return {} if moes else None
        stats = [s for s in (module.pop_stats() for module in moes) if s is not None]
        if not stats:
            return None
        # With one MoE layer, aux_loss equals HF Mixtral's aux_loss.
        return {
            "router_loss": torch.stack([s.weighted_loss for s in stats]).mean(),
            "aux_loss": torch.stack([s.load_balancing_loss for s in stats]).mean(),
            "z_loss": torch.stack([s.z_loss for s in stats]).mean(),
            "expert_load": torch.stack([s.expert_load for s in stats]),
            "router_logits": tuple(s.router_logits for s in stats),
        }


class ZooForCausalLM(ZooWithLMHead, GenerationMixin):
    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.post_init()

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict[str, Any], generation_mode: Any, batch_size: int, max_cache_length: int, *args: Any, **kwargs: Any
    ):
        """``generate`` starts from a fresh :class:`ZooCache` unless given one (transformers would make none for a
        model with its own cache type, and assisted decoding needs one before the first step).
        ``cache_implementation="static"`` makes it a static one of ``max_cache_length`` slots, ``"dynamic"`` a growing one."""
        implementation = generation_config.cache_implementation
        if implementation is None or model_kwargs.get(CACHE_FIELD) is not None:
            result = super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
            if model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False:
                model_kwargs[CACHE_FIELD] = ZooCache(len(self.model.layers))
            return result
        if implementation not in ("static", "dynamic", "dynamic_full"):  # transformers < 5.24 asks "dynamic_full" for assistants
            raise ValueError(f"cache_implementation={implementation!r}: zoo models keep their states in a ZooCache, 'static' or 'dynamic'")
        if generation_config.use_cache is not False:
            max_length = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
            model_kwargs[CACHE_FIELD] = ZooCache(len(self.model.layers), max_length if implementation == "static" else None)
        return None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: ZooCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        past_key_values: ZooCache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` are aligned with ``input_ids`` (shifted inside, as in HF); ``shift_labels`` are targets already
        shifted (position t predicts ``shift_labels[:, t]``, as context parallelism splits them); -100 is ignored;
        ``num_items_in_batch`` makes the loss a sum over that many targets (gradient accumulation). ``cache`` (or its
        older name ``past_key_values``) is the :class:`ZooCache` to continue from. ``logits_to_keep``: the last N
        positions' logits (0: all), or a tensor of the positions to keep.

        Models with ``moe`` FFNs return a :class:`ZooMoeCausalLMOutputWithPast` whose ``loss`` includes the router
        losses; ``output_router_logits=True`` also returns each MoE layer's router logits. A decode step (a cache
        that already holds tokens) without labels leaves the router fields None unless ``output_router_logits``.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = resolve_cache(cache, past_key_values)
        decoding = cache is not None and cache.get_seq_length() > 0
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        fields = {CACHE_FIELD: output_cache(out), "hidden_states": out.hidden_states, "attentions": out.attentions}
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None or shift_labels is not None:
            loss = ForCausalLMLoss(
                logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels
            )
        output_classes = (CausalLMOutputWithPast, ZooMoeCausalLMOutputWithPast)
        return self._head_output(output_classes, loss, logits, fields, output_router_logits, return_dict, decoding)


class TimestepEmbedding(nn.Module):
    """Diffusion time ``t [B]`` in [0, 1] -> ``[B, D]``: sinusoidal features, then a two-layer MLP."""

    def __init__(self, d_model: int, n_frequencies: int = 128):
        super().__init__()
        self.n_frequencies = n_frequencies
        self.mlp = nn.Sequential(nn.Linear(n_frequencies, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_frequencies // 2
        freqs = torch.exp(-torch.arange(half, device=t.device, dtype=torch.float32) * (torch.log(torch.tensor(10000.0)) / half))
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]  # [B, n_frequencies / 2]
        return self.mlp(torch.cat((angles.cos(), angles.sin()), dim=-1).to(self.mlp[0].weight.dtype))


@dataclass
class ZooMoeMaskedLMOutput(MaskedLMOutput):
    """A masked LM's output with MoE router losses, as in :class:`ZooMoeCausalLMOutputWithPast` (``loss`` includes
    ``router_loss`` when labels are given)."""

    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class ZooForMaskedLM(ZooWithLMHead):
    """A bidirectional :class:`ZooModel` with an LM head: the denoiser of masked (absorbing-state) diffusion.

    Needs ``config.bidirectional`` (``model.bidirectional: true``), whatever block the layers use. With ``time_conditioning``
    the diffusion time ``timesteps [B]`` is embedded (:class:`TimestepEmbedding`) into ``c [B, D]``, which conditions
    every layer and the final norm by adaLN-Zero (DiT, as MDLM's time-conditioned DiT; see :class:`ResidualLayer`).
    The training objective and the sampler live in :mod:`zoo.diffusion`.
    """

    def __init__(self, config: ZooConfig):
        if not config.bidirectional:
            raise ValueError("ZooForMaskedLM is a denoiser that sees the whole sequence: build it from a config with bidirectional=True")
        super().__init__(config)
        self.time_embed = TimestepEmbedding(config.d_model) if self.model.conditioned else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput | tuple:
        """Logits ``[B, T, V]`` for every position; ``labels`` (-100 ignored) give the plain masked-LM cross-entropy.
        ``timesteps [B]`` is required when the model is time-conditioned and ignored otherwise. Models with ``moe``
        FFNs return a :class:`ZooMoeMaskedLMOutput` (router losses; ``loss`` includes them; router logits on request)."""
        conditioning = None
        if self.time_embed is not None:
            if timesteps is None:
                raise ValueError("this ZooForMaskedLM is time-conditioned (model.time_conditioning): pass timesteps [batch]")
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            if timesteps.dim() != 1 or timesteps.shape[0] != batch_size:
                raise ValueError(f"timesteps: expected shape [{batch_size}] (one time per row), got {list(timesteps.shape)}")
            conditioning = self.time_embed(timesteps.to(self.lm_head.weight.device))  # [B, D]
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False,
            conditioning=conditioning, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        fields = {"hidden_states": out.hidden_states, "attentions": out.attentions}
        logits = self.lm_head(out.last_hidden_state)
        loss = causal_lm_loss(logits, labels.to(logits.device)) if labels is not None else None
        output_classes = (MaskedLMOutput, ZooMoeMaskedLMOutput)
        return self._head_output(output_classes, loss, logits, fields, output_router_logits, return_dict)
