"""The recipe schema: typed dataclasses for model, data, optimizer, scheduler, trainer, diffusion and fine-tuning.

Built from mappings by :func:`zoo.typed.build` (unknown keys, wrong types, ``Literal`` enumerations and declared
bounds raise :class:`~zoo.errors.ConfigError` with the full key path); cross-field constraints live in each class's
``__post_init__``. Recipe files are read by :mod:`zoo.recipe_loader`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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

    def __post_init__(self) -> None:
        if self.source in GENERATORS:
            self.task = self.task or TaskConfig()
            self.task.validate(self.source, self.seq_len)
            if self.val_batches * self.batch_size > self.task.val_samples:
                raise ConfigError("val_batches", f"val_batches * batch_size = {self.val_batches * self.batch_size} exceeds task.val_samples={self.task.val_samples}")
        elif self.task is not None:
            raise ConfigError("task", f"only synthetic sources ({', '.join(GENERATORS)}) take a task section; source is '{self.source}'")
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
        """This recipe, validated again, with ``model.vocab_size`` from a tokenizer of ``n_tokens`` ids (set where the
        tokenizer is made, before anything is built); a vocab_size given in the recipe must hold them all."""
        if self.model.vocab_size is not None:
            if self.model.vocab_size < n_tokens:
                raise ConfigError("model.vocab_size", f"{self.model.vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
            return self
        return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=n_tokens))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(data)
        model = ModelConfig.from_dict(data.pop("model", None) or {}, "model")
        return build(cls, {**data, "model": model})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


