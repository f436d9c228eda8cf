"""Scan kernels, forward and forward + backward: zoo's Triton kernels vs zoo's chunked PyTorch forms vs peer kernels.

``python -m benchmarks.kernels`` (CUDA GPU, bf16, 16k tokens per call: T = 1k / 4k / 16k with B = 16 / 4 / 1) or
``--smoke`` (tiny fp32 shapes; on CPU the Triton kernels run in the interpreter); ``--sizes 1024:4`` times other
(T, batch) sizes, ``--dry-run`` prints the plan (device, dtype, sizes, implementations, peers found) and times nothing.
``--model`` runs nothing on a device: it prints and writes ``benchmarks/results/kernels-roofline.{json,md}``, a paper
roofline (lower bounds from bytes, FLOPs and grids, :mod:`benchmarks.roofline`) of zoo's Triton kernels on an H100.
Every implementation of an op gets
the same inputs in the same process; times are medians of CUDA-event timings after warm-up. Peers (mamba_ssm, fla)
are timed when they import. Writes ``benchmarks/results/kernels-<gpu>.{json,md}`` (``kernels-smoke`` for --smoke).

One entry of ``BENCHES`` per op: ``make_inputs`` builds leaf tensors in zoo's layout, each implementation is a
``prepare(inputs) -> (run, leaves)`` that converts the layout outside the timed region; ``run()`` returns the
outputs to back-propagate through and ``leaves`` are the tensors that receive gradients.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU (--smoke) runs need the interpreter, chosen before triton loads

import triton  # noqa: E402

from benchmarks.common import write_report
from zoo.kernels.selective_scan import selective_scan_chunked, selective_scan_triton  # noqa: E402
from zoo.kernels.ssd import ssd_scan, ssd_triton  # noqa: E402
from zoo.kernels.retention import retention, retention_chunked, retention_triton, retention_triton_chunk  # noqa: E402
from zoo.kernels.rwkv6 import rwkv6, rwkv6_chunked, rwkv6_triton, rwkv6_triton_chunk  # noqa: E402
from zoo.kernels.rwkv7 import rwkv7, rwkv7_chunked, rwkv7_triton, rwkv7_triton_chunk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SIZES = [(1024, 16), (4096, 4), (16384, 1)]  # (T, batch): 16k tokens per call
SMOKE_SIZES = [(12, 1)]

Prepared = tuple[Callable[[], tuple[torch.Tensor, ...]], list[torch.Tensor]]
Prepare = Callable[[dict], Prepared]


@dataclasses.dataclass
class KernelBench:
    """One op: its shapes, how to build inputs, zoo's implementations and the peers (loaders: None when missing)."""

    shapes: dict
    smoke_shapes: dict
    make_inputs: Callable[[int, int, dict, torch.device, torch.dtype], dict]
    zoo: dict[str, Prepare]
    peers: dict[str, Callable[[], Prepare | None]]


def _leaves(inputs: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}


# ---------------------------------------------------------------- Mamba-1 selective scan


def selective_scan_inputs(batch: int, T: int, shapes: dict, device, dtype) -> dict:
    d, n = shapes["d_inner"], shapes["d_state"]
    return {
        "u": torch.randn(batch, T, d, device=device, dtype=dtype),
        "delta": torch.randn(batch, T, d, device=device, dtype=dtype) * 0.5 - 2.0,
        "A": -torch.rand(d, n, device=device).add(0.5),
        "B": torch.randn(batch, T, n, device=device, dtype=dtype),
        "C": torch.randn(batch, T, n, device=device, dtype=dtype),
        "D": torch.ones(d, device=device),
        "z": torch.randn(batch, T, d, device=device, dtype=dtype),
        "delta_bias": torch.zeros(d, device=device),
    }


def _zoo_selective_scan(fn) -> Prepare:
    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves(inputs)
        return (lambda: fn(**leaves, delta_softplus=True)), list(leaves.values())

    return prepare


def _mamba_ssm_selective_scan() -> Prepare | None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None

    def prepare(inputs: dict) -> Prepared:
        channels_first = {k: inputs[k].transpose(1, 2).contiguous() for k in ("u", "delta", "B", "C", "z")}  # [B, D|N, T]
        leaves = _leaves({**inputs, **channels_first})
        run = lambda: selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True)  # noqa: E731
        return run, list(leaves.values())

    return prepare


SELECTIVE_SCAN = KernelBench(
    shapes={"d_inner": 2048, "d_state": 16},
    smoke_shapes={"d_inner": 8, "d_state": 4},
    make_inputs=selective_scan_inputs,
    zoo={"zoo triton": _zoo_selective_scan(selective_scan_triton), "zoo chunked torch": _zoo_selective_scan(selective_scan_chunked)},
    peers={"mamba_ssm selective_scan_fn": _mamba_ssm_selective_scan},
)


