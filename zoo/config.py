"""The recipe schema: typed dataclasses for model, data, optimizer, scheduler, trainer, diffusion and fine-tuning.

Built from mappings by :func:`zoo.typed.build` (unknown keys, wrong types, ``Literal`` enumerations and declared
bounds raise :class:`~zoo.errors.ConfigError` with the full key path); cross-field constraints live in each class's
``__post_init__``. Recipe files are read by :mod:`zoo.recipe_loader`.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import PreTrainedConfig

from zoo.compat import AmbiguousGlobalPerLayerAttributeError
from zoo.errors import ConfigError
from zoo.layers import FFNS, MIXERS, NORMS
from zoo.noise import ScheduleName
from zoo.synthetic import GENERATORS, TaskConfig
from zoo.typed import bounded, build, checked, to_dict


@dataclass
@checked
class ShortConvSetting:
    """``model.<block>.short_conv``: kernel of a depthwise causal convolution run before that block in every layer
    that uses it (:class:`zoo.layers.short_conv.ShortConv`)."""

    short_conv: int = bounded(0, ge=0, note="0: off")


@dataclass
@checked
class ModelConfig:
    """Architecture. Besides the keys below, a key named after a block or FFN (``attention:``, ``lstm:``,
    ``swiglu:``) holds that module's settings, shared by every layer that uses it. A block's section also takes
    ``short_conv: K`` (see :class:`ShortConvSetting`), kept in :attr:`short_conv`."""

    d_model: int = bounded(256, ge=1)
    n_layers: int = bounded(4, ge=1)
    blocks: list[str] = field(default_factory=lambda: ["attention"])  # pattern, tiled to n_layers
    ffn: str | list[str] = "swiglu"  # a name, or a pattern tiled to n_layers; "none" for no FFN
    vocab_size: int | None = bounded(None, ge=2)  # None: taken from the tokenizer
    norm_eps: float = bounded(1e-5, gt=0)
    norm: str = "rmsnorm"  # a name in zoo.layers.NORMS: the pre-norms, the final norm and embed_norm
    embed_norm: bool = False  # a norm right after the embedding (RWKV's ln0)
    tie_embeddings: bool = False
    init_std: float = bounded(0.02, ge=0)
    bidirectional: bool = False  # every layer sees the whole sequence (a denoiser): see SequenceMixer.bidirectional
    time_conditioning: bool = False  # adaLN-Zero conditioning of every layer on a diffusion time (DiT / MDLM)
    module_args: dict[str, Any] = field(default_factory=dict)  # block/FFN name -> its config dataclass
    short_conv: dict[str, int] = field(default_factory=dict)  # block name -> short conv kernel (0: none)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError("norm", f"unknown norm {self.norm!r}; norms: {', '.join(NORMS)}")
        for name, kernel in self.short_conv.items():
            if name not in MIXERS:
                raise ConfigError(f"{name}.short_conv", f"only blocks take a short convolution; blocks: {', '.join(MIXERS.names())}")
            build(ShortConvSetting, {"short_conv": kernel}, name)
        if not self.blocks:
            raise ConfigError("blocks", "must name at least one block")
        for i, name in enumerate(self.blocks):
            MIXERS.get(name, f"blocks[{i}]")
        ffns = self.ffn_pattern()
        for i, name in enumerate(ffns):
            if name != "none":
                FFNS.get(name, f"ffn[{i}]" if isinstance(self.ffn, list) else "ffn")
        for key, pattern in (("blocks", self.blocks), ("ffn", ffns)):
            if self.n_layers % len(pattern):
                raise ConfigError(key, f"pattern of length {len(pattern)} does not tile n_layers={self.n_layers}")
        used = [n for n in (*self.blocks, *ffns) if n != "none"]
        for name in dict.fromkeys([*self.module_args, *used]):
            entry = _module_entry(name, name)
            args = build(entry.config_cls, self.module_args.get(name), name)
            try:
                args.validate(self.d_model)
            except ConfigError as err:
                raise err.under(name) from None
            self.module_args[name] = args

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "model") -> "ModelConfig":
        """Build from the recipe form, where module settings sit beside the plain keys."""
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
        plain = {f.name for f in dataclasses.fields(cls)} - {"module_args", "short_conv"}
        known_modules = set(MIXERS.names()) | set(FFNS.names())
        kwargs = {k: v for k, v in data.items() if k in plain}
        module_args, short_conv = {}, {}
        for key, value in data.items():
            if key in plain:
                continue
            if key not in known_modules:
                raise ConfigError(
                    f"{path}.{key}",
                    f"unknown key; allowed keys here: {', '.join(sorted(plain))}, "
                    f"or a block/ffn name: {', '.join(sorted(known_modules))}",
                )
            if key in MIXERS and isinstance(value, dict) and "short_conv" in value:
                value = dict(value)
                short_conv[key] = build(ShortConvSetting, {"short_conv": value.pop("short_conv")}, f"{path}.{key}").short_conv
            module_args[key] = value
        return build(cls, {**kwargs, "module_args": module_args, "short_conv": short_conv}, path)

    def to_dict(self) -> dict[str, Any]:
        """The recipe form: ``short_conv`` back in its block's section."""
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("module_args", "short_conv")}
        out.update({name: to_dict(args) for name, args in self.module_args.items()})
        for name, kernel in self.short_conv.items():
            out.setdefault(name, {})["short_conv"] = kernel
        return out

    def ffn_pattern(self) -> list[str]:
        return [self.ffn] if isinstance(self.ffn, str) else list(self.ffn)

    def layer_blocks(self) -> list[str]:
        """Block name of every layer, the pattern tiled to n_layers."""
        return [self.blocks[i % len(self.blocks)] for i in range(self.n_layers)]

    def layer_ffns(self) -> list[str]:
        pattern = self.ffn_pattern()
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]

    def args_for(self, name: str) -> Any:
        """The settings of block/FFN ``name`` (the recipe's section, or that module's defaults)."""
        return self.module_args[name]


