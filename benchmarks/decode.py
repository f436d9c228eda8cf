"""Decode speed of every ``_small`` recipe's model: Hugging Face ``generate`` vs zoo's static decoding vs CUDA graphs.

``python -m benchmarks.decode`` (CUDA: bf16 weights; CPU: fp32) or ``--smoke`` (the same recipes shrunk to d_model 64
and 4 layers, CPU); ``--dry-run`` prints the plan (recipes resolved, device, modes, shapes) and times nothing.
For each recipe's model (random weights; the speed does not depend on them) and each batch size:
a prompt of ``--prompt`` tokens is prefilled, then ``--new-tokens`` tokens are decoded greedily by

- ``generate``: ``model.generate`` over a growing :class:`~zoo.modeling.ZooCache` (per-token times marked inside it);
- ``static``: :class:`~zoo.decoding.StaticDecoder` steps (preallocated states, no host synchronization);
- ``cuda_graph``: the same steps replayed as one CUDA graph (CUDA only).

Decode tokens/s = batch / median step time. The three modes run in the same process, so their ratios compare.
Writes ``benchmarks/results/decode[_smoke]-<device>.{json,md}`` with the device, versions and shapes.

``--prompt-lookup DIR [DIR ...]``: trained zoo checkpoints (Hugging Face directories) continue code from the
built-in corpus's validation files, greedily and with prompt-lookup decoding (``prompt_lookup_num_tokens``), batch 1,
in the same process; tokens/s of each (median of ``--repeats``), their ratio, the mean tokens per model forward, and
whether both gave the same tokens. Writes ``benchmarks/results/prompt-lookup-<device>.{json,md}``.

``--vs-hf``: zoo against the Hugging Face implementation of the same model (Llama, Mixtral, Mamba, Mamba-2; random
weights, d_model 256, 4 layers, converted to zoo by :mod:`zoo.convert`), CPU fp32, greedy ``generate`` at each batch
size: the two alternate ``--repeats`` times in one process (the median of each run's median step time), so their
ratio holds under the machine's load (the load average is recorded). Writes ``benchmarks/results/decode-vs-hf-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from benchmarks.report import write_report
from benchmarks.moe import device_name
from benchmarks.throughput import StepClock, guarded, version_of
from zoo.decoding import StaticDecoder
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.recipe_loader import load_recipe

RECIPES = [
    "transformer_small", "moe_small", "mamba_small", "mamba2_small", "rwkv6_small", "rwkv7_small", "retnet_small",
    "lstm_small", "hybrid_small", "mamba_moe_small",
]
RESULTS = Path(__file__).parent / "results"
SMOKE_OVERRIDES = ["model.d_model=64", "model.n_layers=4"]  # 64: RWKV head size; 4: tiles every block pattern


def build_model(recipe: str, overrides: list[str], device: torch.device, dtype: torch.dtype) -> ZooForCausalLM:
    config = load_recipe(recipe, [*overrides, "model.vocab_size=259"]).model  # the byte tokenizer's vocabulary
    model = ZooForCausalLM(ZooConfig.from_model_config(config)).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def time_generate(model, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Milliseconds of each decode step inside ``model.generate`` (the prefill interval dropped)."""
    clock = StepClock(ids.device)
    with torch.inference_mode():
        clock.mark()
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=[clock],
        )
    return clock.intervals_ms()[1:]


def time_static(model, ids: torch.Tensor, new_tokens: int, cuda_graph: bool) -> list[float]:
    """Milliseconds of each :meth:`StaticDecoder.step` after the prefill (and the graph capture)."""
    decoder = StaticDecoder(model, ids.shape[1] + new_tokens, cuda_graph=cuda_graph)
    cuda = ids.device.type == "cuda"
    with torch.inference_mode():
        token = decoder.prefill(ids).argmax(-1)
        times = []
        for _ in range(new_tokens - 1):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                token = decoder.step(token).argmax(-1)
                end.record()
                times.append((start, end))
            else:
                t0 = time.perf_counter()
                token = decoder.step(token).argmax(-1)
                times.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in times]
    return times


def measure(model, batch: int, prompt: int, new_tokens: int, mode: str, warmup: int) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=model.device)
    run: Callable[[], list[float]] = {
        "generate": lambda: time_generate(model, ids, new_tokens),
        "static": lambda: time_static(model, ids, new_tokens, cuda_graph=False),
        "cuda_graph": lambda: time_static(model, ids, new_tokens, cuda_graph=True),
    }[mode]
    for _ in range(warmup):
        run()
    per_token = median(run())
    return {"ms_per_step": round(per_token, 4), "tokens_per_s": round(batch * 1e3 / per_token, 1)}


