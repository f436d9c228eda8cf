"""The one generic model for every block: a Hugging Face ``PreTrainedModel`` stacking zoo layers."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import (
    BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput, MoeCausalLMOutputWithPast,
)

from zoo.cache import Recorded, ZooCache, ZooCacheLayer, replay_of  # noqa: F401 (zoo.modeling's names)
from zoo.compat import (  # noqa: F401 (zoo.modeling's names)
    CACHE_FIELD, DYNAMIC_CACHE_NAMES, RECURRENT_ROLLBACK, AmbiguousGlobalPerLayerAttributeError, output_cache, resolve_cache,
)
from zoo.config import REQUIRED_CONFIG_KEYS, ModelConfig, ZooConfig, check_config_file, upgrade  # noqa: F401 (zoo.modeling's names)
from zoo.errors import ConfigError
from zoo.layers import FFNS, MIXERS, NORMS, ResidualLayer
from zoo.layers.attention import backend_for, hf_name
from zoo.layers.base import Documents, describe_backends
from zoo.layers.layer import AdaLNModulation, marking_replays
from zoo.layers.moe import discard_router_stats, router_stats
from zoo.layers.short_conv import ShortConv

logger = logging.getLogger("zoo")


def reported_attn_implementation(config: ZooConfig) -> str:
    """transformers' name of the attention the config's attention blocks run (see :func:`zoo.layers.attention.hf_name`)."""
    args = config.model_config().module_args.get("attention")
    return hf_name(args.backend if args is not None else "auto")


def apply_attn_implementation(config: ZooConfig, requested: str) -> None:
    """Set the attention blocks' backend from transformers' ``attn_implementation`` (a no-op when the config already
    runs it, so ``auto`` stays ``auto``); the saved section changes, and the spec is validated again from it."""
    if requested == reported_attn_implementation(config):
        return
    module_args = dict(config.module_args or {})
    module_args["attention"] = {**module_args.get("attention", {}), "backend": backend_for(requested)}
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
        backend = self.config.model_config().module_args["attention"].backend
        for module in self.modules():
            if getattr(module, "registry_name", None) == "attention":  # the blocks the section configures
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
            low, high = (int(v) for v in torch.aminmax(input_ids))  # one reduction (each decode step runs this)
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids: token ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]")

    def forward(
        self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
        cache: ZooCache | None = None, inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
        conditioning: torch.Tensor | None = None, past_key_values: ZooCache | None = None,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None, return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """``cache`` (or its older name ``past_key_values``): the :class:`ZooCache` to continue from and update.
        ``conditioning [B, D]``: required by a conditioned model (``model.time_conditioning``), refused otherwise.

        ``output_hidden_states``: the embedding output and every layer's output, the last one after the final norm
        (``n_layers + 1`` tensors ``[B, T, D]``, as Llama). ``output_attentions``: the attention maps ``[B, H, T, S]``
        of the attention layers only (recurrent layers compute none; as transformers' Jamba), through the eager path.
        ``return_dict=False`` returns the output's non-None fields as a tuple.

        Packed documents (transformers' padding-free inputs, ``DataCollatorWithFlattening``): ``position_ids [B, T]``
        counting 0, 1, 2, ... in each document and restarting at 0 where the next begins, and/or ``cu_seq_lens_q``
        (the documents' cumulative lengths over a ``[1, T]`` batch). Each document then runs alone through every layer
        (from an empty state at position 0: no attention, recurrent state, conv or token shift crosses a boundary),
        as :meth:`_run_rows` runs a padded batch's rows; a cache keeps each row's last document's state.
        """
        position_ids, cu_seq_lens = kwargs.pop("position_ids", None), kwargs.pop("cu_seq_lens_q", None)
        cache = resolve_cache(cache, past_key_values)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        inputs_embeds = self._input_embeddings(input_ids, inputs_embeds)
        self._check_conditioning(conditioning, inputs_embeds.shape[0])
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = (cache if cache is not None else ZooCache(len(self.layers))) if use_cache else None
        spans = None
        if attention_mask is not None and not torch.compiler.is_compiling():
            recent = attention_mask
            if cache is not None and cache.seen_tokens and attention_mask.dim() == 2:
                recent = attention_mask[:, -inputs_embeds.shape[1]:]  # a cache continues: checked are this call's columns
            if not bool(recent.all()):
                spans = self._token_spans(attention_mask, inputs_embeds.shape[1], cache)
        if (position_ids is not None or cu_seq_lens is not None) and torch.compiler.is_compiling():
            raise ValueError("position_ids / cu_seq_lens_q: packed documents are split at boundaries read on the host, which torch.compile "
                             "cannot trace; run the model uncompiled (or drop them for plain 0..T-1 positions)")
        if position_ids is not None or cu_seq_lens is not None:
            B, T = inputs_embeds.shape[:2]
            rows = spans or [(0, T)] * B
            if spans is None and attention_mask is not None and not bool(recent.all()):
                rows = self._token_spans(attention_mask, T, cache, keep_right_padding=True)  # right padding: no document
            starts = document_starts(position_ids, cu_seq_lens, rows, T, cache is not None and cache.seen_tokens > 0)
            if starts is not None:
                spans = [[(a, b) for a, b in zip([s, *cuts], [*cuts, e])] for (s, e), cuts in zip(rows, starts)]
        record = _Recorder(self.layers, output_hidden_states, output_attentions, cache if spans is None else None)
        with record:
            if spans is None:
                states = cache.states if cache is not None else [None] * len(self.layers)
                hidden, states = self._run_layers(inputs_embeds, states, conditioning, record)
            else:
                hidden, states = self._run_rows(inputs_embeds, spans, conditioning, record, keep_states=cache is not None)
        if cache is not None:
            cache.states = states
            cache.seen_tokens += hidden.shape[1]
            if cache.max_length is not None and not cache.is_static:
                cache.states, cache.is_static = self.static_states(cache.states, cache.max_length), True
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

    def _input_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The first layer's input ``[B, T, D]`` from exactly one of ``input_ids`` and ``inputs_embeds``, checked."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
            raise ValueError(f"inputs_embeds: expected shape [batch, seq_len, {self.config.d_model}], got {list(inputs_embeds.shape)}")
        elif not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds: expected a floating-point tensor, got {inputs_embeds.dtype}")
        return self.normed_embeddings(inputs_embeds)

    def static_states(self, states: list[Any], max_length: int) -> list[Any]:
        """Every layer's prefilled state as static-decoding buffers of ``max_length`` tokens (see ``static_state``)."""
        return [layer.static_state(state, max_length) for layer, state in zip(self.layers, states)]

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
        self, hidden: torch.Tensor, states: list[Any], conditioning: torch.Tensor | None = None,
        record: "_Recorder | None" = None, run_layer: Callable | None = None,
    ) -> tuple[torch.Tensor, list[Any]]:
        """Every layer over ``hidden [B, T, D]`` from ``states`` (one per layer, None: fresh); returns the last
        layer's output and the new states. The layers share one fresh ``shared`` dict (cross-layer tensors of these
        tokens, see ``assign_shared_roles``); ``record`` sees each layer's input and output. ``run_layer(layer,
        hidden, state, conditioning, shared) -> (hidden, state)`` runs one layer (default: the layer itself; a
        padded batch runs it row by row, see :meth:`_run_rows`)."""
        run_layer = run_layer or (lambda layer, *args: layer(*args))
        shared: dict[str, torch.Tensor] = {}
        new_states = []
        for i, (layer, state) in enumerate(zip(self.layers, states)):
            if record is not None:
                record.before_layer(i, layer, hidden, state, conditioning, shared)
            hidden, state = run_layer(layer, hidden, state, conditioning, shared)
            new_states.append(state)
            if record is not None:
                record.after_layer(layer)
        if record is not None:
            record.keep_hidden_state(hidden)
        return hidden, new_states

    def _token_spans(self, attention_mask: torch.Tensor, seq_len: int, cache: ZooCache | None,
                     keep_right_padding: bool = False) -> list[tuple[int, int]] | None:
        """Each row's ``(start, end)``: its tokens are ``[start, end)``, padding before (left) or after (right) them.

        Padding is allowed in a first call only. A causal model without a cache to keep runs right padding as tokens
        (no earlier position sees them): then None, one batched call (unless ``keep_right_padding``). Otherwise the
        rows run one by one."""
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
        if cache is None and not self.config.bidirectional and not any(starts) and not keep_right_padding:
            return None
        return list(zip(starts, ends))

    def _run_rows(
        self, hidden: torch.Tensor, spans: list[tuple[int, int]] | list[list[tuple[int, int]]],
        conditioning: torch.Tensor | None = None, record: "_Recorder | None" = None, keep_states: bool = True,
    ) -> tuple[torch.Tensor, list[Any]]:
        """A padded batch without changing the block contract ``forward(x, state)``: the layer loop, each layer run
        row by row.

        Each row's tokens (``hidden[b, start:end]``) run alone from an empty state, so no block ever sees a padding
        token and every row starts at position 0 (RoPE included). Layer by layer, the rows' outputs are padded with
        zeros back to one ``[B, T, D]`` tensor, which the next layer's rows read (and ``record`` returns: gradients
        reach it); with ``keep_states`` each layer merges the rows' states with ``stack_row_states``: constant-size
        recurrent states concatenate on the batch, attention left-pads its KV cache and keeps a per-row key mask, so
        later decode steps of the whole batch skip the padding slots and continue every row's own positions. Costs
        one prefill per row; decode steps then run batched as usual.

        A row given as a list of ``(start, end)`` segments (packed documents) runs as one call of each layer with its
        :class:`~zoo.layers.base.Documents` (each block keeps the documents apart, one call per document where it
        cannot take them packed); with attention maps asked for, each segment runs alone. Its state: the last
        segment's. Without states to keep (no cache) and without conditioning, the whole batch runs as one call of
        each layer: every row's segments side by side in one row of documents (:func:`_flat_runner`).
        """
        T = hidden.shape[1]
        segments = [row if isinstance(row, list) else [row] for row in spans]  # each row: its [start, end) segments
        packed = record is None or not record.keep_attentions  # attention maps: one per document (Recorder)
        if packed and not keep_states and conditioning is None:
            return self._run_layers(hidden, [None] * len(self.layers), None, record, _flat_runner(segments, hidden.shape, hidden.device))
        documents = [Documents.from_bounds([a - row[0][0] for a, _ in row] + [row[-1][1] - row[0][0]], hidden.device)
                     if packed and len(row) > 1 else None for row in segments]  # a packed row's documents, from its first token
        calls = [[(row[0][0], row[-1][1])] if docs is not None else row for row, docs in zip(segments, documents)]
        shared_of = [[{} for _ in row] for row in calls]  # each call's cross-layer tensors

        def run_rows(layer: ResidualLayer, hidden: torch.Tensor, state: Any, conditioning: torch.Tensor | None, shared: dict) -> tuple[torch.Tensor, Any]:
            rows, states = [], []
            for b, row_calls in enumerate(calls):
                row_conditioning = conditioning[b : b + 1] if conditioning is not None else None  # [1, D]
                pieces = []
                for (start, end), call_shared in zip(row_calls, shared_of[b]):
                    piece, row_state = layer(hidden[b : b + 1, start:end], None, row_conditioning, call_shared, documents[b])  # [1, end - start, D]
                    pieces.append(piece)
                    if record is not None:
                        record.after_segment(layer, start, end, T)
                first, last = row_calls[0][0], row_calls[-1][1]
                rows.append(F.pad(torch.cat(pieces, dim=1), (0, 0, first, T - last)))  # [1, T, D], zeros at the padding
                states.append(row_state)
                if record is not None:
                    record.end_row()
            return torch.cat(rows), layer.stack_row_states(states) if keep_states else None

        return self._run_layers(hidden, [None] * len(self.layers), conditioning, record, run_rows)


def _flat_runner(segments: list[list[tuple[int, int]]], shape: torch.Size, device: torch.device) -> Callable:
    """A ``run_layer`` for :meth:`ZooModel._run_layers` that runs a whole batch ``[B, T, D]`` as one row of documents:
    the tokens of every row's ``(start, end)`` segments side by side (``[1, L, D]``), one layer call with their
    :class:`~zoo.layers.base.Documents`, the outputs put back in place and zeros elsewhere (padding). No state."""
    B, T, D = shape
    index = torch.cat([torch.arange(b * T + s, b * T + e) for b, row in enumerate(segments) for s, e in row]).to(device)  # [L], one copy
    lengths = [e - s for row in segments for s, e in row]
    documents = Documents.from_bounds([0, *itertools.accumulate(lengths)], device)

    def run_flat(layer: ResidualLayer, hidden: torch.Tensor, state: Any, conditioning: None, shared: dict) -> tuple[torch.Tensor, None]:
        flat = hidden.reshape(B * T, D).index_select(0, index)[None]  # [1, L, D]
        out, _ = layer(flat, None, None, shared, documents)
        return hidden.new_zeros(B * T, D).index_copy(0, index, out[0]).view(B, T, D), None

    return run_flat


PACKING_INPUTS = ("position_ids", "cu_seq_lens_q")


def packing_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The packed-document inputs among a head's keyword arguments, for :meth:`ZooModel.forward`."""
    return {k: kwargs[k] for k in PACKING_INPUTS if kwargs.get(k) is not None}


def document_starts(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None, rows: list[tuple[int, int]],
                    seq_len: int, continuing: bool) -> list[list[int]] | None:
    """Where packed documents begin inside each row's tokens ``rows[b] = (start, end)``: the positions t with
    ``start < t < end`` at which ``position_ids`` restarts at 0 or ``cu_seq_lens_q`` puts a boundary; None when no row
    holds more than one document. Positions must count 0, 1, 2, ... from each document's first token (a call that
    continues a cache: on from the cache, without restarting)."""
    B, T = len(rows), seq_len
    inside = torch.zeros(B, T, dtype=torch.bool)  # [B, T]: a row's token after its first one
    for b, (start, end) in enumerate(rows):
        inside[b, start + 1 : end] = True
    boundaries = []
    if cu_seq_lens is not None:
        cu = cu_seq_lens.tolist() if cu_seq_lens.dim() == 1 else None
        if cu is None or B != 1 or not cu or cu[0] != 0 or cu[-1] != T or any(y < x for x, y in zip(cu, cu[1:])):
            raise ValueError(f"cu_seq_lens_q: expected the cumulative document lengths 0, ..., {T} of a [1, {T}] packed "
                             f"batch, got {cu if cu is not None else list(cu_seq_lens.shape)} for batch size {B}")
        at = torch.zeros(B, T, dtype=torch.bool)
        at[0, [c for c in cu[1:-1]]] = True
        boundaries.append(at & inside)
    if position_ids is not None:
        pos = position_ids[None] if position_ids.dim() == 1 else position_ids
        if list(pos.shape) not in ([B, T], [1, T]):
            raise ValueError(f"position_ids: expected shape [{B}, {T}] (or [1, {T}]), got {list(position_ids.shape)}")
        pos = pos.expand(B, T).cpu()
        restart = torch.zeros(B, T, dtype=torch.bool)
        restart[:, 1:] = pos[:, 1:] == 0
        step = torch.ones(B, T, dtype=torch.bool)
        step[:, 1:] = pos[:, 1:] == pos[:, :-1] + 1
        bad = inside & ~step & (~restart if not continuing else True)
        if bad.any():
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"position_ids: row {b} goes from {int(pos[b, t - 1])} to {int(pos[b, t])} at index {t}; expected "
                             + ("+1 (a call that continues a cache cannot begin a new document)" if continuing
                                else "+1 within a document or 0 where the next document begins"))
        first = [int(pos[b, start]) for b, (start, _) in enumerate(rows)]
        if not continuing and any(first):
            b = next(i for i, p in enumerate(first) if p)
            raise ValueError(f"position_ids: row {b} starts at position {first[b]}; zoo models count positions from 0 in each "
                             "sequence (packed documents: 0, 1, 2, ... restarting at 0 where each document begins)")
        boundaries.append(restart & inside)
    if len(boundaries) == 2 and not torch.equal(*boundaries):
        raise ValueError("position_ids and cu_seq_lens_q put the document boundaries in different places")
    starts = boundaries[0] if boundaries else inside & False
    if continuing and starts.any():
        raise ValueError("cu_seq_lens_q: a call that continues a cache cannot begin a new document")
    return [row.nonzero().flatten().tolist() for row in starts] if starts.any() else None


def _weights_block(mixer: nn.Module) -> nn.Module | None:
    """The block of a layer that can return its attention map (``record_weights``), also inside a wrapper (``inner``)."""
    while getattr(mixer, "inner", None) is not None:
        mixer = mixer.inner
    return mixer if hasattr(mixer, "record_weights") else None


class _Recorder:
    """What the layer loop keeps besides its output: every layer's input (``hidden_states``), the attention layers'
    probabilities (``attentions``; as a context, it asks the attention blocks for them) and, while ``cache`` records
    for a rollback, each layer's state before this call with a replay of it (for layers whose state cannot be cut)."""

    def __init__(self, layers: nn.ModuleList, hidden_states: bool, attentions: bool, cache: ZooCache | None = None):
        blocks = [_weights_block(layer.mixer) for layer in layers] if attentions else []
        self.attention_blocks = [block for block in blocks if block is not None]
        self.keep_hidden, self.keep_attentions, self.cache = hidden_states, attentions, cache
        self.hidden_states: list[torch.Tensor] = []
        self.attentions: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []  # the current layer's attention maps of a padded batch's rows
        self._segments: list[torch.Tensor] = []  # the current row's documents' maps

    def __enter__(self) -> "_Recorder":
        for block in self.attention_blocks:
            block.record_weights = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for block in self.attention_blocks:
            block.record_weights, block.attention_weights = False, None

    def keep_hidden_state(self, hidden: torch.Tensor) -> None:
        if self.keep_hidden:
            self.hidden_states.append(hidden)

    def before_layer(self, i: int, layer: ResidualLayer, hidden: torch.Tensor, state: Any,
                     conditioning: torch.Tensor | None, shared: dict[str, torch.Tensor]) -> None:
        self.keep_hidden_state(hidden)
        memory = self.cache.layers[i] if self.cache is not None else None
        if memory is not None and memory.record_past and not layer.state_can_roll_back:
            memory.remember(hidden.shape[1], replay_of(layer, hidden, state, conditioning, shared))

    def after_layer(self, layer: nn.Module) -> None:
        """Keep the layer's attention map; a padded batch's is its rows' maps stacked (``[B, H, T, T]``), a copy (no
        batch-wide map exists: each row attends alone), so gradients reach the rows' maps, not this one."""
        if self._rows:
            self.attentions.append(torch.cat(self._rows))
            self._rows = []
            return
        block = _weights_block(layer.mixer) if self.keep_attentions else None
        if block is not None:
            self.attentions.append(block.attention_weights)
            block.attention_weights = None

    def after_segment(self, layer: nn.Module, start: int, end: int, T: int) -> None:
        """A row (or one packed document of it) ran ``layer`` over positions ``[start, end)``: keep its attention map
        padded with zeros to the batch's ``T`` positions (``[1, H, T, T]``)."""
        block = _weights_block(layer.mixer) if self.keep_attentions else None
        if block is not None:
            self._segments.append(F.pad(block.attention_weights, (start, T - end, start, T - end)))
            block.attention_weights = None

    def end_row(self) -> None:
        """The row's map: its segments' maps, block-diagonal (each document attends to itself only)."""
        if self._segments:
            self._rows.append(sum(self._segments[1:], self._segments[0]))
            self._segments = []


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
        """The last forward's MoE router statistics (:func:`zoo.layers.moe.router_stats`), None for a model without
        MoE FFNs; with ``compute`` False they are dropped and the router fields left None."""
        if not compute:
            return {} if discard_router_stats(self.model.layers) else None
        return router_stats(self.model.layers)


class ZooForCausalLM(ZooWithLMHead, GenerationMixin):
    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.post_init()

    @classmethod
    def from_spec(cls, spec: ModelConfig, **special_tokens: Any) -> "ZooForCausalLM":
        """A new model of the validated ``spec`` (``model.vocab_size`` set); ``special_tokens``: ``pad_token_id``, ..."""
        return cls(ZooConfig.from_model_config(spec, **special_tokens))

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
        if implementation != "static" and implementation not in DYNAMIC_CACHE_NAMES:
            raise ValueError(f"cache_implementation={implementation!r}: zoo models keep their states in a ZooCache, 'static' or 'dynamic'")
        if generation_config.use_cache is not False:
            max_length = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
            model_kwargs[CACHE_FIELD] = ZooCache(len(self.model.layers), max_length if implementation == "static" else None)
        return None

    def forward(
        self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
        cache: ZooCache | None = None, inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
        use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, output_router_logits: bool | None = None,
        past_key_values: ZooCache | None = None, output_attentions: bool | None = None,
        output_hidden_states: bool | None = None, return_dict: bool | None = None,
        shift_labels: torch.LongTensor | None = None, num_items_in_batch: torch.Tensor | int | None = None, **kwargs: Any,
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
            output_hidden_states=output_hidden_states, return_dict=True, **packing_inputs(kwargs),
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
        self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None, output_router_logits: bool | None = None,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None, return_dict: bool | None = None,
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
            return_dict=True, **packing_inputs(kwargs),
        )
        fields = {"hidden_states": out.hidden_states, "attentions": out.attentions}
        logits = self.lm_head(out.last_hidden_state)
        loss = causal_lm_loss(logits, labels.to(logits.device)) if labels is not None else None
        output_classes = (MaskedLMOutput, ZooMoeMaskedLMOutput)
        return self._head_output(output_classes, loss, logits, fields, output_router_logits, return_dict)
