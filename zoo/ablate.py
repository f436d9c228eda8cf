"""``python -m zoo.ablate recipe=NAME blocks=[attention,mamba2,...] [key.path=value ...] [--params N] [--lrs 1e-3,3e-3] [--eval-tasks T1,T2]``

Trains the same recipe once per block type (every layer that block; FFN, data, optimizer and schedule unchanged),
each at the width whose parameter count is closest to the recipe's own (or to ``--params N``): ``d_model`` runs over
multiples of 8 up to 4x the recipe's, and widths the block's config rejects (head sizes) are skipped.
``--lrs``: each block is trained once per learning rate and its row is the best run (highest val_acc on synthetic
tasks, else lowest val_loss), as Zoology reports; the ``lr`` column names it and ``val_by_lr`` lists every run.
Writes ``<output_dir>/ablation.{md,csv}`` (one row per block), ``ablation_curves.{md,png}`` (each block's validation
metric at every validation step) and each run under ``<output_dir>/<block>/`` (with
``--lrs``: ``<output_dir>/<block>/lr<LR>/``). MQAR rows carry ``val_acc_floor``, the no-recall accuracy
(:func:`zoo.synthetic.no_recall_floor`). ``--eval-tasks``: each block's (best) checkpoint is then judged on
lm-evaluation-harness tasks as ``python -m zoo.eval --tasks`` does (``--eval-include-path``, ``--eval-limit``,
``--eval-batch-size`` as its options; results also in the run's ``eval/lm_eval.{json,md}``), one column per task and
metric (``task:metric``). A block whose run fails gets a row with its error; the others still run.
"""
from __future__ import annotations

import csv
import importlib.util
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.cli import ArgumentParser, run_main, split_recipe_args
from zoo.config import ModelConfig, Recipe
from zoo.errors import ConfigError, ZooError
from zoo.layers import MIXERS
from zoo.recipe_loader import load_recipe

USAGE = ("usage: python -m zoo.ablate recipe=NAME blocks=[attention,mamba2,...] [key.path=value ...] [--params N] [--lrs LR,LR,...] "
         "[--eval-tasks T1,T2 [--eval-include-path DIR] [--eval-limit N] [--eval-batch-size N]]")
WIDTH_STEP = 8
COLUMNS = [
    "block", "d_model", "parameters", "lr", "val_loss", "val_ppl", "val_acc", "val_acc_floor", "val_by_lr", "tokens_per_s",
    "peak_memory_mb", "state_per_token", "state_fixed", "error",
]


@dataclass
class EvalTasks:
    """lm-evaluation-harness tasks each block's checkpoint is judged on (``zoo.eval --tasks``'s options)."""

    tasks: list[str]
    include_path: str | None = None
    limit: float | None = None
    batch_size: int = 8


@dataclass
class AblationArgs:
    recipe: str
    blocks: list[str]
    overrides: list[str]
    target_params: int | None
    lrs: list[float] | None = None
    evaluation: EvalTasks | None = None