def run(recipes: list[str], batches: list[int], prompt: int, new_tokens: int, device: torch.device, smoke: bool,
        log: Callable[[str], None]) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = ["generate", "static"] + (["cuda_graph"] if device.type == "cuda" else [])
    results: dict[str, Any] = {}
    for recipe in recipes:
        torch.manual_seed(0)
        model = build_model(recipe, SMOKE_OVERRIDES if smoke else [], device, dtype)
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}
        for batch in batches:
            for mode in modes:
                cell = guarded(lambda: measure(model, batch, prompt, new_tokens, mode, warmup=0 if smoke else 1), device)
                entry[f"{mode}@{batch}"] = cell
                log(f"{recipe} batch={batch} {mode}: {cell}")
        results[recipe] = entry
        del model
    return {
        "meta": {
            "device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": version_of("triton"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": {"prompt": prompt, "new_tokens": new_tokens, "batches": batches, "smoke": smoke},
            "modes": modes,
        },
        "models": results,
    }


def plan(recipes: list[str], batches: list[int], prompt: int, new_tokens: int, device: torch.device, smoke: bool,
         out: Path) -> dict:
    """What :func:`run` would measure (``--dry-run``): every recipe's model config is resolved, no model is built."""
    configs = {recipe: load_recipe(recipe, [*(SMOKE_OVERRIDES if smoke else []), "model.vocab_size=259"]).model for recipe in recipes}
    return {
        "device": device_name(device), "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "modes": ["generate", "static"] + (["cuda_graph"] if device.type == "cuda" else []),
        "shapes": {"prompt": prompt, "new_tokens": new_tokens, "batches": batches, "smoke": smoke},
        "recipes": {name: {"blocks": list(cfg.blocks), "n_layers": cfg.n_layers, "d_model": cfg.d_model} for name, cfg in configs.items()},
        "out": str(out),
    }


def _cell(cell: Any) -> str:
    if isinstance(cell, dict) and "tokens_per_s" in cell:
        return f"{cell['tokens_per_s']:,.0f}"
    return cell if isinstance(cell, str) else f"error: {cell.get('error', cell)}"[:80]


def markdown(report: dict) -> str:
    meta = report["meta"]
    batches, modes = meta["shapes"]["batches"], meta["modes"]
    columns = [f"{mode} b{b}" for b in batches for mode in modes]
    lines = [
        f"Decode tokens/s, greedy, prompt {meta['shapes']['prompt']}, {meta['shapes']['new_tokens']} new tokens; "
        f"{meta['device']}, {meta['dtype']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}",
        "",
        "| recipe | params | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for recipe, entry in report["models"].items():
        cells = [_cell(entry[f"{mode}@{b}"]) for b in batches for mode in modes]
        lines.append(f"| {recipe} | {entry['parameters'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def code_prompts(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """``count`` prompts of ``length`` tokens: the openings of the built-in corpus's validation files (stdlib Python)."""
    from zoo.corpus import _in_validation, stdlib_files

    prompts = []
    for path in stdlib_files():
        if len(prompts) == count:
            break
        if not _in_validation(path.name, 0.05):
            continue
        ids = tokenizer(path.read_text(errors="replace"), return_tensors="pt").input_ids[:, :length]  # [1, <= length]
        if ids.shape[1] == length:
            prompts.append(ids)
    return prompts


def prompt_lookup(checkpoints: list[Path], prompts: int, prompt_len: int, new_tokens: int, draft: int, repeats: int,
                  log: Callable[[str], None]) -> dict:
    """Greedy vs prompt-lookup decoding of each checkpoint on CPU, batch 1, fp32 (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = {}
    for directory in checkpoints:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        forwards = [0]
        model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

        def generate(ids: torch.Tensor, **kw) -> tuple[torch.Tensor, float, int]:
            forwards[0] = 0
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
            return out, time.perf_counter() - start, forwards[0]

        greedy_s, lookup_s, same, lookup_forwards = [], [], True, 0
        for ids in code_prompts(tokenizer, prompts, prompt_len):
            runs = [(generate(ids), generate(ids, prompt_lookup_num_tokens=draft)) for _ in range(repeats)]
            greedy_s.append(median([g[1] for g, _ in runs]))
            lookup_s.append(median([p[1] for _, p in runs]))
            same &= all(torch.equal(g[0], p[0]) for g, p in runs)
            lookup_forwards += runs[0][1][2]
        n = len(greedy_s) * new_tokens
        entry = {
            "blocks": sorted(set(model.config.model_config().layer_blocks())),
            "greedy_tokens_per_s": round(n / sum(greedy_s), 1), "lookup_tokens_per_s": round(n / sum(lookup_s), 1),
            "ratio": round(sum(greedy_s) / sum(lookup_s), 3), "tokens_per_forward": round(n / lookup_forwards, 2), "same_tokens": same,
        }
        name = directory.parent.name if directory.name == "hf" else directory.name  # a run's export: the run's name
        log(f"{name}: {entry}")
        results[name] = entry
    return {
        "meta": {
            "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "dtype": "float32",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": {"prompts": prompts, "prompt": prompt_len, "new_tokens": new_tokens, "draft": draft, "repeats": repeats, "batch": 1},
        },
        "models": results,
    }


def prompt_lookup_markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["meta"]["shapes"]
    lines = [
        f"Prompt-lookup vs greedy decoding, code continuation from the built-in corpus: {shapes['prompts']} prompts of "
        f"{shapes['prompt']} tokens, {shapes['new_tokens']} new tokens, draft {shapes['draft']}, batch 1, median of "
        f"{shapes['repeats']}; {meta['device']} ({meta['threads']} threads), {meta['dtype']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['date']}",
        "",
        "| checkpoint | blocks | greedy tok/s | prompt lookup tok/s | ratio | tokens per forward | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in report["models"].items():
        lines.append(f"| {name} | {'+'.join(e['blocks'])} | {e['greedy_tokens_per_s']:,.1f} | {e['lookup_tokens_per_s']:,.1f} | "
                     f"{e['ratio']:.2f}x | {e['tokens_per_forward']:.2f} | {'yes' if e['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _hf_peers() -> dict[str, Callable[[], Any]]:
    """model_type -> a random Hugging Face model of that type at the ``--vs-hf`` shapes (each type has a converter)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM,
                              MixtralConfig, MixtralForCausalLM)

    attention = dict(vocab_size=259, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4)
    ssm = dict(vocab_size=259, hidden_size=256, num_hidden_layers=4, expand=2, conv_kernel=4)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**attention)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**{**attention, "intermediate_size": 512}, num_local_experts=8,
                                                            num_experts_per_tok=2)),
        "mamba": lambda: MambaForCausalLM(MambaConfig(**ssm, state_size=16)),
        "mamba2": lambda: Mamba2ForCausalLM(Mamba2Config(**ssm, state_size=64, num_heads=8, head_dim=64, n_groups=1,
                                                         chunk_size=64)),
    }


