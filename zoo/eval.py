"""``python -m zoo.eval CHECKPOINT [CHECKPOINT ...] (--loss-by-position | --tasks T1,T2) [options]``: judge checkpoints.

CHECKPOINT is a Hugging Face directory written by ``zoo.train`` (``<output_dir>/hf``) or the run directory holding it.
Results go to ``--out`` or else beside the (first) checkpoint: ``<run>/eval/`` for ``<run>/hf``, ``<dir>/eval/`` otherwise.

``--loss-by-position``: mean next-token loss per position bucket over ``--windows`` windows of ``--max-length`` tokens
of the validation corpus, also beyond the training ``seq_len``. The corpus is the run's (``recipe.yaml`` beside
``hf/``: same source, same tokenization) or ``--data FILE`` (UTF-8 text, tokenized with the checkpoint's tokenizer).
``--bucket B`` tokens per bucket (default max-length / 32); ``--chunk C`` feeds each window C tokens at a time,
carrying the model's cache (a recurrent model's memory stays flat; attention's KV cache grows); default one pass.
Writes ``loss_by_position.json``, ``.md`` (one column per checkpoint) and ``.png`` (one line per checkpoint; dashed:
each training ``seq_len``; needs matplotlib).

``--tasks``: lm-evaluation-harness tasks (the ``eval`` extra: ``pip install 'zoo[eval]'``), comma-separated; the loaded
zoo model is handed to the harness's ``HFLM`` as a causal LM (log-likelihood requests right-padded, which a causal
model ignores; greedy generation left-padded with an attention mask, as ``zoo.generate``). ``--include-path DIR``:
extra task YAMLs (local tasks); ``--limit``, ``--num-fewshot``, ``--batch-size``, ``--bootstrap-iters`` as the
harness (bootstrapped standard errors, e.g. perplexity's, are drawn in this process: the harness's forked pool of
workers inherits this process's signal handlers and locks, and one such worker hung a CI run). Writes ``lm_eval.json`` and ``lm_eval.md`` per
checkpoint (in ``--out/<name>/`` with ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import torch
import torch.nn.functional as F

from zoo.cli import ArgumentParser, run_main
from zoo.errors import ZooError
from zoo.generate import resolve_checkpoint


def eval_dir(checkpoint: Path) -> Path:
    """Where results for ``checkpoint`` go by default: ``<run>/eval`` for ``<run>/hf``, else ``<checkpoint>/eval``."""
    return (checkpoint.parent if checkpoint.name == "hf" else checkpoint) / "eval"


def run_recipe(checkpoint: Path):
    """The :class:`~zoo.config.Recipe` of the run that wrote ``checkpoint`` (its ``recipe.yaml``), or None."""
    path = checkpoint.parent / "recipe.yaml"
    if checkpoint.name != "hf" or not path.is_file():
        return None
    from zoo.recipe_loader import load_recipe

    return load_recipe(str(path))


def load_causal_lm(checkpoint: Path, device: str):
    """The zoo causal LM and tokenizer of ``checkpoint``; masked-diffusion checkpoints are refused."""
    import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zoo.config import check_config_file

    check_config_file(checkpoint)
    if getattr(AutoConfig.from_pretrained(checkpoint), "diffusion", None) is not None:
        raise ZooError(f"'{checkpoint}' is a masked-diffusion checkpoint; zoo.eval judges causal language models")
    model = AutoModelForCausalLM.from_pretrained(checkpoint).to(device).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def validation_tokens(checkpoint: Path, tokenizer, data: str | None, limit: int) -> np.ndarray:
    """The first ``limit`` token ids (1-D): ``data`` (a text file) tokenized with ``tokenizer``, or the run's validation split."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise ZooError(f"--data: no such file '{path}'")
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        return np.asarray(ids[:limit], dtype=np.int64)
    recipe = run_recipe(checkpoint)
    if recipe is None:
        raise ZooError(f"'{checkpoint}' has no recipe.yaml beside it (not a zoo.train run): give the corpus with --data FILE")
    if recipe.data.task is not None:
        raise ZooError(f"the run of '{checkpoint}' trained on the synthetic task '{recipe.data.source}'; give a text corpus with --data FILE")
    from zoo.data import ZooDataModule

    module = ZooDataModule(recipe.data, seed=recipe.seed)
    module.setup()
    return np.asarray(module.val_tokens[: min(limit, len(module.val_tokens))], dtype=np.int64)