# ---------------------------------------------------------------- Mamba-2 SSD


def ssd_inputs(batch: int, T: int, shapes: dict, device, dtype) -> dict:
    h, p, g, n = shapes["heads"], shapes["head_dim"], shapes["groups"], shapes["d_state"]
    return {
        "x": torch.randn(batch, T, h, p, device=device, dtype=dtype),
        "dt": torch.randn(batch, T, h, device=device, dtype=dtype) * 0.5 - 2.0,
        "A": -torch.rand(h, device=device).add(0.5),
        "B": torch.randn(batch, T, g, n, device=device, dtype=dtype),
        "C": torch.randn(batch, T, g, n, device=device, dtype=dtype),
        "D": torch.ones(h, device=device),
        "dt_bias": torch.zeros(h, device=device),
    }


def _zoo_ssd(fn) -> Prepare:
    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves(inputs)
        return (lambda: fn(**leaves, dt_softplus=True, chunk_size=64)), list(leaves.values())

    return prepare


def _mamba_ssm_ssd() -> Prepare | None:
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None

    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves(inputs)
        run = lambda: mamba_chunk_scan_combined(  # noqa: E731
            **leaves, chunk_size=64, dt_softplus=True, return_final_states=True
        )
        return run, list(leaves.values())

    return prepare


SSD = KernelBench(
    shapes={"heads": 32, "head_dim": 64, "groups": 1, "d_state": 128},
    smoke_shapes={"heads": 2, "head_dim": 8, "groups": 1, "d_state": 4},
    make_inputs=ssd_inputs,
    zoo={"zoo triton": _zoo_ssd(ssd_triton), "zoo chunked torch": _zoo_ssd(ssd_scan)},
    peers={"mamba_ssm mamba_chunk_scan_combined": _mamba_ssm_ssd},
)


# ---------------------------------------------------------------- RWKV-6, RWKV-7, retention (matrix state [K, V] per head)


def rwkv6_inputs(batch: int, T: int, shapes: dict, device, dtype) -> dict:
    h, d = shapes["heads"], shapes["head_dim"]
    return {
        "r": torch.randn(batch, T, h, d, device=device, dtype=dtype),
        "k": torch.randn(batch, T, h, d, device=device, dtype=dtype) * d**-0.5,
        "v": torch.randn(batch, T, h, d, device=device, dtype=dtype),
        "w_log": -torch.exp(torch.randn(batch, T, h, d, device=device) - 1.0).to(dtype),  # log decay
        "u": torch.randn(h, d, device=device) * 0.5,
    }


def rwkv7_inputs(batch: int, T: int, shapes: dict, device, dtype) -> dict:
    h, d = shapes["heads"], shapes["head_dim"]
    kk = F.normalize(torch.randn(batch, T, h, d, device=device), dim=-1)
    return {
        "r": torch.randn(batch, T, h, d, device=device, dtype=dtype),
        "w_log": -torch.exp(torch.randn(batch, T, h, d, device=device) - 1.0).to(dtype),
        "k": torch.randn(batch, T, h, d, device=device, dtype=dtype) * d**-0.5,
        "v": torch.randn(batch, T, h, d, device=device, dtype=dtype),
        "a": (-kk).to(dtype),
        "b": (kk * torch.rand(batch, T, h, d, device=device)).to(dtype),
    }


def retention_inputs(batch: int, T: int, shapes: dict, device, dtype) -> dict:
    h, d = shapes["heads"], shapes["head_dim"]
    return {
        "q": torch.randn(batch, T, h, d, device=device, dtype=dtype) * d**-0.5,
        "k": torch.randn(batch, T, h, d, device=device, dtype=dtype) * d**-0.5,
        "v": torch.randn(batch, T, h, d, device=device, dtype=dtype),
        "log_decay": torch.log1p(-torch.exp2(-5.0 - torch.arange(h, device=device, dtype=torch.float32))),  # RetNet's
    }


def _zoo_call(fn, **options) -> Prepare:
    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves(inputs)
        return (lambda: fn(**leaves, **options)), list(leaves.values())

    return prepare


def _fla_rwkv6() -> Prepare | None:
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError:
        return None

    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves(inputs)
        run = lambda: chunk_rwkv6(  # noqa: E731
            r=leaves["r"], k=leaves["k"], v=leaves["v"], w=leaves["w_log"], u=leaves["u"], scale=1.0, output_final_state=True
        )
        return run, list(leaves.values())

    return prepare