class CPUStepClock(StepClock):
    """:class:`StepClock` on CPU that also marks the process's CPU time (less sensitive to other processes' load)."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.cpu_marks: list[float] = []

    def mark(self) -> None:
        super().mark()
        self.cpu_marks.append(time.process_time())

    def cpu_intervals_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.cpu_marks, self.cpu_marks[1:])]


def generate_ids(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float], list[float]]:
    """Greedy ``generate`` on CPU: the tokens and the wall and CPU milliseconds of each decode step (the prefill
    interval dropped)."""
    clock = CPUStepClock()
    with torch.inference_mode():
        clock.mark()
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=[clock],
        )
    return out, clock.intervals_ms()[1:], clock.cpu_intervals_ms()[1:]


def vs_hf(model_types: list[str], batches: list[int], prompt: int, new_tokens: int, repeats: int,
          log: Callable[[str], None]) -> dict:
    """Decode tokens/s of each Hugging Face model and its zoo conversion, alternating in this process (CPU, fp32)."""
    from zoo.convert.__main__ import CONVERTERS

    peers = _hf_peers()
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    for model_type in model_types:
        torch.manual_seed(0)
        hf = peers[model_type]().eval()
        hf.generation_config.eos_token_id = None
        zoo_model = CONVERTERS[model_type][1](hf).eval()
        zoo_model.generation_config.eos_token_id = None
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in hf.parameters())}
        for batch in batches:
            ids = torch.randint(1, hf.config.vocab_size, (batch, prompt))
            for model in (hf, zoo_model):  # warm-up
                generate_ids(model, ids, min(new_tokens, 8))
            wall: dict[str, list[float]] = {"hf": [], "zoo": []}
            cpu: dict[str, list[float]] = {"hf": [], "zoo": []}
            outputs = {}
            same = True
            for _ in range(repeats):
                for name, model in (("hf", hf), ("zoo", zoo_model)):
                    outputs[name], ms, cpu_ms = generate_ids(model, ids, new_tokens)
                    wall[name].append(median(ms))
                    cpu[name].append(median(cpu_ms))
                same &= torch.equal(outputs["hf"], outputs["zoo"])
            hf_ms, zoo_ms = median(wall["hf"]), median(wall["zoo"])
            entry[f"batch{batch}"] = {
                "hf_tokens_per_s": round(batch * 1e3 / hf_ms, 1), "zoo_tokens_per_s": round(batch * 1e3 / zoo_ms, 1),
                "ratio": round(hf_ms / zoo_ms, 3), "cpu_ratio": round(median(cpu["hf"]) / median(cpu["zoo"]), 3),
                "hf_ms_runs": [round(t, 3) for t in wall["hf"]], "zoo_ms_runs": [round(t, 3) for t in wall["zoo"]],
                "hf_cpu_ms_runs": [round(t, 3) for t in cpu["hf"]], "zoo_cpu_ms_runs": [round(t, 3) for t in cpu["zoo"]],
                "same_tokens": same,
            }
            log(f"{model_type} batch={batch}: {entry[f'batch{batch}']}")
        results[model_type] = entry
        del hf, zoo_model
    return {
        "meta": {
            "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "dtype": "float32",
            "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": {"prompt": prompt, "new_tokens": new_tokens, "batches": batches, "repeats": repeats, "d_model": 256, "n_layers": 4},
        },
        "models": results,
    }


def vs_hf_markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["meta"]["shapes"]
    load = meta["load_average"]
    lines = [
        f"Decode tokens/s, zoo vs Hugging Face on the same weights (converted by zoo.convert), d_model {shapes['d_model']}, "
        f"{shapes['n_layers']} layers, greedy generate, prompt {shapes['prompt']}, {shapes['new_tokens']} new tokens, "
        f"median of {shapes['repeats']} alternating runs in one process; {meta['device']}, "
        f"1-min load average {load[0]} before, {load[3]} after; {meta['dtype']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['date']}. Ratio: zoo tokens/s over HF tokens/s, from the median wall "
        "time of a step and (CPU ratio) from the median CPU time of a step.",
        "",
        "| model | params | batch | Hugging Face tok/s | zoo tok/s | ratio | CPU ratio | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["models"].items():
        for batch in shapes["batches"]:
            e = entry[f"batch{batch}"]
            lines.append(f"| {name} | {entry['parameters'] / 1e6:.2f}M | {batch} | {e['hf_tokens_per_s']:,.0f} | "
                         f"{e['zoo_tokens_per_s']:,.0f} | {e['ratio']:.2f}x | {e['cpu_ratio']:.2f}x | {'yes' if e['same_tokens'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="recipes shrunk to d_model 64, 4 layers, on CPU")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every _small recipe)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dry-run", action="store_true", help="resolve the recipes, print the plan as JSON, time nothing")
    parser.add_argument("--prompt-lookup", type=Path, nargs="+", metavar="DIR", help="trained checkpoints: greedy vs prompt lookup")
    parser.add_argument("--draft", type=int, default=10, help="prompt_lookup_num_tokens (with --prompt-lookup)")
    parser.add_argument("--prompts", type=int, default=3, help="code prompts (with --prompt-lookup)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and mode (with --prompt-lookup or --vs-hf)")
    parser.add_argument("--vs-hf", action="store_true", help="zoo vs the Hugging Face model it was converted from (CPU)")
    parser.add_argument("--models", default="llama,mixtral,mamba,mamba2", help="model_types compared with --vs-hf")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_hf:
        model_types = [m for m in args.models.split(",") if m]
        unknown = sorted(set(model_types) - set(_hf_peers()))
        if unknown:
            parser.error(f"--models: no Hugging Face peer for {', '.join(unknown)}; choose from {', '.join(_hf_peers())}")
        batches = [int(b) for b in args.batches.split(",") if b]
        report = vs_hf(model_types, batches, args.prompt, args.new_tokens, args.repeats, lambda line: print(line, flush=True))
        slug = re.sub(r"[^a-z0-9]+", "-", report["meta"]["device"].lower()).strip("-")
        write_report(args.out / f"decode-vs-hf-{slug}", report, vs_hf_markdown(report))
        return 0
    if args.prompt_lookup:
        report = prompt_lookup(args.prompt_lookup, args.prompts, args.prompt, args.new_tokens, args.draft, args.repeats,
                               lambda line: print(line, flush=True))
        slug = re.sub(r"[^a-z0-9]+", "-", report["meta"]["device"].lower()).strip("-")
        write_report(args.out / f"prompt-lookup-{slug}", report, prompt_lookup_markdown(report))
        return 0
    recipes = args.recipes.split(",") if args.recipes else RECIPES
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.dry_run:
        print(json.dumps(plan(recipes, batches, args.prompt, args.new_tokens, device, args.smoke, args.out), indent=2))
        return 0
    report = run(recipes, batches, args.prompt, args.new_tokens, device, args.smoke, lambda line: print(line, flush=True))
    slug = re.sub(r"[^a-z0-9]+", "-", report["meta"]["device"].lower()).strip("-")
    write_report(args.out / f"decode{'_smoke' if args.smoke else ''}-{slug}", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
