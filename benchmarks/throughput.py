"""Training throughput of every block type at one size, with Hugging Face / fla peers where installed.

``python -m benchmarks.throughput`` (GPU: d_model 768, 12 layers ~ 125M parameters, bf16 autocast) or ``--smoke``
(tiny shapes, fp32, CPU). For each model: tokens/s and peak memory of forward + backward + AdamW step at each length
T, with a fixed number of tokens per step (batch = tokens_per_step // T), and for zoo models the activations kept
for the backward with and without activation checkpointing. Inference (prefill, decode) is ``benchmarks.decode``.

A size that runs out of memory is recorded as ``"oom"``; another failure as ``{"error": ...}``. Peers
(:func:`benchmarks.common.peer_models`) run when their packages import and are listed under ``skipped`` otherwise.
Writes ``benchmarks/results/throughput[_smoke].{json,md}`` and, with matplotlib installed, a PNG plot.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import RESULTS, Clock, cuda_peak_mb, guarded, machine, peer_models, write_report
from zoo.config import ModelConfig
from zoo.layers import MIXERS, ResidualLayer
from zoo.modeling import ZooForCausalLM, set_activation_checkpointing

VOCAB = 32000
INFERENCE_FLAGS = {"contexts": "--prompt", "batches": "--batches", "decode_tokens": "--new-tokens"}


@dataclass
class Shapes:
    d_model: int = 768
    n_layers: int = 12
    vocab_size: int = VOCAB
    train_lengths: list[int] = field(default_factory=lambda: [2048, 8192, 32768, 65536, 131072])
    tokens_per_step: int = 131072
    warmup: int = 2
    iters: int = 3
    dtype: str = "bfloat16"


SMOKE = Shapes(
    d_model=32, n_layers=1, vocab_size=128, train_lengths=[16, 32], tokens_per_step=64, warmup=0, iters=1, dtype="float32",
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


def autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def measure_training(model: torch.nn.Module, shapes: Shapes, T: int, device: torch.device, dtype: torch.dtype) -> dict:
    batch = max(1, shapes.tokens_per_step // T)
    ids = torch.randint(0, shapes.vocab_size, (batch, T + 1), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    clock = Clock(device)

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
        clock.mark()
        for _ in range(shapes.iters):
            step()
        clock.mark()
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    result = {"batch": batch, "tokens_per_s": round(batch * T * shapes.iters / (clock.intervals_ms()[0] / 1e3), 1),
              "peak_memory_mb": cuda_peak_mb(device)}
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


def benchmark_model(build: Callable[[], torch.nn.Module], shapes: Shapes, device: torch.device, log: Callable[[str], None]) -> dict:
    dtype = getattr(torch, shapes.dtype)
    model = guarded(lambda: build().to(device).train(), device)
    if not isinstance(model, torch.nn.Module):
        return {"error": model if isinstance(model, str) else model["error"]}
    entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "train": {}}
    for T in shapes.train_lengths:
        entry["train"][str(T)] = guarded(lambda: measure_training(model, shapes, T, device, dtype), device)
        log(f"  train T={T}: {entry['train'][str(T)]}")
    del model
    return entry


def run(shapes: Shapes, device: torch.device, include: set[str] | None, peers: bool, log: Callable[[str], None]) -> dict:
    torch.manual_seed(0)
    builders: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
        name: ("zoo", lambda cfg=cfg: ZooForCausalLM.from_spec(cfg)) for name, cfg in zoo_models(shapes).items()
    }
    skipped: dict[str, str] = {}
    if peers:
        peer_builders, skipped = peer_models(shapes.d_model, shapes.n_layers, shapes.vocab_size)
        builders.update({name: ("peer", build) for name, build in peer_builders.items()})
    models = {}
    for name, (kind, build) in builders.items():
        if include is not None and name not in include:
            continue
        log(f"{name} ({kind})")
        models[name] = {"kind": kind, **benchmark_model(build, shapes, device, log)}
    meta = {**machine(device, ("flash-linear-attention", "mamba-ssm")), "shapes": shapes.__dict__}
    return {"meta": meta, "models": models, "skipped": skipped}


def _fmt_train(cell: Any) -> str:
    if isinstance(cell, str):
        return cell
    if "error" in cell:
        return "error"
    mem = f", {cell['peak_memory_mb'] / 1024:.1f} GiB" if cell.get("peak_memory_mb") is not None else ""
    saved = cell.get("saved_activation_mib")
    kept = f"; activations {saved['none']:,.1f} -> {saved['all']:,.1f} MiB" if saved else ""
    return f"{cell['tokens_per_s']:,.0f}{mem}{kept}"


def markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["meta"]["shapes"]
    lines = [
        f"# Training throughput: {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
        f"fla {meta['flash-linear-attention']}, mamba_ssm {meta['mamba-ssm']}; {meta['date']}. d_model {shapes['d_model']}, "
        f"{shapes['n_layers']} layers (Mamba/Mamba-2: twice the layers, no FFN), vocabulary {shapes['vocab_size']}, "
        f"{shapes['dtype']}. Tokens/s (peak memory), {shapes['tokens_per_step']:,} tokens per step.",
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
    if report["skipped"]:
        lines += ["", "Skipped peers:", ""] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, stem: Path) -> Path | None:
    """Training tokens/s vs T, one line per model; nothing without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in report["models"].items():
        cells = [(T, entry.get("train", {}).get(str(T))) for T in report["meta"]["shapes"]["train_lengths"]]
        points = [(T, cell["tokens_per_s"]) for T, cell in cells if isinstance(cell, dict) and "tokens_per_s" in cell]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xscale="log", xlabel="sequence length T", ylabel="training tokens/s", title=report["meta"]["device"])
    ax.legend(fontsize=7)
    path = stem.with_name(stem.name + "_train.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32 (what the test runs)")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--n-layers", type=int)
    parser.add_argument("--train-lengths", type=_ints, help="comma-separated T values")
    parser.add_argument("--tokens-per-step", type=int)
    for flag, replacement in INFERENCE_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", help=f"moved: python -m benchmarks.decode {replacement}")
    parser.add_argument("--models", help="comma-separated model names to run (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="skip the Hugging Face / fla peers")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    for flag, replacement in INFERENCE_FLAGS.items():
        if getattr(args, flag) is not None:
            parser.error(f"--{flag.replace('_', '-')}: inference is timed by `python -m benchmarks.decode {replacement} ...` "
                         "(--peers for the Hugging Face / fla models)")
    shapes = Shapes(**SMOKE.__dict__) if args.smoke else Shapes()
    for key in ("d_model", "n_layers", "train_lengths", "tokens_per_step"):
        if getattr(args, key) is not None:
            setattr(shapes, key, getattr(args, key))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    include = set(args.models.split(",")) if args.models else None
    report = run(shapes, device, include, not args.no_peers, lambda line: print(line, flush=True))
    stem = args.out / ("throughput_smoke" if args.smoke else "throughput")
    write_report(stem, report, markdown(report))
    path = plot(report, stem)
    print(f"plot: {path}" if path else "plot skipped: matplotlib is not installed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
