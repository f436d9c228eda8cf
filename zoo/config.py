"""Typed recipe schema (model, data, optimizer, scheduler, trainer) and its loader.

Recipes are YAML files. ``base: other`` inherits from another recipe; ``key.path=value`` overrides apply last.
Every value is checked against the dataclasses below; an unknown key, a wrong type, an unknown block or a
broken constraint raises :class:`~zoo.errors.ConfigError` naming the full key path.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zoo.errors import ConfigError
from zoo.layers import FFNS, MIXERS

# ----------------------------------------------------------------------------------------------------------------
# Generic typed construction
# ----------------------------------------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(hint))}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it (ints widen to floats, lists are copied)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                    raise  # a mapping meant for this section: its own error names the key
                continue
        raise ConfigError(path, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(path, f"expected one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(hint)
        return {k: _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if hint is type(None):
        if value is not None:
            raise ConfigError(path, f"expected null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(path, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(path, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: Any, path: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, checking keys and types; errors carry ``path``."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(key, f"unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) if path else err


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a config dataclass tree (for YAML and JSON)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture. Besides the keys below, a key named after a block or FFN (``attention:``, ``lstm:``,
    ``swiglu:``) holds that module's settings, shared by every layer that uses it."""

    d_model: int = 256
    n_layers: int = 4
    blocks: list[str] = field(default_factory=lambda: ["attention"])  # pattern, tiled to n_layers
    ffn: str | list[str] = "swiglu"  # a name, or a pattern tiled to n_layers; "none" for no FFN
    vocab_size: int | None = None  # None: taken from the tokenizer
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    module_args: dict[str, Any] = field(default_factory=dict)  # block/FFN name -> its config dataclass

    def __post_init__(self) -> None:
        if self.d_model < 1:
            raise ConfigError("d_model", f"must be >= 1, got {self.d_model}")
        if self.n_layers < 1:
            raise ConfigError("n_layers", f"must be >= 1, got {self.n_layers}")
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
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError("vocab_size", f"must be >= 2, got {self.vocab_size}")
        if self.norm_eps <= 0:
            raise ConfigError("norm_eps", f"must be > 0, got {self.norm_eps}")
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
        plain = {f.name for f in dataclasses.fields(cls)} - {"module_args"}
        known_modules = set(MIXERS.names()) | set(FFNS.names())
        kwargs = {k: v for k, v in data.items() if k in plain}
        module_args = {}
        for key, value in data.items():
            if key in plain:
                continue
            if key not in known_modules:
                raise ConfigError(
                    f"{path}.{key}",
                    f"unknown key; allowed keys here: {', '.join(sorted(plain))}, "
                    f"or a block/ffn name: {', '.join(sorted(known_modules))}",
                )
            module_args[key] = value
        return build(cls, {**kwargs, "module_args": module_args}, path)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "module_args"}
        out.update({name: to_dict(args) for name, args in self.module_args.items()})
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


SYNTHETIC_SOURCES = ("mqar", "selective_copy", "induction")


