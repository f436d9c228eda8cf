"""Tokenization and loading of a generated corpus: the sharded, memory-mapped cache against the previous in-RAM path.

``python -m benchmarks.data [--bytes N] [--smoke] [--out DIR]`` writes a corpus of N bytes (default 200M) of random
words as 256 KiB text files, then runs four phases, each in a forked child so its peak RSS is its own:

- ``new/tokenize``: ``ZooDataModule.prepare_data`` (``datasets.map``, shards streamed to disk);
- ``new/load``: the training DataLoader over ``np.memmap`` shards;
- ``old/tokenize``: the previous path (documents held in RAM, per-document arrays, one ``np.concatenate``, an
  in-memory ``.npy`` then an atomic write);
- ``old/load``: ``np.load`` of the whole array, then the same DataLoader.

Each reports tokens/s, peak RSS (``ru_maxrss``, which counts pages of memory-mapped files the process touched, page
cache the kernel can drop) and peak anonymous RSS (``RssAnon``, sampled every 5 ms: the memory the process itself
holds); ``rss_start_mb`` / ``anon_start_mb`` are the child's at its start (the parent's imports). The loaders read ``--loader-batches`` shuffled batches. Byte tokenizer, ``seq_len`` 256, batch 16.
Writes ``benchmarks/results/data-<size>.{json,md}`` with the machine, load average and versions.
"""
from __future__ import annotations

import argparse
import datetime
import io
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.report import write_report
from zoo.config import DataConfig
from zoo.corpus import _split
from zoo.data import (
    EOS_TOKEN, ResumableBatchSampler, ShardedTokens, TokenWindows, ZooDataModule, _atomic_write_bytes, byte_tokenizer, local_files,
)

RESULTS = Path(__file__).resolve().parent / "results"
DOC_BYTES = 256 * 1024
SEQ_LEN, BATCH = 256, 16


def corpus_words(rng: np.random.Generator) -> np.ndarray:
    """The 5,000 random lowercase words (2-9 letters, repeats possible) that :func:`generate_corpus` writes."""
    return np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(5000)])


def generate_corpus(directory: Path, n_bytes: int, seed: int = 0, doc_bytes: int = DOC_BYTES) -> int:
    """Files of ``doc_bytes`` (the last one shorter) of lines of random words from a fixed 5,000-word vocabulary
    (:func:`corpus_words` of ``default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    words = corpus_words(rng)
    directory.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < n_bytes:
        size = min(doc_bytes, n_bytes - written)
        idx = rng.integers(0, len(words), size // 4 + 16)
        text = " ".join(words[idx]).replace(words[0], words[0] + "\n")[:size]
        (directory / f"doc{i:06d}.txt").write_text(text)
        written += len(text.encode())
        i += 1
    return written


class AnonPeak:
    """Samples ``RssAnon`` of this process every ``interval`` seconds in a thread; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, self.now(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _config(corpus: Path, cache: Path, num_proc: int) -> DataConfig:
    return DataConfig(source=str(corpus), tokenizer="byte", seq_len=SEQ_LEN, batch_size=BATCH, cache_dir=str(cache), num_proc=num_proc)


def _old_path(cache: Path, split: str) -> Path:
    return cache / "old" / f"{split}.npy"


def old_tokenize(cfg: DataConfig, cache: Path) -> int:
    """The previous path: all documents in RAM, per-document uint16 arrays, one concatenate, an in-memory .npy."""
    files = local_files(cfg.source)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    keys = [str(f.relative_to(root)) for f in files]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    docs = _split(datasets.Dataset.from_dict({"key": keys, "text": texts}), cfg.val_fraction)
    del keys, texts
    eos = byte_tokenizer().convert_tokens_to_ids(EOS_TOKEN)
    total = 0
    for split in ("train", "validation"):
        out = []
        for text in docs[split]["text"]:
            out.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16))
            out.append(np.array([eos], dtype=np.uint16))
        tokens = np.concatenate(out)
        del out
        buf = io.BytesIO()
        np.save(buf, tokens, allow_pickle=False)
        _atomic_write_bytes(_old_path(cache, split), buf.getvalue())
        total += len(tokens)
    return total


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
    start_rss = _rss_mb()
    anon = AnonPeak()
    anon_start = anon.peak
    cfg = _config(corpus, cache, num_proc)
    t0 = time.perf_counter()
    if name == "new/tokenize":
        dm = ZooDataModule(cfg)
        dm.prepare_data()
        tokens = sum(len(ShardedTokens(dm._token_dir(s))) for s in ("train", "validation"))
    elif name == "new/load":
        dm = ZooDataModule(cfg)
        dm.setup()
        tokens = _read(dm.train_tokens, batches)
    elif name == "old/tokenize":
        tokens = old_tokenize(cfg, cache)
    else:
        tokens = _read(np.load(_old_path(cache, "train"), allow_pickle=False), batches)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "rss_start_mb": round(start_rss, 1), "peak_anon_mb": round(anon.stop(), 1), "anon_start_mb": round(anon_start, 1)}


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
    lines = [
        f"# Data pipeline, {m['corpus_bytes']:,} bytes ({m['date']})",
        "",
        f"{m['machine']}; load average {m['loadavg_start']} at start, {m['loadavg_end']} at end; python {m['python']}, torch "
        f"{m['torch']}, datasets {m['datasets']}, numpy {m['numpy']}; byte tokenizer, num_proc {m['num_proc']}, "
        f"loader: {m['loader_batches']} batches of {BATCH} x {SEQ_LEN}.",
        "",
        "| path | tokenize tok/s | tokenize peak RSS / anon MiB | loader tok/s | loader peak RSS / anon MiB | at start RSS / anon MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path in ("new", "old"):
        t, r = report["phases"][f"{path}/tokenize"], report["phases"][f"{path}/load"]
        lines.append(
            f"| {path} | {t['tokens_per_s']:,} | {t['peak_rss_mb']:,} / {t['peak_anon_mb']:,} | {r['tokens_per_s']:,} | "
            f"{r['peak_rss_mb']:,} / {r['peak_anon_mb']:,} | {r['rss_start_mb']:,} / {r['anon_start_mb']:,} |"
        )
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
        written = generate_corpus(corpus, n_bytes, doc_bytes=4096 if args.smoke else DOC_BYTES)
        load_start = os.getloadavg()
        phases = {}
        for name in ("new/tokenize", "new/load", "old/tokenize", "old/load"):
            phases[name] = run_phase(name, corpus, work / "cache", args.num_proc, batches)
            print(f"{name}: {phases[name]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "datasets": datasets.__version__, "numpy": np.__version__,
            "corpus_bytes": written, "num_proc": args.num_proc, "loader_batches": batches,
            "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "phases": phases,
    }
    write_report(args.out / f"data-{'smoke' if args.smoke else _label(written)}", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
