"""A new user's first real run, measured: a local parquet corpus, a tokenizer with more than 65,536 ids, two DDP
ranks on CPU, TensorBoard and CSV logging, an exact resume; memory per rank at two corpus sizes.

``python -m benchmarks.train_at_scale [--sizes 50M,200M] [--steps 40] [--smoke] [--out DIR]``. For each size:

1. writes the corpus as parquet files (a ``text`` column; random words, ``benchmarks.common.write_corpus``) and a
   WordLevel ``tokenizer.json`` of 70,000 ids whose corpus words have ids 65,000-69,999 (so uint16 storage would wrap);
2. ``first``: ``python -m zoo.train`` tokenizes (``data.num_proc=2``) and trains ``--steps`` steps on 2 ranks
   (``trainer.strategy=ddp``, gloo) with ``trainer.logger=[csv,tensorboard]``;
3. ``cached``: the same run again from the token cache: its per-rank peaks are the training memory alone;
4. ``resumed``: half the steps, then ``resume=auto`` to the end: its ``metrics.csv`` must equal ``cached``'s.

Memory: every process of the run is sampled every 50 ms from ``/proc`` (``RssAnon``: memory the process holds;
``VmRSS``: that plus touched pages of memory-mapped token shards and shared libraries, which the kernel can drop).
Ranks are told apart by ``LOCAL_RANK`` in their environment; other processes (tokenizer pool, data workers) are
reported as workers. Writes ``benchmarks/results/train-at-scale.{json,md}`` with the machine and versions.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, MemorySampler, load_average, machine, write_corpus, write_report

VOCAB = 70_000
WORD_IDS_FROM = 65_000  # the corpus words' ids: 65,000 .. 69,999, most of them beyond uint16
SIZES = {"50M": 50_000_000, "200M": 200_000_000}


def write_parquet_corpus(directory: Path, n_bytes: int, rows_per_file: int = 1024, doc_bytes: int = 16 * 1024) -> tuple[int, list[str]]:
    """``n_bytes`` of text as parquet files of ``rows_per_file`` documents of ``doc_bytes``; returns (files, every word
    the corpus can contain)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text_dir = directory.with_name(directory.name + "-text")
    _, words = write_corpus(text_dir, n_bytes, doc_bytes=doc_bytes)
    docs = sorted(text_dir.glob("*.txt"))
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(docs), rows_per_file):
        texts = [p.read_text() for p in docs[i : i + rows_per_file]]
        pq.write_table(pa.table({"text": texts}), directory / f"part-{i // rows_per_file:05d}.parquet")
    shutil.rmtree(text_dir)
    return len(list(directory.glob("*.parquet"))), words


def write_tokenizer(path: Path, words: list[str]) -> None:
    """A WordLevel tokenizer.json of ``VOCAB`` ids: unused fillers, then the corpus words from ``WORD_IDS_FROM``; the
    rare fragment (a document's last word, cut at its byte size) is unknown, id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if len(words) > VOCAB - WORD_IDS_FROM:
        raise ValueError(f"{len(words)} corpus words do not fit in ids {WORD_IDS_FROM}..{VOCAB - 1}")
    vocab = {f"<unused{i}>": i for i in range(WORD_IDS_FROM)}
    vocab.update({w: WORD_IDS_FROM + i for i, w in enumerate(words)})
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unused0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def process_label(root: int):
    """Names the processes of a run: ``rank 0`` (the root), ``rank 1`` (``LOCAL_RANK=1`` in a zoo.train process's
    environment), else ``worker`` (tokenizer pool, data workers)."""

    def label(pid: int) -> str:
        if pid == root:
            return "rank 0"
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return "worker"
        return "rank 1" if b"LOCAL_RANK=1" in env and b"zoo.train" in cmdline else "worker"

    return label


def tree_memory(root: int, interval: float = 0.05) -> MemorySampler:
    return MemorySampler(root, interval, tree=True, label=process_label(root))


def peaks_by_label(peaks: dict[int, dict]) -> dict[str, dict]:
    """:meth:`MemorySampler.stop`'s peaks per label: ranks by rank, workers merged (the largest, and how many)."""
    out: dict[str, dict] = {}
    for entry in peaks.values():
        slot = out.setdefault(entry["label"], {"processes": 0, "peak_anon_mb": 0.0, "peak_rss_mb": 0.0})
        slot["processes"] += 1
        slot["peak_anon_mb"] = round(max(slot["peak_anon_mb"], entry["anon"]), 1)
        slot["peak_rss_mb"] = round(max(slot["peak_rss_mb"], entry["rss"]), 1)
    return out


