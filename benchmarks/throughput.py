"""Training and inference throughput of every block type at one size, with Hugging Face / fla peers where installed.

``python -m benchmarks.throughput`` (GPU: d_model 768, 12 layers ~ 125M parameters, bf16 autocast) or ``--smoke``
(tiny shapes, fp32, CPU). For each model:

- training: tokens/s and peak memory of forward + backward + AdamW step at each length T, with a fixed number of
  tokens per step (batch = tokens_per_step // T);
- inference, at each context length and batch size, timed inside ``generate`` (a logits processor marks every step):
  prefill time (start to first token) and decode tokens/s with per-token latency (median step after the first).

A size that runs out of memory is recorded as ``"oom"``; another failure as ``{"error": ...}``. Peers (HF Llama with
SDPA, HF Mamba / Mamba-2, fla RetNet / RWKV-6 / RWKV-7) run when their packages import and are listed under
``skipped`` with the reason otherwise. GPU timings use CUDA events after warm-up, CPU timings ``perf_counter``.
Writes ``benchmarks/results/throughput[_smoke].{json,md}`` and, with matplotlib installed, PNG plots.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.moe import device_name
from zoo.config import ModelConfig
from zoo.layers import MIXERS
from zoo.layers import ResidualLayer
from zoo.modeling import ZooConfig, ZooForCausalLM, set_activation_checkpointing

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 32000


@dataclass
class Shapes:
    d_model: int = 768
    n_layers: int = 12
    vocab_size: int = VOCAB
    train_lengths: list[int] = field(default_factory=lambda: [2048, 8192, 32768, 65536, 131072])
    tokens_per_step: int = 131072
    contexts: list[int] = field(default_factory=lambda: [1024, 8192, 32768, 131072])
    batches: list[int] = field(default_factory=lambda: [1, 16])
    decode_tokens: int = 32
    warmup: int = 2
    iters: int = 3
    dtype: str = "bfloat16"


SMOKE = Shapes(
    d_model=32, n_layers=1, vocab_size=128, train_lengths=[16, 32], tokens_per_step=64, contexts=[8],
    batches=[1, 2], decode_tokens=2, warmup=0, iters=1, dtype="float32",
)


def zoo_models(shapes: Shapes) -> dict[str, ModelConfig]:
    """Every block type at one width; Mamba / Mamba-2 take twice the layers and no FFN, as in their papers."""
    d, n = shapes.d_model, shapes.n_layers
    head = {"head_dim": 64} if d % 64 == 0 else {"head_dim": 16}
    heads = max(1, d // 64)
    specs = {
        "attention": {"blocks": ["attention"], "attention": {"n_heads": heads}},
        "moe": {"blocks": ["attention"], "ffn": "moe", "attention": {"n_heads": heads}, "moe": {"num_experts": 8, "top_k": 2}},
        "mamba": {"blocks": ["mamba"], "ffn": "none", "n_layers": 2 * n},
        "mamba2": {"blocks": ["mamba2"], "ffn": "none", "n_layers": 2 * n, "mamba2": head},
        "rwkv6": {"blocks": ["rwkv6"], "ffn": "rwkv_cmix", "rwkv6": head},
        "rwkv7": {"blocks": ["rwkv7"], "ffn": "rwkv_cmix", "rwkv7": head},
        "retnet": {"blocks": ["retnet"], "retnet": {"n_heads": heads}},
        "lstm": {"blocks": ["lstm"]},
        "hybrid mamba2+attention": {
            "blocks": ["mamba2", "mamba2", "mamba2", "attention"], "n_layers": 4 * max(1, n // 4),
            "mamba2": head, "attention": {"n_heads": heads},
        },
    }
    for name in MIXERS.names():  # a block added since: its defaults, so no block is left out
        specs.setdefault(name, {"blocks": [name]})
    return {
        name: ModelConfig.from_dict({"d_model": d, "n_layers": n, "vocab_size": shapes.vocab_size, **spec}, f"models.{name}")
        for name, spec in specs.items()
    }


def peer_models(shapes: Shapes) -> tuple[dict[str, Callable[[], torch.nn.Module]], dict[str, str]]:
    """Constructors of the peers that import here, and the reason each other peer is skipped."""
    d, n, v = shapes.d_model, shapes.n_layers, shapes.vocab_size
    heads = max(1, d // 64)
    builders: dict[str, Callable[[], torch.nn.Module]] = {}
    skipped: dict[str, str] = {}
    hidden = zoo_models(shapes)["attention"].args_for("swiglu").resolved_hidden_size(d)  # zoo's attention model's FFN
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    builders["hf llama (sdpa)"] = lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=v, hidden_size=d, intermediate_size=hidden, num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1 << 20, attn_implementation="sdpa",
    ))
    fast_mamba = importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available()
    note = "" if fast_mamba else " (torch path: mamba-ssm kernels not available)"
    builders[f"hf mamba{note}"] = lambda: MambaForCausalLM(MambaConfig(vocab_size=v, hidden_size=d, num_hidden_layers=2 * n))
    mamba2_heads = 2 * d // 64 if d % 32 == 0 else 2
    builders[f"hf mamba2{note}"] = lambda: Mamba2ForCausalLM(Mamba2Config(
        vocab_size=v, hidden_size=d, num_hidden_layers=2 * n, num_heads=mamba2_heads, head_dim=2 * d // mamba2_heads, n_groups=1,
    ))
    if importlib.util.find_spec("fla") is None:
        for name in ("fla retnet", "fla rwkv6", "fla rwkv7"):
            skipped[name] = "flash-linear-attention (fla) is not installed"
    else:
        try:
            from fla.models import RetNetConfig, RetNetForCausalLM, RWKV6Config, RWKV6ForCausalLM, RWKV7Config, RWKV7ForCausalLM

            common = {"vocab_size": v, "hidden_size": d, "num_hidden_layers": n}
            builders["fla retnet"] = lambda: RetNetForCausalLM(RetNetConfig(num_heads=heads, **common))
            builders["fla rwkv6"] = lambda: RWKV6ForCausalLM(RWKV6Config(**common))
            builders["fla rwkv7"] = lambda: RWKV7ForCausalLM(RWKV7Config(**common))
        except Exception as err:  # noqa: BLE001 - an fla version mismatch skips the peers, it does not stop the run
            for name in ("fla retnet", "fla rwkv6", "fla rwkv7"):
                skipped[name] = f"fla import failed: {type(err).__name__}: {err}"
    return builders, skipped


class Timer:
    """Milliseconds of a region: CUDA events on GPU (synchronized at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def region(self):
        result = {}
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield result
            end.record()
            end.synchronize()
            result["ms"] = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            yield result
            result["ms"] = (time.perf_counter() - t0) * 1e3


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def guarded(fn: Callable[[], dict], device: torch.device) -> dict | str:
    """``fn()``, ``"oom"`` when it runs out of memory, ``{"error": ...}`` on another failure."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one size failing must not stop the benchmark
        if is_oom(err):
            return "oom"
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def measure_training(model: torch.nn.Module, shapes: Shapes, T: int, device: torch.device, dtype: torch.dtype) -> dict:
    batch = max(1, shapes.tokens_per_step // T)
    ids = torch.randint(0, shapes.vocab_size, (batch, T + 1), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    timer = Timer(device)

    def step():
        with autocast(device, dtype):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(shapes.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with timer.region() as t:
            for _ in range(shapes.iters):
                step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    result = {"batch": batch, "tokens_per_s": round(batch * T * shapes.iters / (t["ms"] / 1e3), 1), "peak_memory_mb": peak_mb(device)}
    if any(isinstance(m, ResidualLayer) for m in model.modules()):
        result["saved_activation_mib"] = saved_activation_mib(model, ids, device, dtype)
    return result


def saved_activation_mib(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """MiB a training forward keeps for its backward, without (``none``) and with (``all``) activation checkpointing:
    every tensor autograd saves (counted once per storage) plus the layer inputs that checkpointing keeps. Counted,
    not timed, so it is the same on any device; the caching allocator's overhead and the backward's own temporaries
    are not in it (``peak_memory_mb`` on a GPU has them)."""
    result = {}
    for mode in ("none", "all"):
        set_activation_checkpointing(model, mode)
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        def keep_input(layer: ResidualLayer, args: tuple) -> None:
            if layer.gradient_checkpointing:
                keep(args[0])

        hooks = [m.register_forward_pre_hook(keep_input) for m in model.modules() if isinstance(m, ResidualLayer)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(device, dtype):
                logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # [B, T, V]
                keep(logits)  # the loss saves its (fp32) logits
        finally:
            for hook in hooks:
                hook.remove()
            set_activation_checkpointing(model, "none")
        del logits
        result[mode] = round(sum(storages.values()) / 2**20, 2)
    return result


class StepClock(LogitsProcessor):
    """Marks the time of every generation step (``generate`` calls it once per new token, after that step's forward):
    CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.mark()
        return scores

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks: [prefill (start -> first token), decode step, decode step, ...]."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def measure_inference(model: torch.nn.Module, shapes: Shapes, context: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Prefill: start of ``generate`` to its first token; decode: median time of the following steps."""
    ids = torch.randint(0, shapes.vocab_size, (batch, context), device=device)

    def generate(new_tokens: int) -> list[float]:
        clock = StepClock(device)
        with torch.inference_mode(), autocast(device, dtype):
            clock.mark()
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
            )
        return clock.intervals_ms()

    for _ in range(shapes.warmup):
        generate(2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [generate(1 + shapes.decode_tokens) for _ in range(shapes.iters)]
    prefill = min(r[0] for r in runs)
    steps = sorted(ms for r in runs for ms in r[1:])
    per_token = steps[len(steps) // 2]
    return {
        "prefill_ms": round(prefill, 3), "decode_ms_per_token": round(per_token, 4),
        "decode_tokens_per_s": round(batch * 1e3 / per_token, 1), "peak_memory_mb": peak_mb(device),
    }


def benchmark_model(build: Callable[[], torch.nn.Module], shapes: Shapes, device: torch.device, log: Callable[[str], None]) -> dict:
    dtype = getattr(torch, shapes.dtype)
    built = guarded(lambda: {"model": build().to(device)}, device)
    if not isinstance(built, dict) or "model" not in built:
        return {"error": built if isinstance(built, str) else built["error"]}
    model = built["model"]
    model.generation_config.eos_token_id = None
    entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "train": {}, "inference": {}}
    model.train()
    for T in shapes.train_lengths:
        entry["train"][str(T)] = guarded(lambda: measure_training(model, shapes, T, device, dtype), device)
        log(f"  train T={T}: {entry['train'][str(T)]}")
    model.eval()
    for context in shapes.contexts:
        for batch in shapes.batches:
            key = f"{context}x{batch}"
            entry["inference"][key] = guarded(lambda: measure_inference(model, shapes, context, batch, device, dtype), device)
            log(f"  inference context={context} batch={batch}: {entry['inference'][key]}")
    del model
    return entry


def version_of(distribution: str) -> str | None:
    """The installed version, read from the package metadata: importing a package (fla) can register models with
    transformers' Auto classes."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(shapes: Shapes, device: torch.device, include: set[str] | None, peers: bool, log: Callable[[str], None]) -> dict:
    torch.manual_seed(0)
    builders: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
        name: ("zoo", lambda cfg=cfg: ZooForCausalLM(ZooConfig.from_model_config(cfg))) for name, cfg in zoo_models(shapes).items()
    }
    skipped: dict[str, str] = {}
    if peers:
        peer_builders, skipped = peer_models(shapes)
        builders.update({name: ("peer", build) for name, build in peer_builders.items()})
    models = {}
    for name, (kind, build) in builders.items():
        if include is not None and name not in include:
            continue
        log(f"{name} ({kind})")
        models[name] = {"kind": kind, **benchmark_model(build, shapes, device, log)}
    return {
        "meta": {
            "device": device_name(device), "torch": torch.__version__, "triton": version_of("triton"),
            "transformers": transformers.__version__, "fla": version_of("flash-linear-attention"), "mamba_ssm": version_of("mamba-ssm"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": shapes.__dict__,
        },
        "models": models,
        "skipped": skipped,
    }


def _fmt_train(cell: Any) -> str:
    if isinstance(cell, str):
        return cell
    if "error" in cell:
        return "error"
    mem = f", {cell['peak_memory_mb'] / 1024:.1f} GiB" if cell.get("peak_memory_mb") is not None else ""
    saved = cell.get("saved_activation_mib")
    kept = f"; activations {saved['none']:,.1f} -> {saved['all']:,.1f} MiB" if saved else ""
    return f"{cell['tokens_per_s']:,.0f}{mem}{kept}"


def _fmt_inference(cell: Any) -> str:
    if isinstance(cell, str):
        return cell
    if "error" in cell:
        return "error"
    return f"{cell['prefill_ms']:.0f} ms / {cell['decode_tokens_per_s']:,.0f} tok/s ({cell['decode_ms_per_token']:.2f} ms)"


def markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["meta"]["shapes"]
    lines = [
        f"# Throughput: {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, fla {meta['fla']}, "
        f"mamba_ssm {meta['mamba_ssm']}; {meta['date']}. d_model {shapes['d_model']}, {shapes['n_layers']} layers "
        f"(Mamba/Mamba-2: twice the layers, no FFN), vocabulary {shapes['vocab_size']}, {shapes['dtype']}.",
        "",
        f"## Training: tokens/s (peak memory), {shapes['tokens_per_step']:,} tokens per step",
        "",
        "For zoo models, \"activations A -> B MiB\": what a training forward keeps for the backward without and with "
        "`trainer.activation_checkpointing: all` (tensors autograd saves, counted once per storage, plus the layer "
        "inputs checkpointing keeps).",
        "",
        "| model | parameters | " + " | ".join(f"T={T}" for T in shapes["train_lengths"]) + " |",
        "|---|---|" + "---|" * len(shapes["train_lengths"]),
    ]
    for name, entry in report["models"].items():
        if "error" in entry:
            lines.append(f"| {name} | error: {entry['error']} |")
            continue
        cells = [_fmt_train(entry["train"][str(T)]) for T in shapes["train_lengths"]]
        lines.append(f"| {name} | {entry['parameters'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Inference: prefill time / decode tokens/s (ms per decode step), {shapes['decode_tokens']} decoded tokens",
        "",
        "| model | batch | " + " | ".join(f"context {c}" for c in shapes["contexts"]) + " |",
        "|---|---|" + "---|" * len(shapes["contexts"]),
    ]
    for name, entry in report["models"].items():
        if "error" in entry:
            continue
        for batch in shapes["batches"]:
            cells = [_fmt_inference(entry["inference"][f"{c}x{batch}"]) for c in shapes["contexts"]]
            lines.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    if report["skipped"]:
        lines += ["", "Skipped peers:", ""] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, stem: Path) -> list[Path]:
    """tokens/s vs T and decode latency vs context (one line per model); nothing without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = report["meta"]["shapes"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in report["models"].items():
        points = [(T, entry["train"][str(T)]["tokens_per_s"]) for T in shapes["train_lengths"]
                  if isinstance(entry.get("train", {}).get(str(T)), dict) and "tokens_per_s" in entry["train"][str(T)]]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xscale="log", xlabel="sequence length T", ylabel="training tokens/s", title=report["meta"]["device"])
    ax.legend(fontsize=7)
    paths.append(stem.with_name(stem.name + "_train.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    for batch in shapes["batches"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, entry in report["models"].items():
            cells = [(c, entry.get("inference", {}).get(f"{c}x{batch}")) for c in shapes["contexts"]]
            points = [(c, cell["decode_ms_per_token"]) for c, cell in cells if isinstance(cell, dict) and "decode_ms_per_token" in cell]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="context", ylabel="ms per decoded token", title=f"decode latency, batch {batch}")
        ax.legend(fontsize=7)
        paths.append(stem.with_name(f"{stem.name}_decode_b{batch}.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32 (what the test runs)")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--n-layers", type=int)
    parser.add_argument("--train-lengths", type=_ints, help="comma-separated T values")
    parser.add_argument("--tokens-per-step", type=int)
    parser.add_argument("--contexts", type=_ints, help="comma-separated context lengths")
    parser.add_argument("--batches", type=_ints, help="comma-separated decode batch sizes")
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--models", help="comma-separated model names to run (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="skip the Hugging Face / fla peers")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    shapes = Shapes(**SMOKE.__dict__) if args.smoke else Shapes()
    for key in ("d_model", "n_layers", "train_lengths", "tokens_per_step", "contexts", "batches", "decode_tokens"):
        if getattr(args, key) is not None:
            setattr(shapes, key, getattr(args, key))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    include = set(args.models.split(",")) if args.models else None
    report = run(shapes, device, include, not args.no_peers, lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("throughput_smoke" if args.smoke else "throughput")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    plots = plot(report, stem)
    print(f"plots: {', '.join(map(str, plots))}" if plots else "plots skipped: matplotlib is not installed")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