def token_windows(tokens: np.ndarray, max_length: int, windows: int) -> torch.Tensor:
    """Up to ``windows`` consecutive, non-overlapping windows ``[W, max_length + 1]`` (inputs and their next tokens)."""
    count = min(windows, len(tokens) // (max_length + 1))
    if count == 0:
        raise ZooError(f"the corpus has {len(tokens)} tokens, fewer than --max-length + 1 = {max_length + 1}")
    return torch.from_numpy(tokens[: count * (max_length + 1)].copy()).view(count, max_length + 1)


@torch.no_grad()
def position_losses(model, windows: torch.Tensor, chunk: int | None = None, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss ``[N]`` at each position of ``windows [W, N + 1]``. ``chunk``: feed C tokens per call,
    continuing the model's cache (the block contract's state), instead of the whole window in one forward."""
    from zoo.compat import output_cache

    n = windows.shape[1] - 1
    total = torch.zeros(n, dtype=torch.float64)
    step = chunk or n
    for rows in windows.split(batch_size):
        rows = rows.to(model.device)
        inputs, targets = rows[:, :-1], rows[:, 1:]  # each [b, N]
        cache = None
        for start in range(0, n, step):
            out = model(inputs[:, start : start + step], past_key_values=cache, use_cache=chunk is not None)
            cache = output_cache(out) if chunk is not None else None
            logits = out.logits.float()  # [b, c, V]
            loss = F.cross_entropy(logits.transpose(1, 2), targets[:, start : start + step], reduction="none")  # [b, c]
            total[start : start + step] += loss.sum(0).double().cpu()
    return total / windows.shape[0]


def bucket_means(losses: torch.Tensor, bucket: int) -> list[dict[str, float]]:
    """``losses [N]`` averaged over consecutive buckets of ``bucket`` positions: ``[{start, end, loss}]`` (end exclusive)."""
    return [
        {"start": s, "end": min(s + bucket, len(losses)), "loss": float(losses[s : s + bucket].mean())}
        for s in range(0, len(losses), bucket)
    ]


def loss_by_position(args: argparse.Namespace, checkpoints: list[Path], labels: list[str]) -> dict[str, Any]:
    """The ``--loss-by-position`` results of every checkpoint (see the module docstring)."""
    bucket = args.bucket or max(1, args.max_length // 32)
    runs = []
    for checkpoint, label in zip(checkpoints, labels):
        model, tokenizer = load_causal_lm(checkpoint, args.device)
        tokens = validation_tokens(checkpoint, tokenizer, args.data, args.windows * (args.max_length + 1))
        windows = token_windows(tokens, args.max_length, args.windows)
        losses = position_losses(model, windows, args.chunk, args.batch_size)
        recipe = run_recipe(checkpoint)
        runs.append({
            "checkpoint": str(checkpoint), "label": label, "blocks": list(model.config.blocks),
            "seq_len": recipe.data.seq_len if recipe is not None else None, "windows": windows.shape[0],
            "mean_loss": float(losses.mean()), "buckets": bucket_means(losses, bucket),
        })
    return {"max_length": args.max_length, "bucket": bucket, "chunk": args.chunk, "data": args.data, "checkpoints": runs}


def loss_table(result: dict[str, Any]) -> str:
    """Markdown: one row per position bucket, one loss column per checkpoint."""
    runs = result["checkpoints"]
    lines = ["| positions | " + " | ".join(r["label"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for i, b in enumerate(runs[0]["buckets"]):
        lines.append(f"| {b['start']}-{b['end'] - 1} | " + " | ".join(f"{r['buckets'][i]['loss']:.4f}" for r in runs) + " |")
    lines.append("| mean | " + " | ".join(f"{r['mean_loss']:.4f}" for r in runs) + " |")
    seq_lens = ", ".join(f"{r['label']}: {r['seq_len']}" for r in runs if r["seq_len"] is not None)
    notes = f"\nTraining seq_len: {seq_lens}." if seq_lens else ""
    return "\n".join(lines) + f"\n\nWindows per checkpoint: {runs[0]['windows']}; chunk: {result['chunk'] or 'one pass'}.{notes}\n"


def plot_losses(result: dict[str, Any], path: Path) -> bool:
    """Loss per bucket (x: bucket middle) with one line per checkpoint; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in result["checkpoints"]:
        x = [(b["start"] + b["end"] - 1) / 2 for b in run["buckets"]]
        (line,) = ax.plot(x, [b["loss"] for b in run["buckets"]], marker=".", label=run["label"])
        if run["seq_len"] is not None:
            ax.axvline(run["seq_len"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean next-token loss")
    ax.set_title(f"loss by position (dashed: training seq_len; {result['checkpoints'][0]['windows']} windows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


BOOTSTRAP_ITERS = 100_000  # the harness's default


def task_manager(tasks: list[str], include_path: str | None = None, option: str = "--tasks"):
    """The harness's ``TaskManager`` (with the YAMLs of ``include_path``) once every name in ``tasks`` is known to it;
    a ZooError naming ``option`` otherwise, or when lm-evaluation-harness is not installed."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ZooError(f"{option} needs lm-evaluation-harness: pip install 'zoo[eval]' ({err})") from err
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ZooError(f"{option}: unknown task(s) {', '.join(unknown)} (a local task's YAML directory goes in "
                       f"{'--include-path' if option == '--tasks' else '--eval-include-path'})")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str | None = None, batch_size: int = 8,
              limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = False,
              bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """lm-evaluation-harness's ``simple_evaluate`` of ``tasks`` on the loaded zoo ``model`` (through its ``HFLM``);
    ``log_samples``: keep each document's requests and responses (``results["samples"]``); ``bootstrap_iters``:
    resamples per bootstrapped standard error (0: none). The bootstrap runs in this process (the harness's
    ``DISABLE_MULTIPROC``, set only while it runs): its default forks a ``multiprocessing.Pool`` whose workers inherit
    this process's signal handlers and locks; a worker that ignored ``terminate()`` hung a CI run forever."""
    manager = task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tokenizer.padding_side = "left"  # generation requests: left padding with a mask, as zoo.generate
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=str(model.device))
    # The harness bounds generation with max_length; the checkpoint's max_new_tokens (zoo.train exports 64) would win.
    saved, model.generation_config.max_new_tokens = model.generation_config.max_new_tokens, None
    try:
        with patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
            return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    finally:
        model.generation_config.max_new_tokens = saved


def metric_values(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """``(task, metric, value, standard error or None)`` of every numeric metric of the harness's results."""
    values = []
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            values.append((task, metric, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return values


def task_table(results: dict[str, Any]) -> str:
    """Markdown: one row per task and metric (value and standard error)."""
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metric, value, stderr in metric_values(results):
        lines.append(f"| {task} | {metric} | {value:.4f} | {'N/A' if stderr is None else f'{stderr:.4f}'} |")
    return "\n".join(lines) + "\n"


def write_task_results(out: Path, results: dict[str, Any]) -> str:
    """``lm_eval.json`` (the harness's results, versions, shots, sample counts and config) and ``lm_eval.md`` in
    ``out``; returns the table."""
    table = task_table(results)
    write_results(out, "lm_eval", {k: results.get(k) for k in ("results", "versions", "n-shot", "n-samples", "config")}, table)
    return table


def write_results(out: Path, stem: str, result: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(table)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m zoo.eval", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="hf/ directories written by zoo.train, or their run directories")
    parser.add_argument("--loss-by-position", action="store_true", help="mean loss per position bucket")
    parser.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per window (--loss-by-position)")
    parser.add_argument("--bucket", type=int, default=None, help="positions per bucket (default max-length / 32)")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per forward, carrying the cache (default: one pass)")
    parser.add_argument("--windows", type=int, default=16, help="windows of the corpus to average over")
    parser.add_argument("--data", default=None, help="a UTF-8 text file instead of the run's validation split")
    parser.add_argument("--include-path", default=None, help="a directory of extra task YAMLs (--tasks)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bootstrap-iters", type=int, default=BOOTSTRAP_ITERS,
                        help="resamples per bootstrapped standard error (--tasks; 0: none)")
    parser.add_argument("--out", default=None, help="output directory (default: beside the first checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.loss_by_position and not args.tasks:
        raise ZooError("nothing to do: give --loss-by-position and/or --tasks")
    if args.loss_by_position and args.max_length is None:
        raise ZooError("--loss-by-position needs --max-length N")
    for name in ("max_length", "bucket", "chunk", "windows", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ZooError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.bootstrap_iters < 0:
        raise ZooError(f"--bootstrap-iters must be >= 0, got {args.bootstrap_iters}")
    return args


def checkpoint_labels(checkpoints: list[Path]) -> list[str]:
    """Short names: the run directory's name (``<run>`` for ``<run>/hf``), made unique by an index where needed."""
    names = [(c.parent if c.name == "hf" else c).name for c in checkpoints]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        args = parse_args(argv)
        checkpoints = [resolve_checkpoint(c) for c in args.checkpoints]
        labels = checkpoint_labels(checkpoints)
        out = Path(args.out) if args.out else eval_dir(checkpoints[0])
        if args.loss_by_position:
            result = loss_by_position(args, checkpoints, labels)
            table = loss_table(result)
            write_results(out, "loss_by_position", result, table)
            plotted = plot_losses(result, out / "loss_by_position.png")
            print(table + f"written: {out / 'loss_by_position'}.json, .md" + (", .png" if plotted else " (no plot: matplotlib not installed)"))
        if args.tasks:
            tasks = [t for t in args.tasks.split(",") if t]
            for checkpoint, label in zip(checkpoints, labels):
                model, tokenizer = load_causal_lm(checkpoint, args.device)
                results = run_tasks(model, tokenizer, tasks, include_path=args.include_path, batch_size=args.batch_size,
                                    limit=args.limit, num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters)
                where = Path(args.out) / label if args.out else eval_dir(checkpoint)
                table = write_task_results(where, results)
                print(f"{label}\n{table}written: {where / 'lm_eval'}.json, .md")

    return run_main("zoo.eval", body)


if __name__ == "__main__":
    sys.exit(main())
