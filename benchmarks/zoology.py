"""A Zoology-style MQAR table (Arora et al. 2023, Figure 2): blocks, pure and with a short convolution, at fixed
widths and key-value pair counts, best validation accuracy over learning rates, per seed.

``python -m benchmarks.zoology [--widths 64,128,256] [--pairs 4:64,8:128,16:256] [--variants ...] [--lrs 3e-3]
[--seeds 0] [--budget-min 55] [--out DIR]``. Every run is ``recipe=mqar_small`` (2 layers, SwiGLU FFN, 400 steps of
64 sequences from 100k distinct ones; keys and values distinct within a sequence) with every layer one block at
``d_model`` = the width (not parameter-matched: Zoology compares at equal model dimension), ``data.seq_len`` and
``data.task.num_kv_pairs`` from ``--pairs`` (pairs:seq_len). A variant ``NAME+convK`` puts a depthwise causal
convolution of kernel K before the block (``model.NAME.short_conv: K``); ``NAME`` alone has none. Cells run cheapest
first (by seq_len x width) until ``--budget-min`` of wall time is spent; the cells left are reported as not run.
Writes ``benchmarks/results/zoology-mqar.{json,md}`` with the machine, load average and versions.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, load_average, machine, write_report
from zoo.ablate import train_one, with_block
from zoo.config import ModelConfig
from zoo.recipe_loader import load_recipe

VARIANTS = ["attention+conv3", "attention", "conv", "mamba2", "rwkv7", "retnet", "mamba", "rwkv6", "lstm", "gated_deltanet", "kda"]


def parse_variant(text: str) -> tuple[str, int]:
    """``attention+conv3`` -> (``attention``, 3); ``mamba2`` -> (``mamba2``, 0)."""
    block, _, conv = text.partition("+conv")
    return block, int(conv) if conv else 0


def run_cell(variant: str, pairs: int, seq_len: int, width: int, lr: float, seed: int, work: Path) -> dict:
    block, kernel = parse_variant(variant)
    base = load_recipe("mqar_small", [
        f"seed={seed}", f"data.seq_len={seq_len}", f"data.task.num_kv_pairs={pairs}", "trainer.progress_bar=false",
    ])
    tree = with_block(base.model, block, width).to_dict()
    tree.setdefault(block, {})["short_conv"] = kernel  # replaces mqar_small's attention.short_conv: 3
    model_cfg = ModelConfig.from_dict(tree)
    run_dir = work / f"kv{pairs}-T{seq_len}-d{width}-{variant}-lr{lr:g}-s{seed}"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_one(base, model_cfg, run_dir, f"zoology-{variant}", lr)
    return {"val_acc": round(result["val_acc"], 4), "val_acc_floor": result["val_acc_floor"], "seconds": round(time.perf_counter() - started, 1)}


def markdown(report: dict) -> str:
    meta = report["meta"]
    columns = [(p, t, w) for p, t in meta["pairs"] for w in meta["widths"]]
    lines = [
        "# MQAR, Zoology-style: best validation accuracy over learning rates",
        "",
        f"Machine: {meta['device']}, {meta['cpus']} cores; load average at start {meta['load_start']}, at end {meta['load_end']}; torch "
        f"{meta['torch']}, lightning {meta['lightning']}; {meta['date']}. Command: `{meta['command']}`. Learning rates "
        f"{meta['lrs']}, seeds {meta['seeds']}; each cell: best over learning rates, then the seeds' accuracies. Every "
        f"run: 2 layers, 400 steps x 64 sequences. No-recall floor (most frequent context value): 1/pairs. Wall time "
        f"{meta['wall_min']} min of a {meta['budget_min']} min budget.",
        "",
        "| block | " + " | ".join(f"{p} pairs, T {t}, d {w}" for p, t, w in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for variant in meta["variants"]:
        cells = []
        for p, t, w in columns:
            seeds = []
            for seed in meta["seeds"]:
                runs = [report["runs"].get(f"{variant}|{p}|{t}|{w}|{lr:g}|{seed}") for lr in meta["lrs"]]
                done = [r for r in runs if r is not None and "val_acc" in r]
                if not done:
                    seeds.append("not run" if all(r is None for r in runs) else "error")
                else:
                    seeds.append(f"{max(r['val_acc'] for r in done):.3f}" + ("" if len(done) == len(runs) else "*"))
            cells.append(" / ".join(seeds))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "`*`: some learning rates of that cell did not run (budget). `not run`: over the wall-time budget."]
    return "\n".join(lines) + "\n"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoology", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,128,256")
    parser.add_argument("--pairs", default="4:64,8:128,16:256", help="kv_pairs:seq_len, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--budget-min", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="zoology-mqar")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    pairs = [tuple(int(x) for x in item.split(":")) for item in args.pairs.split(",")]
    variants, lrs, seeds = args.variants.split(","), _floats(args.lrs), [int(s) for s in args.seeds.split(",")]
    for variant in variants:
        parse_variant(variant)
    meta = {
        **machine(packages=("lightning",)), "load_start": load_average(),
        "command": "python -m benchmarks.zoology " + " ".join(argv if argv is not None else sys.argv[1:]),
        "widths": widths, "pairs": pairs, "variants": variants, "lrs": lrs, "seeds": seeds, "budget_min": args.budget_min,
    }
    report: dict = {"meta": meta, "runs": {}}
    cells = sorted(((p, t, w) for p, t in pairs for w in widths), key=lambda c: (c[1] * c[2], c[1]))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoology-") as work:
        for p, t, w in cells:
            for seed in seeds:
                for variant in variants:
                    for lr in lrs:
                        if time.perf_counter() - started > args.budget_min * 60:
                            continue
                        key = f"{variant}|{p}|{t}|{w}|{lr:g}|{seed}"
                        try:
                            report["runs"][key] = run_cell(variant, p, t, w, lr, seed, Path(work))
                        except Exception as err:  # noqa: BLE001 - one failing run must not stop the table
                            report["runs"][key] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
                        print(f"{key}: {report['runs'][key]}", file=sys.stderr, flush=True)
    meta["wall_min"] = round((time.perf_counter() - started) / 60, 1)
    meta["load_end"] = load_average()
    write_report(args.out / args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