def parse_args(argv: list[str]) -> AblationArgs:
    parser = ArgumentParser(prog="python -m zoo.ablate", usage=USAGE[len("usage: "):], description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="recipe=NAME, blocks=[...], then key.path=value overrides")
    parser.add_argument("--params", type=int, default=None, help="target parameter count (default: the recipe's)")
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates: each block's row is its best run")
    parser.add_argument("--eval-tasks", default=None, help="lm-evaluation-harness tasks, comma-separated: a column each")
    parser.add_argument("--eval-include-path", default=None, help="a directory of extra task YAMLs (--eval-tasks)")
    parser.add_argument("--eval-limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    evaluation = None
    if args.eval_tasks is not None:
        tasks = [t for t in args.eval_tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError("--eval-tasks", f"expected comma-separated task names, got {args.eval_tasks!r}")
        if args.eval_batch_size < 1:
            raise ConfigError("--eval-batch-size", f"must be >= 1, got {args.eval_batch_size}")
        evaluation = EvalTasks(tasks, args.eval_include_path, args.eval_limit, args.eval_batch_size)
    elif args.eval_include_path is not None or args.eval_limit is not None:
        raise ConfigError("--eval-tasks", "--eval-include-path / --eval-limit need --eval-tasks")
    blocks = [s.split("=", 1)[1] for s in args.settings if s.startswith("blocks=")]
    recipe, overrides = split_recipe_args([s for s in args.settings if not s.startswith("blocks=")], USAGE)
    if not blocks:
        raise ZooError(f"no blocks given\n{USAGE}")
    parsed = yaml.safe_load(blocks[-1])
    names = [str(b) for b in (parsed if isinstance(parsed, list) else [parsed])]
    for i, name in enumerate(names):
        MIXERS.get(name, f"blocks[{i}]")
    return AblationArgs(recipe, names, overrides, args.params, parse_lrs(args.lrs) if args.lrs is not None else None, evaluation)


def parse_lrs(text: str) -> list[float]:
    """``1e-3,3e-3`` -> ``[0.001, 0.003]``: positive numbers, at least one."""
    try:
        lrs = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError("--lrs", f"expected comma-separated numbers, got {text!r}") from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ConfigError("--lrs", f"expected positive learning rates, got {text!r}")
    return lrs


def model_stats(model_cfg: ModelConfig) -> dict[str, int]:
    """Parameter count and per-sequence state sizes (summed over layers) of the model, built on the meta device."""
    import torch

    from zoo.modeling import ZooForCausalLM

    with torch.device("meta"):
        model = ZooForCausalLM.from_spec(model_cfg)
    mixers = [layer.mixer for layer in model.model.layers]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_per_token": sum(m.state_size_per_token() for m in mixers),
        "state_fixed": sum(m.state_size() for m in mixers),
    }


def with_block(model_cfg: ModelConfig, block: str, d_model: int) -> ModelConfig:
    """``model_cfg`` with every layer ``block`` at width ``d_model`` (other blocks' sections dropped, FFNs kept)."""
    tree = model_cfg.to_dict()
    for name in MIXERS.names():
        if name != block:
            tree.pop(name, None)
    tree.update(blocks=[block], d_model=d_model)
    return ModelConfig.from_dict(tree)


def matched_width(model_cfg: ModelConfig, block: str, target: int) -> tuple[ModelConfig, dict[str, int]]:
    """The valid width whose parameter count is closest to ``target``, and that model's stats."""
    best = None
    first_error = None
    for d_model in range(WIDTH_STEP, 4 * model_cfg.d_model + 1, WIDTH_STEP):
        try:
            candidate = with_block(model_cfg, block, d_model)
        except ConfigError as err:
            first_error = first_error or err
            continue
        stats = model_stats(candidate)
        gap = abs(stats["parameters"] - target)
        if best is None or gap < best[0]:
            best = (gap, candidate, stats)
        if stats["parameters"] >= target:
            break  # parameters grow with the width: wider ones are further away
    if best is None:
        raise ConfigError("model.d_model", f"no width up to {4 * model_cfg.d_model} is valid for block '{block}': {first_error}")
    return best[1], best[2]


class PeakMemory:
    """Peak memory of a run: CUDA's max allocated bytes, or on CPU the peak resident-set growth over the start,
    sampled every 20 ms from /proc/self/statm (None where that file does not exist)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self._stop = threading.Event()
        self._peak = self._start = 0

    @staticmethod
    def _rss() -> int | None:
        import os

        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._rss() or 0)

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._start = self._peak = self._rss() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.cuda:
            self._stop.set()
            self._thread.join()

    def megabytes(self) -> float | None:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if not self._start:
            return None
        return (self._peak - self._start) / 2**20


def vocab_size(recipe: Recipe) -> int:
    from zoo.data import ZooDataModule

    return recipe.model.vocab_size or len(ZooDataModule(recipe.data, seed=recipe.seed).load_tokenizer())


def training_tokens_per_s(metrics_csv: Path) -> float | None:
    """Median of the logged training throughputs (metrics.csv leaves validation time out; the first row, which
    holds the warm-up steps, is skipped when there are others)."""
    with metrics_csv.open() as f:
        rates = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]]
    rates = sorted(rates[1:] if len(rates) > 1 else rates)
    return rates[len(rates) // 2] if rates else None


def last_logged(metrics_csv: Path, key: str) -> float | None:
    """The last value of column ``key`` in metrics.csv (None when never logged)."""
    with metrics_csv.open() as f:
        values = [r[key] for r in csv.DictReader(f) if r.get(key)]
    return float(values[-1]) if values else None


def train_one(base: Recipe, model_cfg: ModelConfig, run_dir: Path, name: str, lr: float) -> dict[str, Any]:
    """One training run of the ablation: its metrics for the table row."""
    from zoo.train import train

    tree = {**base.to_dict(), "model": model_cfg.to_dict(), "output_dir": str(run_dir), "name": name}
    tree["optimizer"] = {**tree["optimizer"], "lr": lr}
    with PeakMemory() as memory:
        summary = train(Recipe.from_dict(tree))
    return {
        "run_dir": str(run_dir), "lr": lr, "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "val_acc": summary.get("val_acc"),
        "val_acc_floor": last_logged(run_dir / "metrics.csv", "val_acc_floor"),
        "tokens_per_s": training_tokens_per_s(run_dir / "metrics.csv") or summary["tokens_per_s"],
        "peak_memory_mb": memory.megabytes(),
    }


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the highest val_acc (synthetic tasks), else the lowest val_loss; the first of equals."""
    if all(run["val_acc"] is not None for run in runs):
        return max(runs, key=lambda run: run["val_acc"])
    return min(runs, key=lambda run: run["val_loss"])


def run_block(base: Recipe, block: str, target: int, out: Path, lrs: list[float] | None = None) -> dict[str, Any]:
    """Train ``base`` with every layer ``block`` at the matched width (once per learning rate in ``lrs``, else at the
    recipe's); the table row of the best run (errors recorded, not raised)."""
    row: dict[str, Any] = {"block": block}
    try:
        model_cfg, stats = matched_width(base.model, block, target)
        row.update(d_model=model_cfg.d_model, **stats)
        if lrs is None:
            row.update(train_one(base, model_cfg, out / block, f"{base.name}-{block}", base.optimizer.lr))
        else:
            runs = [train_one(base, model_cfg, out / block / f"lr{lr:g}", f"{base.name}-{block}-lr{lr:g}", lr) for lr in lrs]
            row.update(best_run(runs))
            metric = "val_acc" if runs[0]["val_acc"] is not None else "val_loss"
            row["val_by_lr"] = " ".join(f"{run['lr']:g}:{run[metric]:.4f}" for run in runs)
    except Exception as err:  # noqa: BLE001 - one failing block must not stop the ablation
        row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        print(f"zoo.ablate: {block} failed:\n{traceback.format_exc()}", file=sys.stderr)
    return row


def task_columns(run_dir: Path, evaluation: EvalTasks) -> dict[str, float]:
    """``{"task:metric": value}`` of the run's checkpoint on ``evaluation``'s tasks (standard errors left out; the
    whole result in ``<run_dir>/eval/lm_eval.{json,md}``, as ``zoo.eval`` writes it)."""
    import torch

    from zoo.eval import eval_dir, load_causal_lm, metric_values, run_tasks, write_task_results

    model, tokenizer = load_causal_lm(run_dir / "hf", "cuda" if torch.cuda.is_available() else "cpu")
    results = run_tasks(model, tokenizer, evaluation.tasks, include_path=evaluation.include_path,
                        batch_size=evaluation.batch_size, limit=evaluation.limit)
    write_task_results(eval_dir(run_dir / "hf"), results)
    return {f"{task}:{metric}": value for task, metric, value, _ in metric_values(results)}


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """:data:`COLUMNS`, then the task columns (``task:metric``) in the order the rows first have them."""
    extra = [key for row in rows for key in row if key not in COLUMNS and key != "run_dir"]
    return COLUMNS + list(dict.fromkeys(extra))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if 0 < abs(value) < 1e-3:
            return f"{value:g}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in columns_of(rows) if any(row.get(c) is not None for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ablate(base: Recipe, blocks: list[str], target_params: int | None = None, lrs: list[float] | None = None,
           evaluation: EvalTasks | None = None) -> list[dict[str, Any]]:
    """Run the ablation (each block's checkpoint then judged on ``evaluation``'s tasks); writes
    ``<output_dir>/ablation.{md,csv}`` and returns the rows."""
    if evaluation is not None:  # unknown tasks fail before any training
        from zoo.eval import task_manager

        task_manager(evaluation.tasks, evaluation.include_path, "--eval-tasks")
    out = Path(base.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base.with_vocab_size(vocab_size(base))
    target = target_params or model_stats(base.model)["parameters"]
    rows = []
    for block in blocks:
        start = time.perf_counter()
        row = run_block(base, block, target, out, lrs)
        if evaluation is not None and row.get("run_dir") and not row.get("error"):
            try:
                row.update(task_columns(Path(row["run_dir"]), evaluation))
            except Exception as err:  # noqa: BLE001 - the row keeps its training metrics
                row["error"] = f"--eval-tasks: {type(err).__name__}: {err}".splitlines()[0]
                print(f"zoo.ablate: {block} evaluation failed:\n{traceback.format_exc()}", file=sys.stderr)
        rows.append(row)
        print(f"zoo.ablate: {block} done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        columns = columns_of(rows)
        with (out / "ablation.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: _cell(row.get(c)) for c in columns} for row in rows)
        header = (
            f"Ablation of recipe `{base.name}`: every layer one block type, width matched to {target:,} parameters; "
            f"{base.trainer.max_steps} steps each"
            + (f", best of learning rates {', '.join(f'{lr:g}' for lr in lrs)} (val_by_lr: every run)" if lrs else "")
            + ". state_per_token / state_fixed: state elements per sequence (summed over layers) that grow with each "
            "token / stay constant. val_acc_floor: the accuracy reachable without recall."
            + (f" task:metric: lm-evaluation-harness on each block's checkpoint ({', '.join(evaluation.tasks)}; per run in "
               "eval/lm_eval.md)." if evaluation is not None else "") + "\n\n"
        )
        (out / "ablation.md").write_text(header + markdown_table(rows))
        write_curves(rows, out)
    return rows


def validation_curve(metrics_csv: Path, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every validation row of a run's metrics.csv."""
    with metrics_csv.open() as f:
        return [(int(r["step"]), float(r[metric])) for r in csv.DictReader(f) if r.get(metric)]


def write_curves(rows: list[dict[str, Any]], out: Path) -> dict[str, list[tuple[int, float]]]:
    """Each block's validation curve (of its best run): ``ablation_curves.md`` (a column per validation step) and,
    with matplotlib, ``ablation_curves.png``. The metric is val_acc when every run has it, else val_loss."""
    runs = [row for row in rows if row.get("run_dir")]
    metric = "val_acc" if runs and all(row.get("val_acc") is not None for row in runs) else "val_loss"
    curves = {row["block"]: validation_curve(Path(row["run_dir"]) / "metrics.csv", metric) for row in runs}
    steps = sorted({step for curve in curves.values() for step, _ in curve})
    lines = [
        f"Validation {metric} of each block's run at every validation step (the table in ablation.md is the last column).",
        "",
        "| block | " + " | ".join(f"step {step}" for step in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for block, curve in curves.items():
        values = dict(curve)
        lines.append(f"| {block} | " + " | ".join(f"{values[step]:.4f}" if step in values else "" for step in steps) + " |")
    (out / "ablation_curves.md").write_text("\n".join(lines) + "\n")
    if importlib.util.find_spec("matplotlib") is not None and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for block, curve in curves.items():
            if curve:
                ax.plot(*zip(*curve), marker="o", label=block)
        ax.set(xlabel="optimizer step", ylabel=metric, title=f"zoo.ablate: {out.name}")
        ax.legend(fontsize=8)
        fig.savefig(out / "ablation_curves.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    return curves


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        args = parse_args(argv)
        base = load_recipe(args.recipe, args.overrides)
        rows = ablate(base, args.blocks, args.target_params, args.lrs, args.evaluation)
        print(markdown_table(rows), end="")
        print(f"zoo.ablate: table in {Path(base.output_dir) / 'ablation.md'} and ablation.csv")

    return run_main("zoo.ablate", body)


if __name__ == "__main__":
    sys.exit(main())
