"""Memory of one layer's forward + backward of every zoo Triton op at long context, computed on meta tensors.

``python -m benchmarks.kernel_memory [--T 131072] [--out benchmarks/results/kernels-memory-128k]`` runs each Triton
call of :data:`zoo.kernels.registry.TRITON_CALLS` (not the decode step) forward and backward from the output's
gradient, as in training, through zoo's own launchers on ``meta`` tensors, with every ``@triton.jit`` kernel replaced
by a recorder (:func:`zoo.kernels.registry.launches` does the same): nothing is computed or compiled, no GPU is needed,
and the tiles are those of an H100 (sm_90). A dispatch mode sees every tensor the call allocates and a finalizer on
each storage sees it freed, so the numbers are the launchers' real buffers, not a formula.

Per call: the inputs (as zoo's layers pass them: bf16 activations, fp32 log decays and parameters), the outputs
(``o`` / ``y`` and the final state), the gradients handed back (in the inputs' dtypes), and the op's own buffers:
``saved`` (alive between forward and backward: saved for backward) and ``peak`` (the most alive at once over forward
and backward: saved + scratch + the launchers' fp32 gradient buffers before they are reduced and cast), each without
and with segmented recompute (:func:`zoo.kernels.triton_common.scan_function`). Not counted: the allocator's
rounding and fragmentation, Triton's own workspaces, the autograd engine's zero cotangent of the final state when the
loss does not use it (it is counted: small).
"""
from __future__ import annotations

import argparse
import itertools
import json
import weakref
from importlib import metadata
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zoo.kernels.registry import TRITON_CALLS, KernelCall, recording, shape_label
from zoo.kernels.triton_common import forced_segment, segment_tokens

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30
LIMIT_GIB = 16  # what one layer's forward + backward may take of the op's own buffers (issue 26)
T_LONG = 131072
# The long-context shape B = 1, H = 32, K = V = 128; SSD: Mamba-2 at d_model 2048 (d_inner 4096 = 64 heads of 64
# channels, d_state 128, the same 2^19 state entries); selective scan: Mamba-1 at d_model 2048 (d_inner 4096, N = 16).
LONG_DIMS = {"retention": {"H": 32, "K": 128, "V": 128}, "rwkv6": {"H": 32, "K": 128, "V": 128},
             "dplr_delta_rule": {"H": 32, "K": 128, "V": 128}, "ssd": {"H": 64, "P": 64, "N": 128},
             "selective_scan": {"D": 4096, "N": 16}, "gated_delta_rule": {"H": 32, "K": 128, "V": 128},
             "kda": {"H": 32, "K": 128, "V": 128}}

