"""Scan kernels timed forward and forward + backward: every call of zoo's kernel registry, on the same inputs.

The calls are :data:`zoo.kernels.registry.CALLS`: zoo's Triton kernels, zoo's torch forms, and the peers' kernels
behind zoo's adapters, in one process.

``python -m benchmarks.kernels`` (CUDA GPU, bf16, 16k tokens per call: T = 1k / 4k / 16k with B = 16 / 4 / 1),
``--quick`` (the GPU check's sizes: T = 1k / 4k with B = 4 / 1, 3 timed calls) or ``--smoke`` (tiny fp32 shapes; on
CPU the Triton kernels run in the interpreter); ``--sizes 1024:4`` times other (T, batch) sizes, ``--dry-run`` prints
the plan (device, dtype, sizes, implementations, peers found) and times nothing; ``--model`` runs no kernel: it
writes ``kernels-roofline.{json,md}``, the paper roofline of :mod:`benchmarks.roofline`. Inputs are the arguments
zoo's layers pass; the backward starts from the output's gradient only, as in training. Times are medians after
warm-up (CUDA events on GPU). Peers (mamba_ssm, fla) are timed on CUDA when they import. Writes
``benchmarks/results/kernels-<gpu>.{json,md}`` (``kernels-smoke`` for --smoke).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU (--smoke) runs need the interpreter, chosen before triton loads

from benchmarks.common import RESULTS, is_oom, machine, slug, time_ms, write_report  # noqa: E402
from zoo.kernels.registry import CALLS, OPS, KernelCall, op_name  # noqa: E402

GPU_SIZES = [(1024, 16), (4096, 4), (16384, 1)]  # (T, batch): 16k tokens per call
QUICK_SIZES = [(1024, 4), (4096, 1)]
SMOKE_SIZES = [(12, 1)]
PEER_PACKAGES = ("flash-linear-attention", "mamba-ssm")

# op -> its calls that run over a sequence (the one-token decode step is benchmarks/decode.py's)
# (the packed-document calls are the compile check's: benchmarks/packing.py times packed documents)
BENCHES: dict[str, list[KernelCall]] = {op: [c for c in CALLS if c.op.name == op and not c.step and not c.documents] for op in OPS}


def measure(call: KernelCall, inputs: dict, device: torch.device, warmup: int, iters: int) -> dict:
    """Forward (no grad) and forward + backward (every leaf) median ms of one call."""
    run, leaves = call.prepare(inputs)
    grad = torch.randn_like(run()[0])

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(run()[0], grad)

    try:
        return {"fwd_ms": round(time_ms(forward, device, warmup, iters), 3),
                "fwd_bwd_ms": round(time_ms(forward_backward, device, warmup, iters), 3)}
    except Exception as err:  # noqa: BLE001 (out of memory only)
        if not is_oom(err):
            raise
        torch.cuda.empty_cache()
        return {"fwd_ms": None, "fwd_bwd_ms": None, "error": "out of memory"}


def implementations(op: str, device: torch.device) -> tuple[list[KernelCall], list[str]]:
    """The calls of ``op`` to time on ``device`` and the peers left out (not installed, or not on CUDA)."""
    runs = [c for c in BENCHES[op] if not c.peer or (device.type == "cuda" and c.available())]
    return runs, [c.backend for c in BENCHES[op] if c not in runs]


def run_bench(op: str, sizes, dims: dict, device, dtype, warmup: int, iters: int) -> dict:
    calls, missing = implementations(op, device)
    runs = []
    for T, batch in sizes:
        inputs = OPS[op].example(dims, batch, T, device, dtype)
        for call in calls:
            result = measure(call, inputs, device, warmup, iters)
            runs.append({"T": T, "batch": batch, "impl": call.backend, **result})
            print(f"{op} T={T} B={batch} {call.backend}: {result}", file=sys.stderr)
    # ratio other / the op's first Triton call at the same size: > 1 means that kernel is faster
    baseline = BENCHES[op][0].backend
    base = {(r["T"], r["batch"]): r for r in runs if r["impl"] == baseline}
    for r in runs:
        b = base.get((r["T"], r["batch"]))
        for key in ("fwd_ms", "fwd_bwd_ms"):
            ratio = r[key] / b[key] if b and r[key] and b[key] else None
            r[key.replace("_ms", "_ratio")] = None if ratio is None else round(ratio, 3)
    return {"shapes": dims, "baseline": baseline, "peers_missing": missing, "runs": runs}


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# Scan kernels ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']})",
        "",
        "Median ms per call of each backend (peers through zoo's adapters); ratio = time / the time of the op's first "
        "Triton backend at the same size (> 1: that kernel is faster).",
    ]
    for op, result in report["ops"].items():
        lines += [
            "",
            f"## {op}: {', '.join(f'{k} {v}' for k, v in result['shapes'].items())}; ratio vs {result['baseline']}",
            "",
            "| T | B | backend | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |",
            "|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in result["runs"]:
            lines.append(
                f"| {r['T']} | {r['batch']} | {r['impl']} | {r['fwd_ms']} | {r['fwd_ratio']} | "
                f"{r['fwd_bwd_ms']} | {r['fwd_bwd_ratio']} |" + (f" {r['error']}" if "error" in r else "")
            )
        if result["peers_missing"]:
            lines += ["", f"Not timed (not installed, or not on CUDA): {', '.join(result['peers_missing'])}."]
    return "\n".join(lines) + "\n"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1024:4,4096:1"`` -> ``[(1024, 4), (4096, 1)]`` (T:batch pairs)."""
    try:
        sizes = [tuple(int(n) for n in pair.split(":")) for pair in text.split(",") if pair]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected T:batch pairs like 1024:4,4096:1, got {text!r}")
    return sizes


