"""One MoE layer, forward + backward: grouped dispatch vs the per-expert loop vs a dense SwiGLU of the same active size.

``python -m benchmarks.moe`` (GPU shapes: 64 experts, top-8, 16k tokens, d_model 1024, bf16) or ``--smoke``
(small CPU shapes, fp32). Prints a table and writes ``benchmarks/results/moe[_smoke].{json,md}``.
The dense baseline is a SwiGLU with hidden size ``top_k * expert_hidden``: the FLOPs one token spends in the MoE.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, time_ms, write_report
from zoo.layers import MoE, MoEConfig, SwiGLU, SwiGLUConfig
from zoo.layers.moe import grouped_mm_supported

GPU_SHAPES = {"tokens": 16384, "d_model": 1024, "num_experts": 64, "top_k": 8, "expert_hidden": 512, "dtype": "bfloat16"}
SMOKE_SHAPES = {"tokens": 2048, "d_model": 128, "num_experts": 8, "top_k": 2, "expert_hidden": 128, "dtype": "float32"}


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median milliseconds of one forward + backward (input and parameter gradients)."""
    grad = torch.randn_like(x)

    def step() -> None:
        module(x.detach().requires_grad_()).backward(grad)
        module.zero_grad(set_to_none=True)

    return time_ms(step, x.device, warmup, iters)


def run(shapes: dict, device: torch.device, warmup: int, iters: int) -> dict:
    dtype = getattr(torch, shapes["dtype"])
    d, e, k, hidden = shapes["d_model"], shapes["num_experts"], shapes["top_k"], shapes["expert_hidden"]
    torch.manual_seed(0)
    x = torch.randn(1, shapes["tokens"], d, device=device, dtype=dtype)
    cfg = MoEConfig(num_experts=e, top_k=k, expert_hidden=hidden, dispatch="grouped")
    grouped = MoE(cfg, d, 0)
    grouped.init_parameters()
    grouped = grouped.to(device, dtype)
    loop = MoE(dataclasses.replace(cfg, dispatch="loop"), d, 0).to(device, dtype)
    loop.load_state_dict(grouped.state_dict())
    dense = SwiGLU(SwiGLUConfig(hidden_size=k * hidden), d, 0).to(device, dtype)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), loop(x), atol=5e-2 if dtype == torch.bfloat16 else 1e-4, rtol=5e-2)
    rows = {}
    for name, module in (("moe grouped", grouped), ("moe loop", loop), ("dense swiglu (same active params)", dense)):
        ms = time_fwd_bwd(module, x, warmup, iters)
        flops = 3 * 2 * 3 * shapes["tokens"] * d * hidden * k  # fwd + bwd (x3) of three matmuls per active expert
        rows[name] = {"ms": round(ms, 3), "gflops": round(flops / ms / 1e6, 1)}
    return {
        **machine(device),
        "grouped_uses_torch_grouped_mm": grouped_mm_supported(dtype, device, d, hidden),
        "shapes": shapes,
        "results": rows,
    }


def markdown(report: dict) -> str:
    s = report["shapes"]
    lines = [
        f"# MoE layer forward + backward ({report['device']}, torch {report['torch']})",
        "",
        f"tokens {s['tokens']}, d_model {s['d_model']}, {s['num_experts']} experts, top-{s['top_k']}, "
        f"expert_hidden {s['expert_hidden']}, {s['dtype']}; grouped dispatch uses torch._grouped_mm: "
        f"{report['grouped_uses_torch_grouped_mm']}",
        "",
        "| variant | ms | GFLOP/s (active) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {r['ms']} | {r['gflops']} |" for name, r in report["results"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small fp32 shapes on CPU")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        device, shapes, iters = torch.device("cpu"), SMOKE_SHAPES, args.iters or 5
    else:
        if not torch.cuda.is_available():
            parser.error("the default shapes need a CUDA GPU; use --smoke on CPU")
        device, shapes, iters = torch.device("cuda"), GPU_SHAPES, args.iters or 20
    report = run(shapes, device, warmup=2, iters=iters)
    write_report(args.out / ("moe_smoke" if args.smoke else "moe"), report, markdown(report))
    return report


if __name__ == "__main__":
    main()