def run_train(overrides: list[str], cwd: Path, log: Path) -> dict:
    """``python -m zoo.train`` with ``overrides``; returns its seconds and per-process memory peaks."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zoo.train", *overrides], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        memory = tree_memory(proc.pid)
        code = proc.wait()
    peaks = peaks_by_label(memory.stop())
    if code != 0:
        raise RuntimeError(f"zoo.train exited with {code}; see {log}:\n" + log.read_text()[-3000:])
    return {"seconds": round(time.perf_counter() - start, 1), "memory": peaks}


def metrics_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def tensorboard_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    accumulator.Reload()
    return sorted(accumulator.Tags()["scalars"])


def run_size(label: str, n_bytes: int, steps: int, work: Path, model: list[str]) -> dict:
    root = work / label
    corpus = root / "corpus"
    started = time.perf_counter()
    files, words = write_parquet_corpus(corpus, n_bytes)
    tokenizer = root / "tokenizer.json"
    write_tokenizer(tokenizer, words)
    base = [
        "recipe=transformer_small", f"data.source={corpus}", f"data.tokenizer={tokenizer}", f"data.cache_dir={root / 'cache'}",
        "data.num_proc=2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.logger=[csv,tensorboard]", "trainer.progress_bar=false", f"trainer.val_every={steps // 2}", "trainer.log_every=1",
        *model,
    ]
    result: dict = {"bytes": n_bytes, "parquet_files": files, "corpus_seconds": round(time.perf_counter() - started, 1)}
    runs = {
        "first": [*base, f"output_dir={root / 'first'}", f"trainer.max_steps={steps}"],
        "cached": [*base, f"output_dir={root / 'cached'}", f"trainer.max_steps={steps}"],
        "resumed_half": [*base, f"output_dir={root / 'resumed'}", f"trainer.max_steps={steps // 2}"],
        "resumed": [*base, f"output_dir={root / 'resumed'}", f"trainer.max_steps={steps}", "resume=auto"],
    }
    for name, overrides in runs.items():
        result[name] = run_train(overrides, root, root / f"{name}.log")
    index = json.loads(next((root / "cache").glob("tokens/*-train/index.json")).read_text())
    result["tokens"] = {"train": index["tokens"], "dtype": index["dtype"], "shards": len(index["shards"])}
    cached, resumed = metrics_rows(root / "cached"), metrics_rows(root / "resumed")
    timing = "tokens_per_s"  # wall-clock throughput, the one column that differs between identical runs
    same = [{k: v for k, v in r.items() if k != timing} for r in resumed] == [{k: v for k, v in r.items() if k != timing} for r in cached]
    result["resume_exact"] = len(cached) == steps and same
    result["tensorboard_scalars"] = tensorboard_tags(root / "cached")
    result["csv_logger_rows"] = len(list(csv.DictReader((root / "cached" / "logs" / "csv" / "metrics.csv").open())))
    result["final_val_loss"] = float([r for r in cached if r["val_loss"]][-1]["val_loss"])
    return result


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Training at scale on CPU: parquet corpus, 70,000-id tokenizer, 2 DDP ranks",
        "",
        f"Machine: {meta['device']}, {meta['cpus']} cores, {meta['memory_gib']} GiB; load average at start "
        f"{meta['load_start']}, at end {meta['load_average']}. "
        f"torch {meta['torch']}, lightning {meta['lightning']}, datasets {meta['datasets']}; {meta['date']}. "
        f"Model: {' '.join(meta['model'])}; {meta['steps']} steps. Command: `{meta['command']}`.",
        "",
        "Peak memory per process in MiB, `RssAnon` (held by the process) / `VmRSS` (plus touched pages of mapped token "
        "shards and libraries). `first` tokenizes then trains; `cached` trains from the token cache; workers: the "
        "tokenizer pool. Most of a rank's memory is the model's step, not the data: the logits of one batch alone are "
        "batch x seq_len x 70,003 fp32 values (4 x 128 x 70,003 x 4 bytes = 137 MiB), and the loss keeps more of that size.",
        "",
        "| corpus | tokens (dtype, shards) | run | seconds | rank 0 | rank 1 | workers |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(memory: dict, label: str) -> str:
        if label not in memory:
            return "-"
        m = memory[label]
        n = f" ({m['processes']})" if label == "worker" else ""
        return f"{m['peak_anon_mb']:,.0f} / {m['peak_rss_mb']:,.0f}{n}"

    for label, size in report["sizes"].items():
        tokens = f"{size['tokens']['train']:,} ({size['tokens']['dtype']}, {size['tokens']['shards']})"
        for run in ("first", "cached"):
            r = size[run]
            lines.append(f"| {label} | {tokens} | {run} | {r['seconds']} | {cell(r['memory'], 'rank 0')} | {cell(r['memory'], 'rank 1')} | {cell(r['memory'], 'worker')} |")
    lines += ["", "| corpus | resume (half, then resume=auto) equals the uninterrupted run | TensorBoard scalars | CSV logger rows | final val_loss |", "|---|---|---|---|---|"]
    for label, size in report["sizes"].items():
        lines.append(f"| {label} | {size['resume_exact']} | {', '.join(size['tensorboard_scalars'])} | {size['csv_logger_rows']} | {size['final_val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_at_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50M,200M", help=f"comma-separated corpus sizes from {list(SIZES)}, or byte counts")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="2 MB corpus, 4 steps, written as train-at-scale-smoke")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args(argv)
    sizes = {"2M": 2_000_000} if args.smoke else {s: SIZES.get(s) or int(s) for s in args.sizes.split(",")}
    steps = 4 if args.smoke else args.steps
    model = ["model.d_model=64", "model.n_layers=2", "data.seq_len=128", "data.batch_size=4", "data.val_batches=2"]
    work = args.work or Path(tempfile.mkdtemp(prefix="zoo-scale-"))
    load_start = load_average()
    command = "python -m benchmarks.train_at_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        results = {label: run_size(label, n, steps, work, model) for label, n in sizes.items()}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    meta = {**machine(packages=("lightning", "datasets")), "load_start": load_start, "model": model, "steps": steps, "command": command}
    report = {"meta": meta, "sizes": results}
    write_report(args.out / ("train-at-scale-smoke" if args.smoke else "train-at-scale"), report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