def _module_entry(name: str, path: str):
    if name in MIXERS:
        return MIXERS.get(name)
    return FFNS.get(name, path)


TOKENIZER_KINDS = "'byte', 'bpe', a tokenizer.json file, a Hugging Face tokenizer directory (with tokenizer.json or tokenizer_config.json) or a hub name"


def check_tokenizer_spec(spec: str) -> None:
    """``data.tokenizer`` other than byte/bpe: a file must parse as a ``tokenizer.json``, a directory must hold
    Hugging Face tokenizer files (a ``tokenizer.json`` there must parse), anything else must look like a hub name."""
    from tokenizers import Tokenizer
    from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE

    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in (FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)):
            raise ConfigError("tokenizer", f"the directory '{spec}' holds no tokenizer ({FULL_TOKENIZER_FILE} or {TOKENIZER_CONFIG_FILE}); expected {TOKENIZER_KINDS}")
        path = path / FULL_TOKENIZER_FILE
        if not path.is_file():
            return
    if path.is_file():
        try:
            Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for every kind of bad file
            raise ConfigError("tokenizer", f"'{path}' is not a valid {FULL_TOKENIZER_FILE} ({err}); expected {TOKENIZER_KINDS}") from None
        return
    if spec.endswith(".json"):
        raise ConfigError("tokenizer", f"no such tokenizer file: {spec!r}")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise ConfigError("tokenizer", f"{spec!r} is no existing file or directory; expected {TOKENIZER_KINDS}")


