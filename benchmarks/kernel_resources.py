"""Ahead-of-time compile check of every zoo Triton kernel for real GPU targets, on a machine without a GPU.

``python -m benchmarks.kernel_resources`` compiles each kernel (forward and backward) for sm_80, sm_86, sm_89 and
sm_90 at the shapes of the ~125M benchmark models (d_model 768; the recipes use the same per-head shapes with fewer
heads) and at head dim 256 (``MAX_HEAD_DIM``), for bf16 and fp32 inputs, and writes registers, spill (stack) bytes
and shared memory per kernel to ``benchmarks/results/kernels-resources.md``. It exits 1 when a kernel fails to compile or needs more shared memory
per block than its target allows. ``--targets gfx90a gfx942`` compiles for ROCm instead (head dims <= 128; errors and
LDS checked, nothing written to the table).

How, without a GPU: one worker process per target (``TRITON_INTERPRET`` removed) swaps Triton's active driver for
:class:`FakeDriver`, whose ``get_current_target()`` is the target, and answers ``torch.cuda.get_device_capability``
for it. It then makes every Triton call of :data:`zoo.kernels.registry.CALLS` (forward, and backward from the
output's gradient; the ``op/triton_chunk/packed`` calls over packed documents, ``cu_seqlens`` at batch 1) on ``meta`` tensors at its op's ``models`` sizes, with the arguments zoo's layers pass, so zoo's
own launchers pick grid, tiles, ``num_warps`` and ``num_stages``, and Triton's own JIT specializes and compiles
exactly what a GPU would launch; the fake launcher records each launch instead of running it. ptxas and
cuobjdump ship in the triton wheel; cuobjdump reads registers, stack bytes and static shared memory from the cubin.
Integer arguments are given GPU-typical values (T = 2048, a multiple of 16, which Triton specializes on).
Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a second run only
re-reads them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS: dict[str, tuple[int, int]] = {  # name -> (arch, shared memory per block in bytes, the opt-in maximum)
    "sm_80": (80, 166912),  # A100
    "sm_86": (86, 101376),  # RTX 3090, A40, A10
    "sm_89": (89, 101376),  # RTX 4090, L40S, L4
    "sm_90": (90, 232448),  # H100, H200
}
# ROCm targets (name -> LDS per workgroup in bytes): compiled and checked for errors and LDS at head dims <= 128, with
# no resource table (cuobjdump reads CUDA binaries only)
HIP_TARGETS: dict[str, int] = {"gfx90a": 65536, "gfx942": 65536}  # MI250, MI300
HIP_MAX_HEAD_DIM = 128
DTYPES = ("bfloat16", "float32")
TILE_NAMES = ("BT", "BK", "BV", "BVP", "CH", "L", "BLOCK_D", "BLOCK_P", "BLOCK_N", "BLOCK", "G")
T = 2048  # sequence length of every call: a multiple of 16 like most training runs


# ---------------------------------------------------------------- worker: one target, in its own process


def cubin_resources(cubin: bytes, cuobjdump: str) -> dict:
    """Registers, stack bytes per thread and static shared memory of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", out.split("Function", 1)[1]))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "static_shared": int(fields["SHARED"])}