def _fla_rwkv7() -> Prepare | None:
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError:
        return None

    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves(inputs)
        run = lambda: chunk_rwkv7(  # noqa: E731
            r=leaves["r"], w=leaves["w_log"], k=leaves["k"], v=leaves["v"], a=leaves["a"], b=leaves["b"],
            scale=1.0, output_final_state=True,
        )
        return run, list(leaves.values())

    return prepare


def _fla_retention() -> Prepare | None:
    try:
        from fla.ops.retention import chunk_retention
    except ImportError:
        return None

    def prepare(inputs: dict) -> Prepared:
        leaves = _leaves({k: inputs[k] for k in ("q", "k", "v")})  # fla fixes RetNet's decays itself
        run = lambda: chunk_retention(**leaves, scale=1.0, output_final_state=True)  # noqa: E731
        return run, list(leaves.values())

    return prepare


def _zoo_fla(fn, constant: tuple[str, ...] = ()) -> Callable[[], Prepare | None]:
    """zoo's op with ``backend="fla"`` (fla's kernels behind zoo's adapter), when fla imports; ``constant`` inputs get
    no gradient (retention's fixed decays)."""

    def load() -> Prepare | None:
        if importlib.util.find_spec("fla") is None:
            return None

        def prepare(inputs: dict) -> Prepared:
            leaves = _leaves({k: v for k, v in inputs.items() if k not in constant})
            run = lambda: fn(**leaves, **{k: inputs[k] for k in constant}, backend="fla")  # noqa: E731
            return run, list(leaves.values())

        return prepare

    return load


HEADS_64 = {"heads": 16, "head_dim": 64}
HEADS_SMOKE = {"heads": 2, "head_dim": 8}
RWKV6 = KernelBench(
    shapes=HEADS_64,
    smoke_shapes=HEADS_SMOKE,
    make_inputs=rwkv6_inputs,
    zoo={"zoo triton": _zoo_call(rwkv6_triton), "zoo triton chunk-parallel": _zoo_call(rwkv6_triton_chunk),
         "zoo chunked torch": _zoo_call(rwkv6_chunked)},
    peers={"fla chunk_rwkv6": _fla_rwkv6, "zoo backend=fla": _zoo_fla(rwkv6)},
)
RWKV7 = KernelBench(
    shapes=HEADS_64,
    smoke_shapes=HEADS_SMOKE,
    make_inputs=rwkv7_inputs,
    zoo={"zoo triton": _zoo_call(rwkv7_triton), "zoo triton chunk-parallel": _zoo_call(rwkv7_triton_chunk),
         "zoo chunked torch": _zoo_call(rwkv7_chunked)},
    peers={"fla chunk_rwkv7": _fla_rwkv7, "zoo backend=fla": _zoo_fla(rwkv7)},
)
RETENTION = KernelBench(
    shapes=HEADS_64,
    smoke_shapes=HEADS_SMOKE,
    make_inputs=retention_inputs,
    zoo={
        "zoo triton": _zoo_call(retention_triton, form="chunk"),
        "zoo triton recurrent": _zoo_call(retention_triton, form="recurrent"),
        "zoo triton chunk-parallel": _zoo_call(retention_triton_chunk),
        "zoo chunked torch": _zoo_call(retention_chunked),
    },
    peers={"fla chunk_retention": _fla_retention, "zoo backend=fla": _zoo_fla(retention, constant=("log_decay",))},
)


BENCHES: dict[str, KernelBench] = {
    "selective_scan": SELECTIVE_SCAN,
    "ssd": SSD,
    "rwkv6": RWKV6,
    "rwkv7": RWKV7,
    "retention": RETENTION,
}


# ---------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(prepare: Prepare, inputs: dict, device: torch.device, warmup: int, iters: int) -> dict:
    """Forward (no grad) and forward + backward (all leaves) times of one implementation."""
    run, leaves = prepare(inputs)
    outputs = [o for o in run() if torch.is_tensor(o) and o.is_floating_point()]
    grads = [torch.randn_like(o) for o in outputs]

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        outs = [o for o in run() if torch.is_tensor(o) and o.is_floating_point()]
        torch.autograd.backward(outs, grads)

    try:
        return {"fwd_ms": round(time_ms(forward, device, warmup, iters), 3),
                "fwd_bwd_ms": round(time_ms(forward_backward, device, warmup, iters), 3)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"fwd_ms": None, "fwd_bwd_ms": None, "error": "out of memory"}