@dataclass
@checked
class DataConfig:
    source: str = "stdlib"  # stdlib | local text, parquet, jsonl or arrow file(s): a file, directory or glob | hf:NAME[/CONFIG] | a synthetic task
    tokenizer: str = "byte"  # byte | bpe | a tokenizer.json file | a local Hugging Face tokenizer directory | a hub name
    vocab_size: int = 4096  # bpe only
    num_proc: int = bounded(1, ge=1)  # processes tokenizing the corpus (datasets.map)
    seq_len: int = bounded(256, ge=1)
    batch_size: int = bounded(16, ge=1)
    val_fraction: float = bounded(0.05, gt=0, lt=1)
    val_batches: int = bounded(20, ge=1)
    text_field: str = "text"  # column holding the text, for hub datasets
    num_workers: int = bounded(0, ge=0)  # DataLoader worker processes; 0: load in the main process
    cache_dir: str | None = None  # tokenizers and token arrays; None: ~/.cache/zoo
    task: None | TaskConfig = None  # synthetic sources only; None there: the defaults
    packing: Literal["concat", "documents"] = "concat"  # documents: each window's documents run apart (zoo.training.document_positions)

    def __post_init__(self) -> None:
        if self.source in GENERATORS:
            self.task = self.task or TaskConfig()
            self.task.validate(self.source, self.seq_len)
            if self.val_batches * self.batch_size > self.task.val_samples:
                raise ConfigError("val_batches", f"val_batches * batch_size = {self.val_batches * self.batch_size} exceeds task.val_samples={self.task.val_samples}")
        elif self.task is not None:
            raise ConfigError("task", f"only synthetic sources ({', '.join(GENERATORS)}) take a task section; source is '{self.source}'")
        if self.packing == "documents" and self.source in GENERATORS:
            raise ConfigError("packing", f"documents packing splits windows at end-of-text tokens; the synthetic source '{self.source}' has none (use concat)")
        if self.tokenizer not in ("byte", "bpe"):
            check_tokenizer_spec(self.tokenizer)
        if self.cache_dir is not None and Path(self.cache_dir).expanduser().exists() and not Path(self.cache_dir).expanduser().is_dir():
            raise ConfigError("cache_dir", f"'{self.cache_dir}' is a file; expected a directory (made if missing) for tokenizers and token arrays")
        if self.tokenizer == "bpe" and self.vocab_size < 300:
            raise ConfigError("vocab_size", f"bpe needs vocab_size >= 300 (256 bytes + specials + merges), got {self.vocab_size}")


@dataclass
@checked
class OptimizerConfig:
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.1, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = bounded(1e-8, gt=0)
    fused: bool | None = None  # None: fused AdamW where the device supports it

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"expected two numbers in [0, 1), got {self.betas}")


@dataclass
@checked
class SchedulerConfig:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = bounded(100, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)