@dataclass
class TaskConfig:
    """A synthetic task's settings (``data.task``, for ``data.source`` in :data:`SYNTHETIC_SOURCES`; see zoo.synthetic).

    ``vocab_size`` is the task's token vocabulary (the model's is 3 larger: the tokenizer's special tokens).
    """

    vocab_size: int = 64
    num_kv_pairs: int = 8  # mqar
    num_queries: int | None = None  # mqar; None: every key is queried
    power_a: float = 0.01  # mqar: query gaps drawn with weight ~ gap^(power_a - 1), as in Zoology
    num_tokens_to_copy: int = 16  # selective_copy
    train_samples: int = 20000
    val_samples: int = 1000

    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    def validate(self, source: str, seq_len: int) -> None:
        """Check the settings against the task and ``data.seq_len``; errors name ``task.KEY`` or ``seq_len``."""
        for key in ("vocab_size", "num_kv_pairs", "num_tokens_to_copy", "train_samples", "val_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.vocab_size < 4:
            raise ConfigError("task.vocab_size", f"must be >= 4 (blank, markers and data tokens), got {self.vocab_size}")
        if source == "mqar":
            if self.num_kv_pairs > self.vocab_size // 2 - 1:
                raise ConfigError("task.num_kv_pairs", f"{self.num_kv_pairs} distinct keys need vocab_size >= {2 * self.num_kv_pairs + 2}")
            if not 1 <= self.queries() <= self.num_kv_pairs:
                raise ConfigError("task.num_queries", f"must be in [1, num_kv_pairs={self.num_kv_pairs}], got {self.num_queries}")
            if (seq_len + 1 - 2 * self.num_kv_pairs) // 2 < self.queries():
                raise ConfigError("seq_len", f"mqar needs seq_len >= {2 * self.num_kv_pairs + 2 * self.queries() - 1} for {self.num_kv_pairs} pairs and {self.queries()} queries, got {seq_len}")
            if self.power_a <= 0:
                raise ConfigError("task.power_a", f"must be > 0, got {self.power_a}")
        elif source == "selective_copy" and seq_len < 2 * self.num_tokens_to_copy:
            raise ConfigError("seq_len", f"selective_copy needs seq_len >= 2 * num_tokens_to_copy = {2 * self.num_tokens_to_copy}, got {seq_len}")
        elif source == "induction" and seq_len < 3:
            raise ConfigError("seq_len", f"induction needs seq_len >= 3, got {seq_len}")


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | a local text file, directory or glob | hf:NAME[/CONFIG] | a synthetic task
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int = 4096  # bpe only
    seq_len: int = 256
    batch_size: int = 16
    val_fraction: float = 0.05
    val_batches: int = 20
    text_field: str = "text"  # column holding the text, for hub datasets
    num_workers: int = 0
    cache_dir: str | None = None  # tokenizers and token arrays; None: ~/.cache/zoo
    task: None | TaskConfig = None  # synthetic sources only; None there: the defaults

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError("seq_len", f"must be >= 1, got {self.seq_len}")
        if self.source in SYNTHETIC_SOURCES:
            self.task = self.task or TaskConfig()
            self.task.validate(self.source, self.seq_len)
            if self.val_batches * self.batch_size > self.task.val_samples:
                raise ConfigError("val_batches", f"val_batches * batch_size = {self.val_batches * self.batch_size} exceeds task.val_samples={self.task.val_samples}")
        elif self.task is not None:
            raise ConfigError("task", f"only synthetic sources ({', '.join(SYNTHETIC_SOURCES)}) take a task section; source is '{self.source}'")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.val_batches < 1:
            raise ConfigError("val_batches", f"must be >= 1, got {self.val_batches}")
        if self.tokenizer == "bpe" and self.vocab_size < 300:
            raise ConfigError("vocab_size", f"bpe needs vocab_size >= 300 (256 bytes + specials + merges), got {self.vocab_size}")


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: bool | None = None  # None: fused AdamW where the device supports it

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"expected two numbers in [0, 1), got {self.betas}")


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    val_every: int = 100  # optimizer steps between validations (and checkpoints)
    log_every: int = 10
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto: bf16-mixed on CUDA, 32-true elsewhere; or any Lightning precision string
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"  # e.g. ddp, fsdp
    accumulate_grad_batches: int = 1
    progress_bar: bool = True
    compile: bool = False
    nonfinite: Literal["raise", "skip"] = "raise"  # a NaN/Inf loss or grad norm: stop, or skip that update
    max_nonfinite_skips: int = 10  # with skip: this many skipped steps in a row stop the run

    def __post_init__(self) -> None:
        for key in ("max_steps", "val_every", "log_every", "accumulate_grad_batches", "max_nonfinite_skips"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0, got {self.grad_clip}")


NOISE_SCHEDULES = ("loglinear", "linear", "cosine")


@dataclass
class DiffusionSamplingConfig:
    """Sampler defaults of a masked-diffusion model (``zoo.diffusion.sample_text`` arguments override them)."""

    steps: int = 128  # denoising steps K per block
    length: int = 256  # new tokens to generate
    block_length: int | None = None  # semi-autoregressive block size; None: half the context
    context_length: int | None = None  # tokens the denoiser reads at once; None: data.seq_len
    unmasking: Literal["ancestral", "fixed_count"] = "ancestral"  # fixed_count: unmask exactly the expected number per step
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for key in ("steps", "length", "block_length", "context_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(key, f"must be >= 1, got {value}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")


@dataclass
class DiffusionConfig:
    """Masked (absorbing-state) diffusion, as in MDLM: ``alpha_t`` is the probability a token is still unmasked at
    time ``t``; the loss is the continuous-time NELBO. Used when the recipe's ``objective`` is ``diffusion``."""

    schedule: str = "loglinear"  # loglinear: alpha_t = 1 - (1 - eps) t | linear: alpha_t = eps^t | cosine
    eps: float = 1e-3  # alpha_1 = eps: the fraction of tokens left unmasked at t = 1
    t_min: float = 1e-3  # training times are drawn from [t_min, 1] (the loglinear weight 1/t is unbounded at 0)
    antithetic: bool = True  # low-discrepancy times: one uniform offset, evenly spaced across the batch
    time_conditioning: bool = False  # MDLM runs without it
    sampling: DiffusionSamplingConfig = field(default_factory=DiffusionSamplingConfig)

    def __post_init__(self) -> None:
        if self.schedule not in NOISE_SCHEDULES:
            raise ConfigError("schedule", f"unknown noise schedule '{self.schedule}'; choose one of {', '.join(NOISE_SCHEDULES)}")
        if not 0 < self.eps < 1:
            raise ConfigError("eps", f"must be in (0, 1), got {self.eps}")
        if not 0 <= self.t_min < 1:
            raise ConfigError("t_min", f"must be in [0, 1), got {self.t_min}")


@dataclass
class LoRAConfig:
    """LoRA adapters (PEFT) on a fine-tuned base. ``target_modules``: ``all-linear`` (every nn.Linear but the LM
    head: every block's projections) or module-name suffixes (``[q_proj, v_proj]``, ``[in_proj, out_proj]``).
    ``target_parameters``: names of bare parameters, e.g. MoE experts ``[ffn.w_gate, ffn.w_up, ffn.w_down]``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    target_parameters: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)  # module-name suffixes left out of target_modules

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError("r", f"must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
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
        if self.finetune is not None and self.objective != "causal":
            raise ConfigError("finetune", f"LoRA fine-tuning trains causal LMs; objective is {self.objective!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(data)
        model = ModelConfig.from_dict(data.pop("model", None) or {}, "model")
        return build(cls, {**data, "model": model})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def builtin_recipes_dir() -> Path:
    return Path(str(importlib.resources.files("zoo.recipes")))


def builtin_recipe_names() -> list[str]:
    return sorted(p.stem for p in builtin_recipes_dir().glob("*.yaml"))


def resolve_recipe_path(name: str, relative_to: Path | None = None) -> Path:
    """A recipe name (``transformer_small``) or a path to a YAML file."""
    candidates = []
    if name.endswith((".yaml", ".yml")) or "/" in name:
        candidates.append(Path(name))
        if relative_to is not None:
            candidates.insert(0, relative_to / name)
    else:
        if relative_to is not None:
            candidates.append(relative_to / f"{name}.yaml")
        candidates.append(builtin_recipes_dir() / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError("recipe", f"unknown recipe '{name}'; built-in recipes: {', '.join(builtin_recipe_names())}, or give a path to a .yaml file")


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.stem for p in (*seen, path))
        raise ConfigError("base", f"recipes inherit in a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("recipe", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", f"{path} must hold a mapping at its top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"in {path}: expected a recipe name, got {base!r}")
    parent = _load_tree(resolve_recipe_path(base, path.parent), (*seen, path))
    return _merge(parent, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in ``top`` replace those in ``base``."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "model.blocks=[lstm,attention]"]`` -> nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, "overrides take the form key.path=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError("overrides", f"cannot parse {overrides}: {err}") from None


def load_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load recipe ``name`` (built-in name or YAML path), apply its bases and ``key.path=value`` overrides."""
    path = resolve_recipe_path(name)
    tree = _load_tree(path)
    tree.setdefault("name", path.stem)
    tree = _merge(tree, parse_overrides(list(overrides)))
    return Recipe.from_dict(tree)
