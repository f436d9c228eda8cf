"""Packed documents, one training step (forward + backward) of a small model: a packed row run as one call of every
layer (``packs_documents``) vs one call per document (what every block did before, and what the LSTM still does)
vs the same tokens concatenated (``data.packing: concat``, documents seeing each other: the floor).

``python -m benchmarks.packing`` (CPU shapes, fp32) or ``--smoke``. Prints a table and writes
``benchmarks/results/packing-<device>.{json,md}``. Document lengths are drawn geometrically with the given mean
(seeded), cut to the row; every row holds the same documents, so the three modes see the same tokens.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, slug, time_ms, write_report
from zoo.config import ModelConfig
from zoo.layers.registry import MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM

SHAPES = {"d_model": 256, "n_layers": 4, "batch": 4, "seq_len": 1024, "mean_doc": 64, "vocab": 512}
SMOKE = {"d_model": 32, "n_layers": 2, "batch": 2, "seq_len": 64, "mean_doc": 8, "vocab": 64}
BLOCKS = {"attention": {"n_heads": 4}, "mamba2": {"head_dim": 32, "chunk_size": 64}, "rwkv6": {"head_dim": 32, "chunk_size": 16},
          "gated_deltanet": {}}


def document_positions(seq_len: int, mean: int, seed: int = 0) -> torch.Tensor:
    """``[seq_len]`` positions restarting at each document; lengths geometric with mean ``mean``, at least 1."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seq_len:
        n = int(torch.empty(1).geometric_(1 / mean, generator=gen).item())
        n = max(1, min(n, seq_len - total))
        lengths.append(n)
        total += n
    return torch.cat([torch.arange(n) for n in lengths])


@contextlib.contextmanager
def one_call_per_document(model: torch.nn.Module):
    """Every block of ``model`` as if it could not take packed documents (``SequenceMixer``'s per-document loop)."""
    classes = {type(layer.mixer) for layer in model.model.layers}
    saved = {cls: cls.__dict__.get("packs_documents") for cls in classes}
    for cls in classes:
        cls.packs_documents = False
    try:
        yield
    finally:
        for cls, value in saved.items():
            if value is None:
                del cls.packs_documents
            else:
                cls.packs_documents = value


def run(shapes: dict, blocks: list[str], warmup: int, iters: int) -> dict:
    positions = document_positions(shapes["seq_len"], shapes["mean_doc"])
    n_docs = int((positions == 0).sum())
    rows = {}
    for block in blocks:
        spec = ModelConfig.from_dict({"d_model": shapes["d_model"], "n_layers": shapes["n_layers"], "blocks": [block],
                                      "vocab_size": shapes["vocab"], block: BLOCKS.get(block, {})})
        torch.manual_seed(0)
        model = ZooForCausalLM(ZooConfig.from_model_config(spec)).train()
        ids = torch.randint(1, shapes["vocab"], (shapes["batch"], shapes["seq_len"]))
        pos = positions.expand(shapes["batch"], -1)

        def step(**packing) -> None:
            model(ids, labels=ids, use_cache=False, **packing).loss.backward()
            model.zero_grad(set_to_none=True)

        with torch.no_grad():
            packed = model(ids, position_ids=pos, use_cache=False).logits
            with one_call_per_document(model):
                torch.testing.assert_close(packed, model(ids, position_ids=pos, use_cache=False).logits, atol=1e-4, rtol=1e-4)
        one_call = time_ms(lambda: step(position_ids=pos), warmup=warmup, iters=iters)
        with one_call_per_document(model):
            per_document = time_ms(lambda: step(position_ids=pos), warmup=warmup, iters=iters)
        concat = time_ms(step, warmup=warmup, iters=iters)
        rows[block] = {"one call ms": round(one_call, 1), "per document ms": round(per_document, 1), "concat ms": round(concat, 1),
                       "per document / one call": round(per_document / one_call, 2), "one call / concat": round(one_call / concat, 2)}
        print(block, rows[block], flush=True)
    return {"meta": machine("cpu"), "shapes": shapes, "documents_per_row": n_docs, "blocks": BLOCKS, "results": rows,
            "note": "ops run with their torch backend (which runs the scan once per document; fla would take cu_seqlens)"}


def markdown(report: dict) -> str:
    meta, shapes = report["meta"], report["shapes"]
    lines = [f"# Packed documents: one training step, {meta['device']}", "",
             f"`python -m benchmarks.packing` on {meta['device']} ({meta['cpus']} CPUs, load {meta['load_average']}), torch "
             f"{meta['torch']}, {meta['date']}. Model: d_model {shapes['d_model']}, {shapes['n_layers']} layers of one block "
             f"(SwiGLU FFN), fp32; a batch of {shapes['batch']} x {shapes['seq_len']} tokens, {report['documents_per_row']} "
             f"documents per row (geometric lengths, mean {shapes['mean_doc']}). Median ms of forward + backward (loss on "
             "every token). Ops on their torch backend, which runs a scan once per document.", "",
             "| block | one call per layer | one call per document | concat (documents see each other) | per document / one call | one call / concat |",
             "|---|---|---|---|---|---|"]
    for block, r in report["results"].items():
        lines.append(f"| {block} | {r['one call ms']} | {r['per document ms']} | {r['concat ms']} | {r['per document / one call']} | {r['one call / concat']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a test)")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated, registered blocks (default {','.join(BLOCKS)})")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/packing-<device>)")
    args = parser.parse_args(argv)
    blocks = args.blocks.split(",")
    unknown = [b for b in blocks if b not in MIXERS.names()]
    if unknown:
        parser.error(f"--blocks: unknown {unknown}; registered: {', '.join(MIXERS.names())}")
    report = run(SMOKE if args.smoke else SHAPES, blocks, warmup=1, iters=args.iters)
    stem = Path(args.out) if args.out else RESULTS / f"packing-{slug(report['meta']['device'])}"
    write_report(stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