def lightning_precisions() -> tuple[str, ...]:
    """``auto`` and the precision strings Lightning's Trainer accepts (read from Lightning's own type)."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return ("auto", *get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS))


@dataclass
@checked
class TrainerConfig:
    max_steps: int = bounded(1000, ge=1)
    val_every: int = bounded(100, ge=1)  # optimizer steps between validations (and checkpoints)
    log_every: int = bounded(10, ge=1)
    grad_clip: float = bounded(1.0, ge=0)  # 0 disables clipping
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true elsewhere; or any Lightning precision string
    accelerator: str = "auto"
    devices: int | str = "auto"  # per machine
    num_nodes: int = bounded(1, ge=1)  # machines; Lightning runs devices x num_nodes processes (launch: torchrun or srun)
    strategy: str = "auto"  # e.g. ddp, fsdp
    accumulate_grad_batches: int = bounded(1, ge=1)
    progress_bar: bool = True
    compile: bool = False
    nonfinite: Literal["raise", "skip"] = "raise"  # a NaN/Inf loss or grad norm: stop, or skip that update
    max_nonfinite_skips: int = bounded(10, ge=1)  # with skip: this many skipped steps in a row stop the run
    logger: list[Literal["csv", "tensorboard", "wandb"]] = field(default_factory=list)  # Lightning loggers besides metrics.csv
    # Recompute layers in the backward instead of keeping their activations: none, all, or the layers of these blocks
    activation_checkpointing: Literal["none", "all"] | list[str] = "none"

    def __post_init__(self) -> None:
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        valid = lightning_precisions()
        if self.precision not in valid:
            raise ConfigError("precision", f"expected auto or one of Lightning's precisions {', '.join(valid[1:])}, got {self.precision!r}")
        accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
        if self.accelerator not in accelerators:
            raise ConfigError("accelerator", f"expected one of Lightning's accelerators {', '.join(accelerators)}, got {self.accelerator!r}")
        if isinstance(self.devices, int) and self.devices < 1 and self.devices != -1 or isinstance(self.devices, str) and not re.fullmatch(r"auto|-1|\d+(,\d+)*,?", self.devices):
            raise ConfigError("devices", f"expected auto, a count >= 1, -1 (all) or device indices such as '0,1', got {self.devices!r}")
        strategies = ("auto", *StrategyRegistry.available_strategies())
        if self.strategy not in strategies:
            raise ConfigError("strategy", f"expected one of Lightning's registered strategies {', '.join(strategies)}, got {self.strategy!r}")
        if isinstance(self.activation_checkpointing, list):
            for i, name in enumerate(self.activation_checkpointing):
                if name not in MIXERS:
                    raise ConfigError(f"activation_checkpointing[{i}]", f"unknown block {name!r}; blocks: {', '.join(MIXERS.names())}")


@dataclass
@checked
class DiffusionSamplingConfig:
    """Sampler defaults of a masked-diffusion model (``zoo.diffusion.sample_text`` arguments override them)."""

    steps: int = bounded(128, ge=1)  # denoising steps K per block
    length: int = bounded(256, ge=1)  # new tokens to generate
    block_length: int | None = bounded(None, ge=1)  # semi-autoregressive block size; None: half the context
    context_length: int | None = bounded(None, ge=1)  # tokens the denoiser reads at once; None: data.seq_len
    unmasking: Literal["ancestral", "fixed_count"] = "ancestral"  # fixed_count: unmask exactly the expected number per step
    temperature: float = bounded(1.0, gt=0)


@dataclass
@checked
class DiffusionConfig:
    """Masked (absorbing-state) diffusion, as in MDLM: ``alpha_t`` is the probability a token is still unmasked at
    time ``t``; the loss is the continuous-time NELBO. Used when the recipe's ``objective`` is ``diffusion``."""

    schedule: ScheduleName = "loglinear"  # see zoo.noise: loglinear (MDLM's), linear, cosine
    eps: float = bounded(1e-3, gt=0, lt=1)  # alpha_1 = eps: the fraction of tokens left unmasked at t = 1
    t_min: float = bounded(1e-3, ge=0, lt=1)  # training times are drawn from [t_min, 1] (the loglinear weight 1/t is unbounded at 0)
    antithetic: bool = True  # low-discrepancy times: one uniform offset, evenly spaced across the batch
    sampling: DiffusionSamplingConfig = field(default_factory=DiffusionSamplingConfig)


@dataclass
@checked
class LoRAConfig:
    """LoRA adapters (PEFT) on a fine-tuned base. ``target_modules``: ``all-linear`` (every nn.Linear but the LM
    head: every block's projections) or module-name suffixes (``[q_proj, v_proj]``, ``[in_proj, out_proj]``).
    ``target_parameters``: names of bare parameters, e.g. MoE experts ``[ffn.w_gate, ffn.w_up, ffn.w_down]``."""

    r: int = bounded(8, ge=1)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    target_parameters: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)  # module-name suffixes left out of target_modules

    def __post_init__(self) -> None:
        if self.target_parameters and self.dropout:
            raise ConfigError("dropout", "must be 0 with target_parameters (PEFT cannot apply dropout to a bare parameter)")
        if not self.target_modules and not self.target_parameters:
            raise ConfigError("target_modules", "targets nothing: name modules, or give target_parameters")


