"""The one generic model for every block: a Hugging Face ``PreTrainedModel`` stacking zoo layers."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput, MoeCausalLMOutputWithPast,
)

from zoo.config import ModelConfig
from zoo.layers import FFNS, MIXERS, MoE, ResidualLayer, RMSNorm, map_state
from zoo.layers.attention import Attention, flash_attn_available
from zoo.layers.base import describe_backends
from zoo.layers.layer import AdaLNModulation

logger = logging.getLogger("zoo")

# transformers >= 5.24 names the decoding cache ``cache`` (forward argument and output field); 5.0-5.23 name it
# ``past_key_values``. zoo's forwards accept both and return the cache under the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache: "ZooCache | None", past_key_values: "ZooCache | None") -> "ZooCache | None":
    """The cache a forward was given, under either name (``past_key_values`` is the older name of ``cache``)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decoding cache once: `cache` and `past_key_values` (its older name) were both given")
    return cache if cache is not None else past_key_values


def output_cache(output: Any) -> "ZooCache | None":
    """The cache a zoo model's output holds, whatever the installed transformers calls the field."""
    return output.get(CACHE_FIELD)


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
    init_std: float = 0.02
    module_args: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bidirectional: bool = False  # every layer sees the whole sequence (a denoiser): see SequenceMixer.bidirectional
    mask_token_id: int | None = None
    diffusion: dict | None = None  # masked-diffusion settings (zoo.config.DiffusionConfig) of a ZooForMaskedLM
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_model_config(cls, model: ModelConfig, **kwargs: Any) -> "ZooConfig":
        plain = model.to_dict()
        module_args = {name: plain.pop(name) for name in model.module_args}
        if model.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer) before building a model")
        return cls(
            d_model=plain["d_model"], n_layers=plain["n_layers"], blocks=plain["blocks"], ffn=plain["ffn"],
            vocab_size=plain["vocab_size"], norm_eps=plain["norm_eps"], init_std=plain["init_std"],
            module_args=module_args, tie_word_embeddings=plain["tie_embeddings"], **kwargs,
        )

    def model_config(self) -> ModelConfig:
        """The validated zoo model config this HF config describes."""
        return ModelConfig.from_dict(
            {
                "d_model": self.d_model, "n_layers": self.n_layers, "blocks": list(self.blocks or ["attention"]),
                "ffn": self.ffn, "vocab_size": self.vocab_size, "norm_eps": self.norm_eps, "init_std": self.init_std,
                "tie_embeddings": self.tie_word_embeddings, **(self.module_args or {}),
            },
            "config",
        )


class ZooCache:
    """Per-layer block states for generation: KV caches, recurrent states, LSTM (h, c) alike.

    ``seen_tokens`` counts the tokens every layer has consumed, recurrent layers included, so transformers may slice
    the inputs of a continued ``generate`` by :meth:`get_seq_length` for every layer: ``is_linear`` (which tells
    transformers not to) is False for each layer. A cache whose states are all KV caches can roll back
    (:meth:`crop`, used by assisted decoding); a recurrent state cannot.
    """

    is_compileable = False

    def __init__(self, n_layers: int):
        self.states: list[Any] = [None] * n_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.states)

    @property
    def is_croppable(self) -> bool:
        return all(callable(getattr(state, "crop", None)) for state in self.states)

    def crop(self, length: int) -> None:
        """Drop the last ``-length`` tokens (``length <= 0``, transformers >= 5.24) or keep the first ``length``
        (``length > 0``, earlier transformers); only a cache of KV caches can roll back."""
        if not self.is_croppable:
            kinds = sorted({type(state).__name__ for state in self.states if not callable(getattr(state, "crop", None))})
            raise ValueError(f"ZooCache.crop: states of type {', '.join(kinds)} cannot roll back (recurrent state); only KV caches can")
        keep = self.seen_tokens + length if length <= 0 else min(length, self.seen_tokens)
        if keep < 0:
            raise ValueError(f"ZooCache.crop({length}): the cache holds only {self.seen_tokens} tokens")
        self.states = [state.crop(keep) for state in self.states]
        self.seen_tokens = keep

    def activate_past_recording(self) -> None:
        """Nothing to record: a KV cache keeps every token (so it can be cropped), a recurrent state cannot roll back."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search): every state tensor's batch dimension follows ``beam_idx``."""
        self.states = [map_state(s, lambda t: t.index_select(0, beam_idx.to(t.device))) for s in self.states]


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

    @property
    def _is_stateful(self) -> bool:
        """True when a layer keeps a state that cannot roll back (a recurrent block, a stateful FFN): transformers then
        refuses assisted and prompt-lookup decoding, which an attention-only model supports."""
        return not all(layer.state_can_roll_back for layer in self.base_model.layers)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # zoo layers keep their own states in a ZooCache, created by the model on the first call.
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """Hugging Face's loader; a truncated or corrupt ``*.safetensors`` file raises a CheckpointError naming it."""
        from safetensors import SafetensorError

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:
            from zoo.checkpoints.io import explain_safetensors_error

            raise explain_safetensors_error(pretrained_model_name_or_path, err) from None


