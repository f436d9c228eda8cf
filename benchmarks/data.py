"""Tokenization and loading of a generated corpus through zoo's sharded, memory-mapped token cache.

``python -m benchmarks.data [--bytes N] [--smoke] [--out DIR]`` writes a corpus of N bytes (default 200M) of random
words as 256 KiB text files, then runs two phases, each in a forked child so its peak RSS is its own:

- ``tokenize``: ``ZooDataModule.prepare_data`` (``datasets.map``, shards streamed to disk);
- ``load``: the training DataLoader over ``np.memmap`` shards (``--loader-batches`` shuffled batches).

Each reports tokens/s, peak RSS (``ru_maxrss``, which counts pages of memory-mapped files the process touched, page
cache the kernel can drop) and peak anonymous RSS (``RssAnon``, sampled every 5 ms: the memory the process itself
holds); ``rss_start_mb`` / ``anon_start_mb`` are the child's at its start (the parent's imports). Byte tokenizer,
``seq_len`` 256, batch 16. Writes ``benchmarks/results/data-<size>.{json,md}`` with the machine and versions.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS, MemorySampler, load_average, machine, peak_rss_mb, process_memory_mb, write_corpus, write_report
from zoo.config import DataConfig
from zoo.data import ResumableBatchSampler, ShardedTokens, TokenWindows, ZooDataModule

SEQ_LEN, BATCH = 256, 16
PHASES = ("tokenize", "load")


def _read(tokens, batches: int, seed: int = 0) -> int:
    windows = TokenWindows(tokens, SEQ_LEN)
    sampler = ResumableBatchSampler(len(windows), BATCH, seed)
    loader = DataLoader(windows, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed))
    seen = 0
    for i, batch in enumerate(loader):
        seen += batch[:, :-1].numel()
        if i + 1 == batches:
            break
    return seen


def _phase(name: str, corpus: Path, cache: Path, num_proc: int, batches: int) -> dict:
    start = process_memory_mb()
    memory = MemorySampler(interval=0.005)
    cfg = DataConfig(source=str(corpus), tokenizer="byte", seq_len=SEQ_LEN, batch_size=BATCH, cache_dir=str(cache), num_proc=num_proc)
    t0 = time.perf_counter()
    dm = ZooDataModule(cfg)
    if name == "tokenize":
        dm.prepare_data()
        tokens = sum(len(ShardedTokens(dm._token_dir(s))) for s in ("train", "validation"))
    else:
        dm.setup()
        tokens = _read(dm.train_tokens, batches)
    seconds = time.perf_counter() - t0
    (peak,) = memory.stop().values()
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds), "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_start_mb": round(start["rss"], 1), "peak_anon_mb": round(peak["anon"], 1), "anon_start_mb": round(start["anon"], 1)}


def _child(conn, *args) -> None:
    try:
        conn.send(_phase(*args))
    except BaseException as err:  # reported in the parent
        conn.send({"error": repr(err)})
    conn.close()


def run_phase(*args) -> dict:
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_child, args=(child, *args))
    proc.start()
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"phase {args[0]}: {result['error']}")
    return result


def _label(n: int) -> str:
    return f"{n // 10**6}M" if n >= 10**6 and n % 10**6 == 0 else str(n)


def markdown(report: dict) -> str:
    m = report["meta"]
    t, r = report["phases"]["tokenize"], report["phases"]["load"]
    lines = [
        f"# Data pipeline, {m['corpus_bytes']:,} bytes ({m['date']})",
        "",
        f"{m['device']}, {m['cpus']} CPUs, {m['memory_gib']} GiB RAM, {m['platform']}; load average {m['loadavg_start']} at "
        f"start, {m['load_average']} at end; python {m['python']}, torch {m['torch']}, datasets {m['datasets']}, numpy "
        f"{m['numpy']}; byte tokenizer, num_proc {m['num_proc']}, loader: {m['loader_batches']} batches of {BATCH} x {SEQ_LEN}.",
        "",
        "| tokenize tok/s | tokenize peak RSS / anon MiB | loader tok/s | loader peak RSS / anon MiB | at start RSS / anon MiB |",
        "|---:|---:|---:|---:|---:|",
        f"| {t['tokens_per_s']:,} | {t['peak_rss_mb']:,} / {t['peak_anon_mb']:,} | {r['tokens_per_s']:,} | "
        f"{r['peak_rss_mb']:,} / {r['peak_anon_mb']:,} | {r['rss_start_mb']:,} / {r['anon_start_mb']:,} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=200 * 10**6, help="corpus size in bytes (default 200M)")
    parser.add_argument("--smoke", action="store_true", help="a 300 KB corpus of 4 KiB files and 5 loader batches")
    parser.add_argument("--loader-batches", type=int, default=2000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="corpus and caches (default: a temporary folder)")
    args = parser.parse_args(argv)
    n_bytes, batches = (300_000, 5) if args.smoke else (args.bytes, args.loader_batches)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="zoo-data-bench-", dir=args.workdir))
    try:
        corpus = work / "corpus"
        written, _ = write_corpus(corpus, n_bytes, doc_bytes=4096 if args.smoke else 256 * 1024)
        load_start = load_average()
        phases = {}
        for name in PHASES:
            phases[name] = run_phase(name, corpus, work / "cache", args.num_proc, batches)
            print(f"{name}: {phases[name]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {**machine(packages=("datasets", "numpy")), "corpus_bytes": written, "num_proc": args.num_proc,
            "loader_batches": batches, "loadavg_start": load_start}
    report = {"meta": meta, "phases": phases}
    write_report(args.out / f"data-{'smoke' if args.smoke else _label(written)}", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