@dataclass
class FinetuneConfig:
    """Fine-tune a trained checkpoint with LoRA instead of training from scratch (see :mod:`zoo.finetune`).

    ``init_from``: a Hugging Face directory (``runs/x/hf``); it must exist when training starts, not when the recipe
    loads. The model section must describe the same architecture (it is checked against the checkpoint)."""

    init_from: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ConfigError("init_from", "must name the Hugging Face directory of the base model")


@dataclass
class Recipe:
    name: str = "recipe"
    output_dir: str | None = None  # None: checkpoints/<name>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    objective: Literal["causal", "diffusion"] = "causal"  # next-token LM, or masked diffusion (zoo.diffusion)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # used when objective is diffusion
    resume: str | None = None  # auto: newest loadable checkpoint in <output_dir>/ckpt (fresh start if none); or a .ckpt path
    finetune: FinetuneConfig | None = None  # LoRA on a trained checkpoint instead of training from scratch

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path("checkpoints") / self.name)
        if self.resume is not None and self.resume != "auto" and not Path(self.resume).is_file():
            raise ConfigError("resume", f"expected auto or the path of a checkpoint file, got {self.resume!r} (no such file)")
        attention = self.model.module_args.get("attention")
        if self.objective == "causal" and attention is not None and not attention.causal:
            raise ConfigError("model.attention.causal", "objective: causal needs causal attention (diffusion denoisers drop the mask themselves)")
        if self.trainer.compile and self.data.packing == "documents":
            raise ConfigError("data.packing", "documents packing reads each window's document boundaries on the host (data-dependent shapes), which trainer.compile (torch.compile) cannot trace; set trainer.compile: false or data.packing: concat")
        if self.objective == "diffusion" and not self.model.bidirectional:
            raise ConfigError("model.bidirectional", "objective: diffusion trains a denoiser that sees the whole sequence; set model.bidirectional: true")
        if self.model.time_conditioning and self.objective != "diffusion":
            raise ConfigError("model.time_conditioning", "conditions the layers on a diffusion time: it needs objective: diffusion")
        if self.objective == "causal" and self.model.bidirectional:
            raise ConfigError("model.bidirectional", "objective: causal needs causal layers; bidirectional models are diffusion denoisers")
        if self.finetune is not None and self.objective != "causal":
            raise ConfigError("finetune", f"LoRA fine-tuning trains causal LMs; objective is {self.objective!r}")
        for i, name in enumerate(self.trainer.activation_checkpointing if isinstance(self.trainer.activation_checkpointing, list) else []):
            if name not in self.model.blocks:
                raise ConfigError(f"trainer.activation_checkpointing[{i}]", f"block {name!r} is not in model.blocks {self.model.blocks}")

    def with_vocab_size(self, n_tokens: int) -> "Recipe":
        """This recipe with ``model.vocab_size`` from a tokenizer of ``n_tokens`` ids (set where the tokenizer is made,
        before anything is built); a vocab_size given in the recipe must hold them all. Only the new value is checked:
        the rest of the validated spec is kept."""
        if self.model.vocab_size is not None:
            if self.model.vocab_size < n_tokens:
                raise ConfigError("model.vocab_size", f"{self.model.vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
            return self
        if n_tokens < 2:
            raise ConfigError("model.vocab_size", f"must be >= 2, got {n_tokens} (the tokenizer's tokens)")
        model = copy.copy(self.model)
        model.vocab_size = n_tokens
        return dataclasses.replace(self, model=model)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(data)
        model = ModelConfig.from_dict(data.pop("model", None) or {}, "model")
        return build(cls, {**data, "model": model})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------------------------
# The spec's Hugging Face form: config.json
# ------------------------------------------------------------------------------------------------------------------

# ZooConfig field -> ModelConfig key, for the plain keys (the module sections are ``module_args``)
SPEC_FIELDS = {
    "d_model": "d_model", "n_layers": "n_layers", "blocks": "blocks", "ffn": "ffn", "vocab_size": "vocab_size",
    "norm_eps": "norm_eps", "norm": "norm", "embed_norm": "embed_norm", "init_std": "init_std",
    "tie_word_embeddings": "tie_embeddings", "bidirectional": "bidirectional", "time_conditioning": "time_conditioning",
}


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A zoo ``config.json``'s fields in today's form, for configs saved by older zoo versions: ``time_conditioning``
    moves out of ``diffusion`` (where checkpoints before it was a model field kept it), and a module section lacking
    a key gets its config class's ``SAVED_DEFAULTS`` value (what the config meant before the key existed) instead of
    the new default; sections of unknown modules are left for validation to name."""
    out = dict(saved)
    diffusion = out.get("diffusion")
    if isinstance(diffusion, dict) and "time_conditioning" in diffusion:
        diffusion = dict(diffusion)
        out["time_conditioning"] = bool(out.get("time_conditioning")) or bool(diffusion.pop("time_conditioning"))
        out["diffusion"] = diffusion
    module_args = {}
    for name, args in (out.get("module_args") or {}).items():
        registry = MIXERS if name in MIXERS else FFNS if name in FFNS else None
        saved_defaults = getattr(registry.get(name).config_cls, "SAVED_DEFAULTS", {}) if registry is not None else {}
        module_args[name] = {**saved_defaults, **args} if isinstance(args, dict) else args
    out["module_args"] = module_args
    return out


def _saved_fields(spec: ModelConfig) -> dict[str, Any]:
    """The :class:`ZooConfig` fields that save ``spec``."""
    plain = spec.to_dict()
    module_args = {name: plain.pop(name) for name in spec.module_args}
    return {**{field: plain[key] for field, key in SPEC_FIELDS.items()}, "module_args": module_args}


class ZooConfig(PreTrainedConfig):
    """Hugging Face face of :class:`ModelConfig` (``model_type = "zoo"``): the validated spec, kept as the object
    :meth:`model_config` returns (never saved), and its saved form, the fields below (``config.json``). A config
    built from a spec (:meth:`from_model_config`) keeps that spec; one loaded from a dict validates it once
    (after :func:`upgrade`); setting a field drops the kept spec, so the next read validates the new fields."""

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
    diffusion: dict | None = None  # masked-diffusion objective and sampler settings (DiffusionConfig)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, spec: ModelConfig | None = None, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if spec is None:
            fields = ("module_args", "diffusion", "time_conditioning")
            for key, value in upgrade({key: getattr(self, key) for key in fields}).items():
                setattr(self, key, value)
            spec = self.model_config()  # a bad value is a ConfigError naming its field (config.<key>) here
        self.set_model_config(spec)  # the saved fields in their complete form

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if self.attribute_map.get(name, name) in (*SPEC_FIELDS, "module_args"):
            self.__dict__.pop("_validated_spec", None)

    def to_dict(self) -> dict[str, Any]:
        """The saved form; fields edited in place (``config.module_args[...][...] = ...``) are validated here."""
        out = super().to_dict()
        spec = out.pop("_validated_spec", None)
        if spec is not None and any(out.get(key) != value for key, value in _saved_fields(spec).items()):
            self.__dict__.pop("_validated_spec")
            self.model_config()
        return out

    @classmethod
    def from_model_config(cls, model: ModelConfig, **kwargs: Any) -> "ZooConfig":
        """The config of the validated spec ``model`` (kept, not validated again); ``kwargs``: other fields (token ids)."""
        if model.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer) before building a model")
        return cls(**_saved_fields(model), spec=copy.deepcopy(model), **kwargs)

    def model_config(self) -> ModelConfig:
        """The validated zoo model spec this config describes: what :class:`~zoo.modeling.ZooModel` builds from."""
        spec = self.__dict__.get("_validated_spec")
        if spec is None:
            plain = {key: getattr(self, field) for field, key in SPEC_FIELDS.items()}
            plain["blocks"] = list(self.blocks or ["attention"])
            spec = self.__dict__["_validated_spec"] = ModelConfig.from_dict({**plain, **(self.module_args or {})}, "config")
        return spec

    def set_model_config(self, spec: ModelConfig) -> None:
        """Describe the validated ``spec`` from now on (its saved fields follow)."""
        for field, value in _saved_fields(spec).items():
            setattr(self, field, value)
        self.__dict__["_validated_spec"] = spec

    # transformers' standard attributes (``_DERIVED`` below), derived from the validated spec on every read, so they
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
        return [0 if ffn == "none" else spec.args_for(ffn).resolved_hidden_size(spec.d_model) for ffn in spec.layer_ffns()]

    def _attention_values(self) -> dict[str, Any]:
        """The attention layers' heads, KV heads, head size and RoPE base, as their block class gives them
        (``hf_attributes``): zero heads and None for a model without attention."""
        spec = self._spec()
        values = {}
        for block in sorted(set(spec.layer_blocks())):
            attributes = getattr(MIXERS.get(block).cls, "hf_attributes", None)
            if attributes is not None:
                values[block] = attributes(spec.args_for(block), spec.d_model)
        if not values:
            return {"num_attention_heads": 0, "num_key_value_heads": 0, "head_dim": None, "rope_theta": None}
        first = next(iter(values.values()))
        if any(v != first for v in values.values()):
            raise ValueError(f"ZooConfig: the attention blocks {sorted(values)} differ in heads or RoPE; transformers' attributes describe one kind")
        return first

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
        d.pop("_zoo_layer_idx", None)  # nothing per layer is saved: the spec (blocks, ffn, module sections) says it


def _derived(name: str, spec_key: str, read: Any, doc: str) -> property:
    """A standard attribute read from the spec; setting another value raises, naming the spec key to change."""

    def refuse_change(config: ZooConfig, value: Any) -> None:
        if value != read(config):
            raise ValueError(f"ZooConfig.{name} is derived from the model spec ({spec_key}); change that key instead of setting {name}={value!r}")

    return property(read, refuse_change, doc=doc)


_DERIVED = {
    "layer_types": ("blocks", lambda c: c._layer_values("layer_types"),
                    "Each layer's kind in transformers' names (``full_attention``, ``linear_attention`` for a recurrent "
                    "state, ``conv``, ``hybrid`` for attention behind a short convolution), tiled to ``n_layers``."),
    "num_attention_heads": ("attention.n_heads", lambda c: c._attention_values()["num_attention_heads"],
                            "Query heads of every attention layer; 0: the model has no attention."),
    "num_key_value_heads": ("attention.n_kv_heads", lambda c: c._attention_values()["num_key_value_heads"],
                            "Key/value heads of every attention layer (GQA); 0 without attention."),
    "head_dim": ("attention.head_dim", lambda c: c._attention_values()["head_dim"],
                 "Size of one attention head (``head_dim``, else ``d_model / n_heads``); None without attention."),
    "rope_theta": ("attention.rope_theta", lambda c: c._attention_values()["rope_theta"],
                   "RoPE base of the attention layers; None without attention."),
    "intermediate_size": ("the FFN section's hidden_size", lambda c: c._per_layer("intermediate_size"),
                          "Hidden size of the layers' FFN (an MoE's: each expert's; 0: no FFN); per layer when the FFN "
                          "pattern mixes sizes (``per_layer_config[i].intermediate_size``)."),
    "max_position_embeddings": ("none: zoo models have no position limit", lambda c: None,
                                "None: no block has a position limit (RoPE and recurrent states extend to any length)."),
}
for _name, (_key, _read, _doc) in _DERIVED.items():
    setattr(ZooConfig, _name, _derived(_name, _key, _read, _doc))


def _layer_type(spec: ModelConfig, block: str) -> str:
    """transformers' ``layer_types`` name of a layer of ``block``: its class's, ``hybrid`` for attention behind a
    short convolution (a KV cache and a convolution state)."""
    layer_type = MIXERS.get(block).cls.layer_type
    return "hybrid" if layer_type == "full_attention" and spec.short_conv.get(block, 0) else layer_type


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