class ZooModel(ZooPreTrainedModel):
    """Embedding -> layers (block pattern tiled to n_layers) -> final RMSNorm.

    With ``config.diffusion["time_conditioning"]`` every layer and the final norm are adaLN-Zero conditioned (DiT):
    ``forward`` then takes ``conditioning [B, D]`` (a diffusion-time embedding), see :class:`ResidualLayer`.
    """

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        spec = config.model_config()
        self.conditioned = bool((config.diffusion or {}).get("time_conditioning"))
        self.embed = nn.Embedding(config.vocab_size, spec.d_model)
        layers = []
        for i, (block, ffn) in enumerate(zip(spec.layer_blocks(), spec.layer_ffns())):
            mixer_cls = MIXERS.get(block).cls
            build_mixer = mixer_cls.bidirectional if config.bidirectional else mixer_cls
            mixer = build_mixer(spec.args_for(block), spec.d_model, i)
            ffn_module = None if ffn == "none" else FFNS.get(ffn).cls(spec.args_for(ffn), spec.d_model, i)
            layers.append(ResidualLayer(mixer, ffn_module, spec.d_model, spec.norm_eps, conditioned=self.conditioned))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
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
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``cache`` (or its older name ``past_key_values``): the :class:`ZooCache` to continue from and update.
        ``conditioning [B, D]``: required by a conditioned model (``config.diffusion.time_conditioning``), refused otherwise."""
        cache = resolve_cache(cache, past_key_values)
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
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = ZooCache(len(self.layers))
        n_pad = None
        if attention_mask is not None and not torch.compiler.is_compiling() and not bool(attention_mask.all()):
            n_pad = self._left_padding(attention_mask, inputs_embeds.shape[1], cache)
        if n_pad is None:
            hidden = self._run_layers(inputs_embeds, cache, conditioning)
        else:
            hidden = self._run_left_padded(inputs_embeds, n_pad, cache, conditioning)
        if cache is not None:
            cache.seen_tokens += hidden.shape[1]
        hidden = self.norm(hidden)
        if conditioning is not None:
            shift, scale = self.final_modulation(conditioning)  # each [B, 1, D]
            hidden = hidden * (1 + scale) + shift
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: cache if use_cache else None})

    def _check_conditioning(self, conditioning: torch.Tensor | None, batch_size: int) -> None:
        if not self.conditioned:
            if conditioning is not None:
                raise ValueError("conditioning: this model is not conditioned (config.diffusion.time_conditioning is off); pass None")
            return
        expected = [batch_size, self.config.d_model]
        if conditioning is None:
            raise ValueError(f"conditioning: this model is adaLN-conditioned (config.diffusion.time_conditioning); pass a tensor of shape {expected}")
        if list(conditioning.shape) != expected or not conditioning.is_floating_point():
            raise ValueError(f"conditioning: expected a floating-point tensor of shape {expected}, got {conditioning.dtype} {list(conditioning.shape)}")

    def _run_layers(self, hidden: torch.Tensor, cache: ZooCache | None, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            hidden, new_state = layer(hidden, cache.states[i] if cache is not None else None, conditioning)
            if cache is not None:
                cache.states[i] = new_state
        return hidden

    @staticmethod
    def _left_padding(attention_mask: torch.Tensor, seq_len: int, cache: ZooCache | None) -> list[int] | None:
        """Number of padding tokens before each row's first token; only left padding of a first call is allowed."""
        if attention_mask.dim() != 2 or attention_mask.shape[1] < seq_len:
            raise ValueError(f"attention_mask: expected shape [batch, >= {seq_len}], got {list(attention_mask.shape)}")
        mask = attention_mask[:, -seq_len:].bool()  # [B, T]: the positions of this call
        if cache is not None and cache.seen_tokens:
            if not bool(mask.all()):
                raise ValueError("attention_mask has padded positions after the first call; zoo models take left padding of the prompt only")
            return None
        after_token = mask.cummax(dim=1).values & ~mask  # a pad that follows a real token
        if bool(after_token.any()):
            row = int(after_token.any(dim=1).nonzero()[0])
            raise ValueError(
                f"attention_mask has padded positions after a token in row {row}; zoo models take left-padded batches only "
                "(tokenizer.padding_side = 'left')"
            )
        if not bool(mask.any(dim=1).all()):
            raise ValueError("attention_mask: a row has no tokens at all")
        return (~mask).sum(dim=1).tolist()

    def _run_left_padded(
        self, hidden: torch.Tensor, n_pad: list[int], cache: ZooCache | None, conditioning: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A left-padded batch without changing the block contract ``forward(x, state)``.

        Each row's real tokens (``hidden[b, n_pad[b]:]``) run alone from an empty state, so no block ever sees a
        padding token and every row starts at position 0 (RoPE included). The rows' outputs are left-padded with
        zeros back to ``[B, T, D]``; each layer merges the rows' states with ``stack_row_states``: constant-size
        recurrent states concatenate on the batch, attention left-pads its KV cache and keeps a per-row key mask, so
        later decode steps of the whole batch skip the padding slots and continue every row's own positions.
        Costs one prefill per row; decode steps then run batched as usual.
        """
        rows, row_caches = [], []
        for b, pad in enumerate(n_pad):
            row_cache = ZooCache(len(self.layers)) if cache is not None else None
            row_conditioning = conditioning[b : b + 1] if conditioning is not None else None  # [1, D]
            row = self._run_layers(hidden[b : b + 1, pad:], row_cache, row_conditioning)  # [1, T - pad, D]
            rows.append(F.pad(row, (0, 0, pad, 0)))  # [1, T, D], zeros at the padding
            row_caches.append(row_cache)
        if cache is not None:
            cache.states = [layer.stack_row_states([c.states[i] for c in row_caches]) for i, layer in enumerate(self.layers)]
        return torch.cat(rows)


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

    def _pop_router_losses(self) -> dict[str, Any] | None:
        """The last forward's MoE router statistics, taken off the MoE FFNs (so no graph stays alive on them), as
        ``router_loss``, ``aux_loss``, ``z_loss`` (per-layer losses averaged over the MoE layers), ``expert_load
        [n_moe_layers, E]`` and ``router_logits`` (per layer); ``None`` for a model without MoE FFNs."""
        # modules(), not layer.ffn: PEFT's target_parameters wraps an MoE FFN in ParamWrappers.
        popped = [module.pop_stats() for module in self.model.layers.modules() if isinstance(module, MoE)]
        stats = [s for s in popped if s is not None]
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

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any):
        """``generate`` starts from a fresh :class:`ZooCache` unless given one (transformers would make none for a
        model with its own cache type, and assisted decoding needs one before the first step)."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_FIELD] = ZooCache(len(self.model.layers))
        return result

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: ZooCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_router_logits: bool | None = None,
        past_key_values: ZooCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``labels`` are aligned with ``input_ids`` (shifted inside, as in HF); -100 is ignored. ``cache`` (or its
        older name ``past_key_values``) is the :class:`ZooCache` to continue from.

        Models with ``moe`` FFNs return a :class:`ZooMoeCausalLMOutputWithPast` whose ``loss`` includes the router
        losses; ``output_router_logits=True`` also returns each MoE layer's router logits.
        """
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds, use_cache=use_cache,
        )
        new_cache = {CACHE_FIELD: output_cache(out)}
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits[:, :-1], labels[:, 1:].to(logits.device))
        router = self._pop_router_losses()
        if router is None:
            return CausalLMOutputWithPast(loss=loss, logits=logits, **new_cache)
        if loss is not None:
            loss = loss + router["router_loss"].to(loss.device)
        if not output_router_logits:
            router["router_logits"] = None
        return ZooMoeCausalLMOutputWithPast(loss=loss, logits=logits, **new_cache, **router)


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

    Built with ``config.bidirectional = True`` whatever block the layers use. With ``diffusion.time_conditioning``
    the diffusion time ``timesteps [B]`` is embedded (:class:`TimestepEmbedding`) into ``c [B, D]``, which conditions
    every layer and the final norm by adaLN-Zero (DiT, as MDLM's time-conditioned DiT; see :class:`ResidualLayer`).
    The training objective and the sampler live in :mod:`zoo.diffusion`.
    """

    def __init__(self, config: ZooConfig):
        config.bidirectional = True
        super().__init__(config)
        self.time_embed = TimestepEmbedding(config.d_model) if (config.diffusion or {}).get("time_conditioning") else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """Logits ``[B, T, V]`` for every position; ``labels`` (-100 ignored) give the plain masked-LM cross-entropy.
        ``timesteps [B]`` is required when the model is time-conditioned and ignored otherwise. Models with ``moe``
        FFNs return a :class:`ZooMoeMaskedLMOutput` (router losses; ``loss`` includes them; router logits on request)."""
        conditioning = None
        if self.time_embed is not None:
            if timesteps is None:
                raise ValueError("this ZooForMaskedLM is time-conditioned (diffusion.time_conditioning): pass timesteps [batch]")
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            if timesteps.dim() != 1 or timesteps.shape[0] != batch_size:
                raise ValueError(f"timesteps: expected shape [{batch_size}] (one time per row), got {list(timesteps.shape)}")
            conditioning = self.time_embed(timesteps.to(self.lm_head.weight.device))  # [B, D]
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False,
            conditioning=conditioning,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = causal_lm_loss(logits, labels.to(logits.device)) if labels is not None else None
        router = self._pop_router_losses()
        if router is None:
            return MaskedLMOutput(loss=loss, logits=logits)
        if loss is not None:
            loss = loss + router["router_loss"].to(loss.device)
        if not output_router_logits:
            router["router_logits"] = None
        return ZooMoeMaskedLMOutput(loss=loss, logits=logits, **router)