class Allocations(TorchDispatchMode):
    """Every storage a dispatched op creates, with its bytes, in order of allocation and freeing: ``events`` holds
    ``(allocation id, bytes)`` when one is allocated and ``(allocation id, None)`` when it is freed. Storages that
    exist before (``known``) are not tracked."""

    def __init__(self, known=()):
        super().__init__()
        self.ids = itertools.count()
        self.live: dict[int, int] = {}  # id of the storage object (kept while it lives) -> allocation id
        self.events: list[tuple[int, int | None]] = []
        for t in known:
            self.live[id(t.untyped_storage())] = -1

    def allocation(self, t: torch.Tensor) -> int:
        """The allocation id of ``t``'s storage (alive)."""
        return self.live[id(t.untyped_storage())]

    def _see(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if id(storage) in self.live:
            return
        aid = next(self.ids)
        self.live[id(storage)] = aid
        self.events.append((aid, storage.nbytes()))
        weakref.finalize(storage, self._free, id(storage), aid)

    def _free(self, key: int, aid: int) -> None:
        self.live.pop(key, None)
        self.events.append((aid, None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out

    def peak(self, excluded: set[int], upto: int | None = None) -> tuple[int, int]:
        """``(peak, at the end)`` bytes alive over ``events[:upto]``, not counting the ``excluded`` allocations."""
        sizes, alive, peak = {}, 0, 0
        for aid, size in self.events[:upto]:
            if aid in excluded:
                continue
            if size is None:
                alive -= sizes.pop(aid, 0)
            else:
                sizes[aid] = size
                alive += size
                peak = max(peak, alive)
        return peak, alive


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors if t is not None}.values())


def measure(call: KernelCall, dims: dict, T: int, batch: int = 1, dtype=torch.bfloat16, arch: int = 90) -> dict:
    """Bytes of one forward + backward of ``call`` (from the output's gradient) on meta tensors: ``inputs``,
    ``outputs``, ``grads`` and the op's own ``saved`` / ``peak`` buffers (module docstring)."""
    inputs = call.op.example(dims, batch, T, "meta", dtype)
    run, leaves = call.prepare(inputs)
    with recording(arch), Allocations(known=leaves) as allocations:
        out, final = run()
        mark = len(allocations.events)
        d_out = torch.empty_like(out)
        excluded = {allocations.allocation(t) for t in (out, final, d_out)}
        out.backward(d_out)
        grads = [leaf.grad for leaf in leaves]
        excluded |= {allocations.allocation(g) for g in grads}
        _, saved = allocations.peak(excluded, mark)
        peak, _ = allocations.peak(excluded)
    return {"inputs": nbytes(leaves), "outputs": nbytes([out, final]), "grads": nbytes(grads), "saved": saved, "peak": peak}


def state_elements(op: str, dims: dict, batch: int) -> int:
    """The state's numel (batch included) at ``dims``, as each op's ``scan_function`` computes it."""
    if op == "selective_scan":
        return batch * dims["D"] * dims["N"]
    return batch * dims["H"] * (dims["P"] * dims["N"] if op == "ssd" else dims["K"] * dims["V"])


def table(T: int = T_LONG, batch: int = 1) -> list[dict]:
    """One row per trained Triton call at :data:`LONG_DIMS`: the sizes, ``before`` (one segment, today's path before
    segmented recompute) and ``after`` (the default segments) in bytes, S and the number of segments."""
    rows = []
    # the packed-document calls (a compile and launch check at batch 1, T = 2048) are not modelled at 128k
    for call in (c for c in TRITON_CALLS if not c.step and not c.documents):
        dims = LONG_DIMS[call.op.name]
        with forced_segment(None):
            before = measure(call, dims, T, batch)
        after = measure(call, dims, T, batch)
        S = segment_tokens(state_elements(call.op.name, dims, batch))
        rows.append({"call": call.name, "shape": f"B={batch} T={T} {shape_label(dims)}", "segment": S,
                     "segments": -(-T // S), "before": before, "after": after})
    return rows


def render(rows: list[dict]) -> str:
    g = lambda n: f"{n / GiB:.2f}"  # noqa: E731
    lines = [
        "# Triton ops: one layer's forward + backward at long context (GiB)",
        "",
        "Written by `python -m benchmarks.kernel_memory` (issue 26, finding 8). Device: meta tensors, computed (zoo's "
        f"launchers with sm_90 tiles, every allocation tracked; nothing estimated by hand). torch {torch.__version__}, "
        f"triton {metadata.version('triton')}. bf16 activations, fp32 log decays and parameters; backward from the "
        "output's gradient. *own* = the op's buffers (saved for backward + scratch at the peak), without inputs, "
        "outputs, the output's gradient and the gradients handed back, listed apart. *before*: the same launchers as "
        "one segment (segmented recompute off; at 43e2fc4 the fused-recurrent backward also held all its reduced "
        "V-block partials at once: 2-6 GiB more); *after*: segments of S tokens, S = 2^33 / state entries "
        f"(`zoo.kernels.triton_common.segment_tokens`). Limit: {LIMIT_GIB} GiB of own buffers.",
        "",
        "| call | shape | inputs | outputs | grads | saved before | saved after | own peak before | own peak after | S | segments |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['call']} | {r['shape']} | {g(a['inputs'])} | {g(a['outputs'])} | {g(a['grads'])} | {g(b['saved'])} | "
                     f"{g(a['saved'])} | {g(b['peak'])} | **{g(a['peak'])}** | {r['segment']:,} | {r['segments']} |")
    over = [r["call"] for r in rows if r["after"]["peak"] >= LIMIT_GIB * GiB]
    if over:
        lines += ["", f"Over the limit: {', '.join(over)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=T_LONG)
    parser.add_argument("--out", default=str(RESULTS / "kernels-memory-128k"), help="path without suffix (.md and .json)")
    args = parser.parse_args(argv)
    rows = table(args.T)
    text = render(rows)
    print(text)
    meta = {"device": "meta tensors, computed", "arch": 90, "torch": torch.__version__, "triton": metadata.version("triton"),
            "dtype": "bfloat16", "limit_gib": LIMIT_GIB, "rows": rows}
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    return 1 if any(r["after"]["peak"] >= LIMIT_GIB * GiB for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