class FakeDriver:
    """Triton's active driver for a GPU that is not there: compiles for ``arch`` (an int for CUDA, a ``gfx`` name for
    ROCm, whose binaries get no resource read-out) and records launches."""

    def __init__(self, arch: int | str, cuobjdump: str):
        self.arch = arch
        self.launches: list[dict] = []
        self.clock = time.perf_counter()  # compile seconds of a launch: time since the previous one (or the call start)
        driver = self

        class Utils:
            @staticmethod
            def get_device_properties(device):
                # no limit here: the report checks the target's limit, so over-limit kernels still get a row
                return {"max_shared_mem": 1 << 30}

            @staticmethod
            def load_binary(name, cubin, shared, device):
                if isinstance(arch, str):  # ROCm
                    return object(), {"regs": 0, "stack": 0, "static_shared": 0}, 0, 0, 1024
                return object(), cubin_resources(cubin, cuobjdump), 0, 0, 1024

            @staticmethod
            def unload_module(module):
                pass

        self.utils = Utils()

        def launcher_cls(src, meta):
            def launch(g0, g1, g2, stream, function, packed, launch_meta, enter_hook, exit_hook, *args):
                names = src.fn.arg_names
                constants = {names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
                driver.launches.append({
                    "kernel": src.fn.__name__, "grid": [g0, g1, g2], "warps": meta.num_warps, "stages": meta.num_stages,
                    "shared": meta.shared + function["static_shared"], "regs": function["regs"],
                    "stack": function["stack"],
                    "tiles": {k: constants[k] for k in TILE_NAMES if k in constants},
                    "seconds": round(time.perf_counter() - driver.clock, 2),
                })
                driver.clock = time.perf_counter()

            return launch

        self.launcher_cls = launcher_cls

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("hip", self.arch, 64) if isinstance(self.arch, str) else GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def selected_calls(ops: tuple[str, ...] = ()) -> list:
    """The Triton calls of the registry whose name (``op/backend``) starts with one of ``ops`` (all without); an old op
    name selects its op (``rwkv7`` is ``dplr_delta_rule``: :func:`zoo.kernels.registry.op_name`)."""
    from zoo.kernels.registry import TRITON_CALLS, op_name

    prefixes = tuple(op_name(p) for p in ops)
    return [call for call in TRITON_CALLS if not prefixes or call.name.startswith(prefixes)]


def worker(target: str, dtypes: list[str], out: str, ops: tuple[str, ...] = ()) -> None:
    """Compile every registry call (those whose name starts with one of ``ops``, when given) for ``target`` in this
    process and write its rows to ``out`` (JSON)."""
    assert "TRITON_INTERPRET" not in os.environ, "the interpreter cannot compile for a GPU"
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import torch
    import triton
    from triton.runtime import driver

    hip = target in HIP_TARGETS
    arch, shared = (target, HIP_TARGETS[target]) if hip else TARGETS[target]
    fake = FakeDriver(arch, str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    driver.set_active(fake)
    # zoo's launchers read the target the way a GPU run does (torch.cuda's capability of the tensors' device, or
    # torch.version.hip for ROCm)
    torch.cuda.get_device_capability = lambda device=None: (9, 0) if hip else divmod(arch, 10)
    torch.version.hip = "6.4" if hip else None  # the target's platform, whatever this torch was built for
    from zoo.kernels.registry import run_call, shape_label

    rows = []
    calls = selected_calls(ops)
    for dtype, call in ((dtype, call) for dtype in dtypes for call in calls):
        for dims in call.op.models:
            if hip and max(dims.get("K", 0), dims.get("P", 0)) > HIP_MAX_HEAD_DIM:
                continue
            start = len(fake.launches)
            fake.clock = time.perf_counter()
            try:
                run_call(call, call.op.example(dims, 1, 1 if call.step else T, "meta", getattr(torch, dtype)))
                error = None
            except Exception as e:  # a compile error is a result: it fails the check, not the run
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            base = {"op": call.name, "shape": shape_label(dims), "dims": dims, "target": target, "dtype": dtype, "limit": shared}
            if call.documents:  # packed documents: their lengths at T
                bounds = call.bounds(T)
                base["documents"] = [e - s for s, e in zip(bounds, bounds[1:])]
            rows += [{**base, **launch} for launch in fake.launches[start:]]
            if error:
                rows.append({**base, "kernel": "(compile)", "error": error})
    Path(out).write_text(json.dumps(rows))


# ---------------------------------------------------------------- driver: workers in parallel, table, check


def collect(targets=tuple(TARGETS), dtypes=DTYPES, jobs: int | None = None, ops: tuple[str, ...] = ()) -> list[dict]:
    """Run one worker process per target, ``jobs`` at a time; return every launch row (of the calls named ``ops*``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    jobs = jobs or min(len(targets), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())

    def run(target):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--worker", target, "--dtypes", *dtypes, "--json", f.name, *(("--ops", *ops) if ops else ())]
            proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{target} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            return json.loads(Path(f.name).read_text())

    with ThreadPoolExecutor(jobs) as pool:
        return [row for rows in pool.map(run, targets) for row in rows]


# Launches that still spill registers, and why; the notes under the table. tests/test_triton_aot.py fails on any other.
KNOWN_SPILLS = (
    # (kernel name prefix, pattern (re.search) in the shape, targets, dtypes, why)
    ("_", r"K=(V=)?256", tuple(TARGETS), DTYPES,
     "head dim 256 (MAX_HEAD_DIM, RetNet-paper heads): `[BT, 256]` operand and `[256, BV]` state tiles at the "
     "smallest dot tiles (BT = 16, BV = 16 / 32) hold more than a thread's 255 registers in the chunked kernels; every "
     "launch fits its target's shared memory. Where speed at K = 256 matters, the fused-recurrent kernels do not spill."),
    ("_rwkv6_cp_grad_kernel packed", r"K=(V=)?64", ("sm_86", "sm_89"), ("float32",),
     "packed documents (`IS_VARLEN`): ptxas holds RWKV-6's gradient kernel to 128 registers on sm_86 / sm_89 with fp32 "
     "inputs and spills 8 B per thread (the batched kernel takes 138 and does not spill; the packed one keeps the "
     "document's offsets live across its loops). Tried without effect: int32 token counts, the state and token-row "
     "offsets hoisted out of the loops. Not tuned further without a GPU to time a change."),
)


def known_spill(row: dict) -> str | None:
    """Why ``row`` may spill, or None when it must not (a prefix ending in `` packed`` names the packed-documents call's
    launches of that kernel only)."""
    name = row["kernel"] + (" packed" if row.get("documents") else "")
    for prefix, shape, targets, dtypes, why in KNOWN_SPILLS:
        if name.startswith(prefix) and re.search(shape, row["shape"]) and row["target"] in targets and row["dtype"] in dtypes:
            return why
    return None


def problems(rows: list[dict]) -> list[str]:
    """Compile errors and kernels over their target's shared memory per block."""
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"{r['op']} {r['shape']} {r['dtype']} on {r['target']}: {r['error']}")
        elif r["shared"] > r["limit"]:
            out.append(f"{r['kernel']} {r['shape']} {r['dtype']} on {r['target']}: {r['shared']} B shared memory > {r['limit']} B")
    return out


def markdown(rows: list[dict], title: str = "", notes: bool = True) -> str:
    """The table, one row per (kernel, shape, dtype, target), with a summary per target and (``notes``) why the
    spills left are there. Nothing in it depends on the machine or the run: a change in the file is a change in the
    kernels."""
    from zoo.kernels.registry import TRITON_CALLS

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("triton", "torch"))
    order = {call.name: i for i, call in enumerate(TRITON_CALLS)}
    rows = [r for r in rows if r["target"] in TARGETS]  # ROCm rows have no resources to show
    ok = [r for r in rows if "error" not in r]
    ok.sort(key=lambda r: (order[r["op"]], r["kernel"], r["shape"], r["dtype"], r["target"]))
    lines = [
        f"# zoo Triton kernels: compile-time resources per GPU target{title}",
        "",
        f"Written by `python -m benchmarks.kernel_resources` (tests/test_triton_aot.py; {versions}). Compile-time data, "
        "not a GPU run: each kernel is compiled ahead of time for the target, without a GPU, with the grid, tiles, "
        "warps and stages that zoo's launchers pick for that target; registers, stack bytes per thread (register "
        "spills) and static shared memory come from `cuobjdump --dump-resource-usage`, dynamic shared memory from "
        "Triton's metadata; smem is their sum.",
        "",
        f"Shapes: the ~125M models (d_model 768; the recipes have the same head shapes) and head dim 256 (3 heads), "
        f"T = {T}, batch 1, the recipes' chunk sizes; bf16 = bf16 activations, fp32 parameters (as under bf16 autocast). "
        "A kernel marked *packed* is the chunk-parallel call over packed documents (`cu_seqlens`, batch 1, the "
        "`IS_VARLEN` kernels) of the lengths shown.",
        "",
        "| target | smem limit B | most smem B | launches | over the limit | spilling |",
        "|---|---|---|---|---|---|",
    ]
    for target, (_, limit) in TARGETS.items():
        mine = [r for r in ok if r["target"] == target]
        if mine:
            over = sum(r["shared"] > limit for r in mine)
            lines.append(f"| {target} | {limit} | {max(r['shared'] for r in mine)} | {len(mine)} | {over} | "
                         f"{sum(r['stack'] > 0 for r in mine)} |")
    lines += [
        "",
        "| kernel | shape | dtype | target | tiles | grid | warps | stages | regs | spill B/thread | smem B | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
        grid = "x".join(str(g) for g in r["grid"])
        fits = "yes" if r["shared"] <= r["limit"] else f"**no** (> {r['limit']})"
        kernel = r["kernel"] + (f" *packed {'+'.join(map(str, r['documents']))}*" if r.get("documents") else "")
        lines.append(
            f"| {kernel} | {r['shape']} | {r['dtype']} | {r['target']} | {tiles} | {grid} | {r['warps']} | "
            f"{r['stages']} | {r['regs']} | {r['stack']} | {r['shared']} | {fits} |"
        )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['target']} | compile error: {r['error']} |||||||| no |")
    spilling = [r for r in ok if r["stack"] > 0]
    if notes and spilling:
        lines += ["", "Spills left:", ""]
        for prefix, shape, targets, dtypes, why in KNOWN_SPILLS:
            if any(known_spill(r) == why for r in spilling):
                lines.append(f"- `{prefix}*` at shapes matching `{shape.strip()}`, {' / '.join(targets)}, {' / '.join(dtypes)}: {why}")
        lines += [f"- {r['kernel']} {r['shape']} {r['dtype']} on {r['target']}: unexplained" for r in spilling if not known_spill(r)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=[*TARGETS, *HIP_TARGETS],
                        help="ROCm targets are checked (compile errors, LDS) but not written to the table")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--jobs", type=int, default=None, help="worker processes at a time (default: one per core)")
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS / 'kernels-resources.md'} (without --ops)")
    parser.add_argument("--rows", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--ops", nargs="+", default=(), help="only the calls whose name (op/backend) starts with one of "
                        "these, e.g. ssd retention/triton_chunk (old op names too: rwkv7 is dplr_delta_rule; the table is then "
                        "written only with --out)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.dtypes, args.json, tuple(args.ops))
        return 0
    start = time.perf_counter()
    rows = collect(args.targets, args.dtypes, args.jobs, tuple(args.ops))
    seconds = time.perf_counter() - start
    if args.ops:  # a subset: one line per launch here, the table only where asked
        for r in rows:
            if "error" not in r:
                tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
                print(f"{r['kernel']} {r['shape']} {r['dtype']} {r['target']} {tiles} warps={r['warps']}: "
                      f"{r['regs']} regs, {r['stack']} B spill, {r['shared']} B smem")
    out = args.out or (None if args.ops else RESULTS / "kernels-resources.md")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(rows))
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1))
    bad = problems(rows)
    print(f"{len(rows)} kernel launches compiled for {', '.join(args.targets)} in {seconds:.0f} s" + (f" -> {out}" if out else ""))
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
