"""Which PyTorch form of the generalized delta rule trains fastest on CPU: recurrent (hand-written backward) or chunked.

``python -m benchmarks.torch_forms [--recipes ...] [--repeats 5] [--threads N]`` builds each recipe's model (random
weights) at its own batch size and sequence length and times training steps (forward + backward of the loss) with
the ``torch`` backend running the ``dplr_delta_rule`` op (RWKV-7, Gated DeltaNet, KDA and the hybrids built on them) in each
form; the forms alternate ``--repeats`` times in one process after a warm-up step, so their ratio holds on a shared
machine. Tokens/s = batch x seq_len / the median step. The CPU choice (:func:`zoo.kernels.dplr_delta_rule.dplr_delta_rule_torch`) is the
form this measures fastest. ``--smoke``: the recipes at 4 layers, d_model 64, batch 2 x 64 tokens. Writes
``benchmarks/results/torch-forms-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, load_average, machine, median, slug, write_report
from zoo.kernels import dplr_delta_rule as dplr_op
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.recipe_loader import load_recipe

RECIPES = ["rwkv7_small", "gated_deltanet_small", "kda_small", "qwen3_next_small"]
FORMS = {"recurrent": dplr_op.dplr_delta_rule_recurrent, "chunked": dplr_op.dplr_delta_rule_chunked}
VOCAB = ["model.vocab_size=259"]  # the byte tokenizer's vocabulary (the trainer sets it from the tokenizer)
SMOKE = ["model.n_layers=4", "model.d_model=64", "data.batch_size=2", "data.seq_len=64"]  # 4: tiles every pattern


@contextlib.contextmanager
def cpu_form(name: str):
    """The ``torch`` backend of ``dplr_delta_rule`` running form ``name`` on CPU for T > 1 (what it picks is the recurrent one)."""
    saved = dplr_op.dplr_delta_rule_recurrent
    dplr_op.dplr_delta_rule_recurrent = FORMS[name]
    try:
        yield
    finally:
        dplr_op.dplr_delta_rule_recurrent = saved


def run(recipes: list[str], repeats: int, smoke: bool, log) -> dict:
    rows, load_before = {}, load_average()
    for name in recipes:
        recipe = load_recipe(name, VOCAB + (SMOKE if smoke else []))
        torch.manual_seed(0)
        model = ZooForCausalLM(ZooConfig.from_model_config(recipe.model)).train()
        batch, seq_len = recipe.data.batch_size, recipe.data.seq_len
        ids = torch.randint(1, recipe.model.vocab_size, (batch, seq_len))

        def step() -> float:
            start = time.perf_counter()
            model(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {form: [] for form in FORMS}
        losses = {}
        for form in FORMS:  # the same loss from both forms, then one warm-up step each
            with cpu_form(form):
                with torch.no_grad():
                    losses[form] = model(ids, labels=ids, use_cache=False).loss.item()
                step()
        for _ in range(repeats):
            for form in FORMS:
                with cpu_form(form):
                    times[form].append(step())
        tokens = batch * seq_len
        row = {"batch": batch, "seq_len": seq_len, "blocks": list(recipe.model.blocks),
               **{f"{form}_tokens_per_s": round(tokens / median(t), 1) for form, t in times.items()},
               **{f"{form}_s_runs": [round(x, 3) for x in t] for form, t in times.items()},
               "loss_difference": abs(losses["recurrent"] - losses["chunked"])}
        row["recurrent_over_chunked"] = round(row["recurrent_tokens_per_s"] / row["chunked_tokens_per_s"], 2)
        rows[name] = row
        log(f"{name}: {row}")
    meta = {**machine("cpu"), "threads": torch.get_num_threads(), "repeats": repeats, "smoke": smoke}
    meta["load_average"] = [*load_before, *meta["load_average"]]  # before, after
    return {"meta": meta, "results": rows}


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# Delta-rule torch forms on CPU: training tokens/s, {meta['device']}", "",
             f"`python -m benchmarks.torch_forms` on {meta['device']} ({meta['cpus']} CPUs, {meta['threads']} torch threads, "
             f"1-min load average {meta['load_average'][0]} before, {meta['load_average'][3]} after), torch {meta['torch']}, {meta['date']}. Each recipe's model (random weights, fp32) "
             f"at its batch and sequence length; one training step = forward + backward of the loss; the two forms "
             f"alternate {meta['repeats']} times in one process; median step.", "",
             "| recipe | blocks | batch x T | recurrent tok/s | chunked tok/s | recurrent / chunked | recurrent steps s | chunked steps s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        runs = [", ".join(f"{x:g}" for x in r[f"{form}_s_runs"]) for form in FORMS]
        lines.append(f"| {name} | {', '.join(r['blocks'])} | {r['batch']} x {r['seq_len']} | {r['recurrent_tokens_per_s']} | "
                     f"{r['chunked_tokens_per_s']} | {r['recurrent_over_chunked']}x | {runs[0]} | {runs[1]} |")
    lines += ["", "Every step's time is listed: where they spread more than the two forms differ, the ratio says nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="the recipes shrunk (a test)")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/torch-forms-<device>)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.recipes.split(","), args.repeats, args.smoke, lambda line: print(line, flush=True))
    stem = Path(args.out) if args.out else RESULTS / f"torch-forms-{slug(report['meta']['device'])}"
    write_report(stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
