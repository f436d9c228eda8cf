"""Inference speed: prefill and decode of every text recipe's model, by ``generate``, static decoding and CUDA graphs.

``python -m benchmarks.decode`` (CUDA: bf16 weights; CPU: fp32) or ``--smoke`` (the recipes shrunk to d_model 64 and
4 layers, CPU); ``--dry-run`` prints the plan (recipes resolved, device, modes, shapes) and times nothing. The recipes
are the registry's causal text recipes (no fine-tune, no synthetic task). For each model (random weights; the speed
does not depend on them), prompt length and batch size, a prompt is prefilled and ``--new-tokens`` are decoded greedily:

- ``generate``: ``model.generate`` over a growing :class:`~zoo.modeling.ZooCache` (every step marked inside it);
- ``static``: :class:`~zoo.decoding.StaticDecoder` steps (preallocated states, no host synchronization);
- ``cuda_graph``: the same steps replayed as one CUDA graph (CUDA only).

Prefill: milliseconds to the first token; decode tokens/s = batch / median step time. ``--peers`` adds the Hugging Face
/ fla models of :func:`benchmarks.common.peer_models` (``generate`` only) at transformer_small's width. All modes run
in one process, so their ratios compare. Writes ``benchmarks/results/decode[_smoke]-<device>.{json,md}``.

``--prompt-lookup DIR [DIR ...]``: trained zoo checkpoints continue code from the built-in corpus's validation files,
greedily and with prompt-lookup decoding, batch 1, CPU: tokens/s of each (median of ``--repeats``), their ratio, the
mean tokens per forward and whether both gave the same tokens. Writes ``results/prompt-lookup-<device>.{json,md}``.

``--vs-hf``: zoo against the Hugging Face model it was converted from (zoo.convert; random weights, d_model 256, 4
layers), CPU fp32, greedy ``generate``: the two alternate ``--repeats`` times in one process (the median of each
run's median step, wall and CPU time) so their ratio holds under load. Writes ``results/decode-vs-hf-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LogitsProcessor

from benchmarks.common import (RESULTS, Clock, device_name, guarded, load_average, machine, median, peer_models, slug,
                               write_report)
from zoo.decoding import StaticDecoder
from zoo.modeling import ZooForCausalLM
from zoo.recipe_loader import builtin_recipe_names, load_recipe
from zoo.synthetic import GENERATORS

SMOKE_OVERRIDES = ["model.d_model=64", "model.n_layers=4"]  # 64: RWKV head size; 4: tiles every block pattern
VOCAB = ["model.vocab_size=259"]  # the byte tokenizer's vocabulary
VS_HF_SIZE = {"d_model": 256, "n_layers": 4}


def text_recipes() -> list[str]:
    """The registry's recipes whose model decodes text: causal objective, trained from scratch on a corpus."""
    recipes = {name: load_recipe(name) for name in builtin_recipe_names()}
    return [name for name, r in recipes.items()
            if r.objective == "causal" and r.finetune is None and r.data.source not in GENERATORS]


class StepClock(Clock, LogitsProcessor):
    """A :class:`Clock` that ``generate`` marks once per new token (after that step's forward)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.mark()
        return scores


def generate(model, ids: torch.Tensor, new_tokens: int, cpu_time: bool = False) -> tuple[torch.Tensor, StepClock]:
    """Greedy ``generate`` of exactly ``new_tokens``; the clock's intervals are [prefill, step, step, ...]."""
    clock = StepClock(ids.device, cpu_time=cpu_time)
    with torch.inference_mode():
        clock.mark()
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0, logits_processor=[clock],
        )
    return out, clock


def static_intervals(model, ids: torch.Tensor, new_tokens: int, cuda_graph: bool) -> list[float]:
    """Milliseconds of the prefill (with any graph capture), then of each :meth:`StaticDecoder.step`."""
    decoder = StaticDecoder(model, ids.shape[1] + new_tokens, cuda_graph=cuda_graph)
    clock = Clock(ids.device)
    with torch.inference_mode():
        clock.mark()
        token = decoder.prefill(ids).argmax(-1)
        clock.mark()
        for _ in range(new_tokens - 1):
            token = decoder.step(token).argmax(-1)
            clock.mark()
    return clock.intervals_ms()