def run_bench(op: str, bench: KernelBench, sizes, shapes: dict, device, dtype, warmup: int, iters: int) -> dict:
    prepares = dict(bench.zoo)
    missing = []
    for name, load in bench.peers.items():
        prepare = load() if device.type == "cuda" else None
        if prepare is None:
            missing.append(name)
        else:
            prepares[name] = prepare
    runs = []
    for T, batch in sizes:
        torch.manual_seed(0)
        inputs = bench.make_inputs(batch, T, shapes, device, dtype)
        for name, prepare in prepares.items():
            result = measure(prepare, inputs, device, warmup, iters)
            runs.append({"T": T, "batch": batch, "impl": name, **result})
            print(f"{op} T={T} B={batch} {name}: {result}", file=sys.stderr)
    # ratio other / zoo triton at the same size: > 1 means the Triton kernel is faster
    base = {(r["T"], r["batch"]): r for r in runs if r["impl"] == "zoo triton"}
    for r in runs:
        b = base.get((r["T"], r["batch"]))
        for key in ("fwd_ms", "fwd_bwd_ms"):
            ratio = r[key] / b[key] if b and r[key] and b[key] else None
            r[key.replace("_ms", "_ratio_vs_triton")] = None if ratio is None else round(ratio, 3)
    return {"shapes": shapes, "peers_missing": missing, "runs": runs}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU (Triton interpreter), {torch.get_num_threads()} threads"


def markdown(report: dict) -> str:
    lines = [
        f"# Scan kernels ({report['device']}, torch {report['torch']}, triton {report['triton']}, {report['dtype']})",
        "",
        "Median ms per call; ratio = time / zoo triton time at the same size (> 1: the Triton kernel is faster).",
    ]
    for op, result in report["ops"].items():
        lines += [
            "",
            f"## {op}: {', '.join(f'{k} {v}' for k, v in result['shapes'].items())}",
            "",
            "| T | B | implementation | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |",
            "|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in result["runs"]:
            lines.append(
                f"| {r['T']} | {r['batch']} | {r['impl']} | {r['fwd_ms']} | {r['fwd_ratio_vs_triton']} | "
                f"{r['fwd_bwd_ms']} | {r['fwd_bwd_ratio_vs_triton']} |" + (f" {r['error']}" if "error" in r else "")
            )
        if result["peers_missing"]:
            lines += ["", f"Not installed (not timed): {', '.join(result['peers_missing'])}."]
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


def plan(args: argparse.Namespace, device: torch.device, sizes, dtype, warmup: int, iters: int, path: Path) -> dict:
    """What a run with these arguments would time (``--dry-run``): nothing is computed, peers are only imported."""
    ops = {}
    for op in args.ops:
        bench = BENCHES[op]
        peers = {name: load() is not None for name, load in bench.peers.items()}
        ops[op] = {
            "shapes": bench.smoke_shapes if args.smoke else bench.shapes,
            "implementations": list(bench.zoo) + [name for name, found in peers.items() if found],
            "peers_missing": [name for name, found in peers.items() if not found],
        }
    return {
        "device": device_name(device), "cuda": device.type == "cuda", "dtype": str(dtype).removeprefix("torch."),
        "sizes": [{"T": T, "batch": b} for T, b in sizes], "warmup": warmup, "iters": iters, "ops": ops,
        "would_write": [str(path.with_suffix(".json")), str(path.with_suffix(".md"))],
    }


def write_model(ops: list[str], sizes, out: Path) -> dict:
    """``--model``: the paper roofline of ``ops`` at ``sizes``, printed and written as kernels-roofline.{json,md}."""
    from benchmarks.roofline import model_markdown, model_report

    report = model_report(BENCHES, sizes, ops)
    write_report(out / "kernels-roofline", report, model_markdown(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (CPU: Triton interpreter)")
    parser.add_argument("--ops", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--sizes", type=parse_sizes, help="T:batch pairs, e.g. 1024:4,4096:1 (default: 16k tokens per call)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON and time nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md results")
    parser.add_argument("--model", action="store_true", help="paper roofline (H100 lower bounds); runs no kernel")
    args = parser.parse_args(argv)
    if args.model:
        return write_model(args.ops, args.sizes or GPU_SIZES, args.out)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke and not args.dry_run:
        parser.error("the benchmark shapes need a CUDA GPU; pass --smoke for a tiny run on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        sizes, dtype, warmup, iters, stem = SMOKE_SIZES, torch.float32, 1, args.iters or 1, "kernels-smoke"
    else:
        sizes, dtype, warmup, iters = GPU_SIZES, torch.bfloat16, 3, args.iters or 10
        stem = "kernels-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    sizes = args.sizes or sizes
    if args.dry_run:
        planned = plan(args, device, sizes, dtype, warmup, iters, args.out / stem)
        print(json.dumps(planned, indent=2))
        return planned
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_call": [T * b for T, b in sizes],
        "ops": {},
    }
    for op in args.ops:
        bench = BENCHES[op]
        shapes = bench.smoke_shapes if args.smoke else bench.shapes
        report["ops"][op] = run_bench(op, bench, sizes, shapes, device, dtype, warmup, iters)
    write_report(args.out / stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