def plan(ops: list[str], smoke: bool, device: torch.device, sizes, dtype, warmup: int, iters: int, path: Path) -> dict:
    """What a run with these arguments would time (``--dry-run``): nothing is computed or imported."""
    planned = {}
    for op in ops:
        calls, missing = implementations(op, device)
        planned[op] = {"shapes": OPS[op].smoke if smoke else OPS[op].bench,
                       "implementations": [c.backend for c in calls], "peers_missing": missing}
    return {
        "device": machine(device)["device"], "cuda": device.type == "cuda", "dtype": str(dtype).removeprefix("torch."),
        "sizes": [{"T": T, "batch": b} for T, b in sizes], "warmup": warmup, "iters": iters, "ops": planned,
        "would_write": [f"{path}.json", f"{path}.md"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="kernels", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (CPU: Triton interpreter)")
    mode.add_argument("--quick", action="store_true", help="the GPU check's run: T:batch 1024:4,4096:1, 3 timed calls")
    parser.add_argument("--ops", nargs="+", type=op_name, choices=sorted(BENCHES), default=sorted(BENCHES),
                        help="ops to run (old names too: rwkv7 is dplr_delta_rule)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--sizes", type=parse_sizes, help="T:batch pairs, e.g. 1024:4,4096:1 (default: 16k tokens per call)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON and time nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md results")
    parser.add_argument("--model", action="store_true", help="paper roofline (H100 HBM lower bounds, grids); runs no kernel")
    args = parser.parse_args(argv)
    if args.model:
        from benchmarks.roofline import model_markdown, model_report

        report = model_report(args.ops, args.sizes or GPU_SIZES)
        write_report(args.out / "kernels-roofline", report, model_markdown(report))
        return report
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke and not args.dry_run:
        parser.error("the benchmark shapes need a CUDA GPU; pass --smoke for a tiny run on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        sizes, dtype, warmup, iters, stem = SMOKE_SIZES, torch.float32, 1, args.iters or 1, "kernels-smoke"
    else:
        sizes, dtype, warmup = QUICK_SIZES if args.quick else GPU_SIZES, torch.bfloat16, 3
        iters, stem = args.iters or (3 if args.quick else 10), "kernels-" + slug(machine(device)["device"])
    sizes = args.sizes or sizes
    if args.dry_run:
        planned = plan(args.ops, args.smoke, device, sizes, dtype, warmup, iters, args.out / stem)
        print(json.dumps(planned, indent=2))
        return planned
    meta = {**machine(device, PEER_PACKAGES), "dtype": str(dtype).removeprefix("torch."),
            "tokens_per_call": [T * b for T, b in sizes]}
    report = {"meta": meta, "ops": {}}
    for op in args.ops:
        dims = OPS[op].smoke if args.smoke else OPS[op].bench
        report["ops"][op] = run_bench(op, sizes, dims, device, dtype, warmup, iters)
    write_report(args.out / stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