def measure(model, batch: int, prompt: int, new_tokens: int, mode: str, warmup: int) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=model.device)
    run: Callable[[], list[float]] = {
        "generate": lambda: generate(model, ids, new_tokens)[1].intervals_ms(),
        "static": lambda: static_intervals(model, ids, new_tokens, cuda_graph=False),
        "cuda_graph": lambda: static_intervals(model, ids, new_tokens, cuda_graph=True),
    }[mode]
    for _ in range(warmup):
        run()
    prefill, *steps = run()
    per_token = median(steps)
    return {"prefill_ms": round(prefill, 3), "ms_per_step": round(per_token, 4), "tokens_per_s": round(batch * 1e3 / per_token, 1)}


def models(recipes: list[str], smoke: bool, peers: bool) -> tuple[dict[str, tuple[str, Callable[[], Any]]], dict[str, str]]:
    """name -> (kind, constructor) of every model to time; and the peers skipped, with why."""
    overrides = [*(SMOKE_OVERRIDES if smoke else []), *VOCAB]
    built = {r: ("zoo", lambda r=r: ZooForCausalLM.from_spec(load_recipe(r, overrides).model))
             for r in recipes}
    if not peers:
        return built, {}
    size = load_recipe("transformer_small", overrides).model
    peer_builders, skipped = peer_models(size.d_model, size.n_layers, size.vocab_size)
    return {**built, **{name: ("peer", build) for name, build in peer_builders.items()}}, skipped


def run(recipes: list[str], batches: list[int], prompts: list[int], new_tokens: int, device: torch.device, smoke: bool,
        peers: bool, log: Callable[[str], None]) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = ["generate", "static"] + (["cuda_graph"] if device.type == "cuda" else [])
    builders, skipped = models(recipes, smoke, peers)
    results: dict[str, Any] = {}
    for name, (kind, build) in builders.items():
        torch.manual_seed(0)
        built = guarded(lambda: build().to(device=device, dtype=dtype).eval(), device)
        if not isinstance(built, torch.nn.Module):
            results[name] = {"kind": kind, "error": built if isinstance(built, str) else built["error"]}
            continue
        built.generation_config.eos_token_id = None
        entry: dict[str, Any] = {"kind": kind, "parameters": sum(p.numel() for p in built.parameters())}
        for prompt in prompts:
            for batch in batches:
                for mode in modes if kind == "zoo" else ["generate"]:
                    cell = guarded(lambda: measure(built, batch, prompt, new_tokens, mode, warmup=0 if smoke else 1), device)
                    entry[f"{mode}@{batch}@{prompt}"] = cell
                    log(f"{name} prompt={prompt} batch={batch} {mode}: {cell}")
        results[name] = entry
        del built
    shapes = {"prompts": prompts, "new_tokens": new_tokens, "batches": batches, "smoke": smoke}
    meta = {**machine(device), "dtype": str(dtype).removeprefix("torch."), "shapes": shapes, "modes": modes}
    return {"meta": meta, "models": results, "skipped": skipped}


def plan(recipes: list[str], batches: list[int], prompts: list[int], new_tokens: int, device: torch.device, smoke: bool,
         out: Path) -> dict:
    """What :func:`run` would measure (``--dry-run``): every recipe's model config is resolved, no model is built."""
    overrides = [*(SMOKE_OVERRIDES if smoke else []), *VOCAB]
    configs = {recipe: load_recipe(recipe, overrides).model for recipe in recipes}
    return {
        "device": device_name(device), "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "modes": ["generate", "static"] + (["cuda_graph"] if device.type == "cuda" else []),
        "shapes": {"prompts": prompts, "new_tokens": new_tokens, "batches": batches, "smoke": smoke},
        "recipes": {name: {"blocks": list(cfg.blocks), "n_layers": cfg.n_layers, "d_model": cfg.d_model} for name, cfg in configs.items()},
        "out": str(out),
    }


def _cell(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, dict) and "tokens_per_s" in cell:
        return f"{cell['tokens_per_s']:,.0f} ({cell['prefill_ms']:,.1f} ms)"
    return cell if isinstance(cell, str) else f"error: {cell.get('error', cell)}"[:80]


def markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["meta"]["shapes"]
    columns = [(mode, b) for b in shapes["batches"] for mode in meta["modes"]]
    lines = [
        f"Decode tokens/s (prefill ms), greedy, {shapes['new_tokens']} new tokens; {meta['device']}, {meta['dtype']}, "
        f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}",
        "",
        "| model | params | prompt | " + " | ".join(f"{mode} b{b}" for mode, b in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for name, entry in report["models"].items():
        if "error" in entry:
            lines.append(f"| {name} | error: {entry['error']} |")
            continue
        for prompt in shapes["prompts"]:
            cells = [_cell(entry.get(f"{mode}@{b}@{prompt}")) for mode, b in columns]
            lines.append(f"| {name} | {entry['parameters'] / 1e6:.2f}M | {prompt} | " + " | ".join(cells) + " |")
    lines += [f"- skipped {name}: {why}" for name, why in report.get("skipped", {}).items()]
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

        def timed(ids: torch.Tensor, **kw) -> tuple[torch.Tensor, float, int]:
            forwards[0] = 0
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
            return out, time.perf_counter() - start, forwards[0]

        greedy_s, lookup_s, same, lookup_forwards = [], [], True, 0
        for ids in code_prompts(tokenizer, prompts, prompt_len):
            runs = [(timed(ids), timed(ids, prompt_lookup_num_tokens=draft)) for _ in range(repeats)]
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
    shapes = {"prompts": prompts, "prompt": prompt_len, "new_tokens": new_tokens, "draft": draft, "repeats": repeats, "batch": 1}
    return {"meta": {**machine(), "threads": torch.get_num_threads(), "dtype": "float32", "shapes": shapes}, "models": results}


def prompt_lookup_markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["meta"]["shapes"]
    lines = [
        f"Prompt-lookup vs greedy decoding, code continuation from the built-in corpus: {shapes['prompts']} prompts of "
        f"{shapes['prompt']} tokens, {shapes['new_tokens']} new tokens, draft {shapes['draft']}, batch 1, median of "
        f"{shapes['repeats']}; {meta['device']}, {meta['dtype']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['date']}",
        "",
        "| checkpoint | blocks | greedy tok/s | prompt lookup tok/s | ratio | tokens per forward | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in report["models"].items():
        lines.append(f"| {name} | {'+'.join(e['blocks'])} | {e['greedy_tokens_per_s']:,.1f} | {e['lookup_tokens_per_s']:,.1f} | "
                     f"{e['ratio']:.2f}x | {e['tokens_per_forward']:.2f} | {'yes' if e['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def hf_peers() -> dict[str, Callable[[], Any]]:
    """model_type -> a random peer at the ``--vs-hf`` size, for every peer that imports (each has a converter)."""
    builders, _ = peer_models(VS_HF_SIZE["d_model"], VS_HF_SIZE["n_layers"], 259, ssm_layers=VS_HF_SIZE["n_layers"])
    return {name.split(" ", 1)[1]: build for name, build in builders.items()}


def compare(hf, zoo_model, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    """One batch size of :func:`vs_hf`: the two models alternate ``repeats`` times after a short warm-up."""
    ids = torch.randint(1, hf.config.vocab_size, (batch, prompt))
    for model in (hf, zoo_model):
        generate(model, ids, min(new_tokens, 8))
    wall: dict[str, list[float]] = {"hf": [], "zoo": []}
    cpu: dict[str, list[float]] = {"hf": [], "zoo": []}
    same = True
    for _ in range(repeats):
        outputs = {}
        for name, model in (("hf", hf), ("zoo", zoo_model)):
            outputs[name], clock = generate(model, ids, new_tokens, cpu_time=True)
            wall[name].append(median(clock.intervals_ms()[1:]))
            cpu[name].append(median(clock.cpu_intervals_ms()[1:]))
        same &= torch.equal(outputs["hf"], outputs["zoo"])
    hf_ms, zoo_ms = median(wall["hf"]), median(wall["zoo"])
    return {
        "hf_tokens_per_s": round(batch * 1e3 / hf_ms, 1), "zoo_tokens_per_s": round(batch * 1e3 / zoo_ms, 1),
        "ratio": round(hf_ms / zoo_ms, 3), "cpu_ratio": round(median(cpu["hf"]) / median(cpu["zoo"]), 3),
        **{f"{who}_{kind}ms_runs": [round(t, 3) for t in runs[who]] for kind, runs in (("", wall), ("cpu_", cpu)) for who in ("hf", "zoo")},
        "same_tokens": same,
    }


def vs_hf(model_types: list[str], batches: list[int], prompt: int, new_tokens: int, repeats: int,
          log: Callable[[str], None]) -> dict:
    """Decode tokens/s of each Hugging Face model and its zoo conversion, alternating in this process (CPU, fp32)."""
    from zoo.convert.__main__ import CONVERTERS

    peers = hf_peers()
    load_before = load_average()
    results: dict[str, Any] = {}
    for model_type in model_types:
        torch.manual_seed(0)
        hf = peers[model_type]().eval()
        zoo_model = CONVERTERS[model_type][1](hf).eval()
        for model in (hf, zoo_model):
            model.generation_config.eos_token_id = None
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in hf.parameters())}
        for batch in batches:
            entry[f"batch{batch}"] = compare(hf, zoo_model, batch, prompt, new_tokens, repeats)
            log(f"{model_type} batch={batch}: {entry[f'batch{batch}']}")
        results[model_type] = entry
        del hf, zoo_model
    shapes = {"prompt": prompt, "new_tokens": new_tokens, "batches": batches, "repeats": repeats, **VS_HF_SIZE}
    meta = {**machine(), "threads": torch.get_num_threads(), "dtype": "float32", "shapes": shapes}
    meta["load_average"] = [*load_before, *meta["load_average"]]
    return {"meta": meta, "models": results}


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


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="recipes shrunk to d_model 64, 4 layers, on CPU")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every causal text recipe)")
    parser.add_argument("--batches", type=_ints, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--prompt", type=_ints, default=[128], help="prompt length(s), comma-separated")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--peers", action="store_true", help="also the Hugging Face / fla peers (generate only)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dry-run", action="store_true", help="resolve the recipes, print the plan as JSON, time nothing")
    parser.add_argument("--prompt-lookup", type=Path, nargs="+", metavar="DIR", help="trained checkpoints: greedy vs prompt lookup")
    parser.add_argument("--draft", type=int, default=10, help="prompt_lookup_num_tokens (with --prompt-lookup)")
    parser.add_argument("--prompts", type=int, default=3, help="code prompts (with --prompt-lookup)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and mode (with --prompt-lookup or --vs-hf)")
    parser.add_argument("--vs-hf", action="store_true", help="zoo vs the Hugging Face model it was converted from (CPU)")
    parser.add_argument("--models", default="llama,mixtral,qwen3_next,mamba,mamba2", help="model_types compared with --vs-hf")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if (args.vs_hf or args.prompt_lookup) and len(args.prompt) != 1:
        parser.error("--prompt: --vs-hf and --prompt-lookup take one prompt length")
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_hf:
        model_types = [m for m in args.models.split(",") if m]
        unknown = sorted(set(model_types) - set(hf_peers()))
        if unknown:
            parser.error(f"--models: no Hugging Face peer for {', '.join(unknown)}; choose from {', '.join(hf_peers())}")
        report = vs_hf(model_types, args.batches, args.prompt[0], args.new_tokens, args.repeats, log)
        write_report(args.out / f"decode-vs-hf-{slug(report['meta']['device'])}", report, vs_hf_markdown(report))
        return 0
    if args.prompt_lookup:
        report = prompt_lookup(args.prompt_lookup, args.prompts, args.prompt[0], args.new_tokens, args.draft, args.repeats, log)
        write_report(args.out / f"prompt-lookup-{slug(report['meta']['device'])}", report, prompt_lookup_markdown(report))
        return 0
    recipes = args.recipes.split(",") if args.recipes else text_recipes()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.dry_run:
        print(json.dumps(plan(recipes, args.batches, args.prompt, args.new_tokens, device, args.smoke, args.out), indent=2))
        return 0
    report = run(recipes, args.batches, args.prompt, args.new_tokens, device, args.smoke, args.peers, log)
    write_report(args.out / f"decode{'_smoke' if args.smoke else ''}-{slug(report['meta']['device'])}", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
