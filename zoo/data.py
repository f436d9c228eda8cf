"""Token shards, packed windows, the resumable sampler and the LightningDataModule that serves them.

Sources and tokenizers are in :mod:`zoo.corpus`; the synthetic tasks (``mqar``, ``selective_copy``, ``induction``:
zoo.synthetic, settings in ``data.task``) are served as ``(inputs, targets)`` pairs whose targets are -100 outside
answer positions.

Token cache: each split is a directory of flat binary shards (``uint16``, or ``uint32`` for vocabularies above
65,536 ids) and an ``index.json`` written last, each file atomically; training reads the shards through
``np.memmap``, so a rank's memory does not grow with the corpus.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerFast

from zoo.config import DataConfig
from zoo.corpus import (  # noqa: F401  (EOS_TOKEN, local_files, stdlib_files: re-exported)
    EOS_TOKEN, _wrap, byte_tokenizer, default_cache_dir, load_documents,
    load_pretrained_tokenizer, local_files, source_fingerprint, stdlib_files, task_tokenizer, train_bpe,
)
from zoo.errors import ConfigError
from zoo.synthetic import generate as generate_task

SHARD_TOKENS = 1 << 27  # tokens per cache shard (256 MiB of uint16)

# ------------------------------------------------------------------------------------------------------------------
# Token shards
# ------------------------------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ShardWriter:
    """Appends token arrays to ``NNNNN.bin`` shards of at most ``shard_tokens`` each (each written to a temp file,
    then renamed); :meth:`close` writes ``index.json`` last, atomically."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._file, self._tmp, self._count = None, None, 0

    def _finish_shard(self) -> None:
        name = f"{len(self.shards):05d}.bin"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.directory / name)
        self.shards.append({"file": name, "tokens": self._count})
        self._file, self._tmp, self._count = None, None, 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._file is None:
                fd, self._tmp = tempfile.mkstemp(dir=self.directory, prefix=".shard.")
                self._file = os.fdopen(fd, "wb")
            take = min(len(tokens), self.shard_tokens - self._count)
            self._file.write(memoryview(np.ascontiguousarray(tokens[:take])).cast("B"))
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish_shard()

    def close(self, meta: dict) -> None:
        if self._file is not None:
            self._finish_shard()
        index = {**meta, "dtype": self.dtype.name, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}
        _atomic_write_bytes(self.directory / "index.json", json.dumps(index, indent=1).encode())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            Path(self._tmp).unlink(missing_ok=True)


class ShardedTokens:
    """A split's token shards read through ``np.memmap`` as one sequence: ``len``, contiguous slices, :meth:`chunks`.
    Pickles as its directory (DataLoader workers map the files themselves)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = json.loads((self.directory / "index.json").read_text())
        self.dtype = np.dtype(index["dtype"])
        self.files = [s["file"] for s in index["shards"]]
        self._starts = [0]
        for shard in index["shards"]:
            self._starts.append(self._starts[-1] + shard["tokens"])
        self._len = self._starts[-1]
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.asarray(np.memmap(self.directory / f, dtype=self.dtype, mode="r")) if hi > lo else np.zeros(0, self.dtype)
                for f, lo, hi in zip(self.files, self._starts, self._starts[1:])
            ]
        return self._maps

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: slice) -> np.ndarray:
        """Tokens ``index`` (a contiguous slice): a read-only view when it lies in one shard, else a copy."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens takes contiguous slices only")
        start, stop, _ = index.indices(self._len)
        if stop <= start:
            return np.zeros(0, self.dtype)
        shards = self._shards()
        k = bisect.bisect_right(self._starts, start) - 1
        if stop <= self._starts[k + 1]:
            return shards[k][start - self._starts[k] : stop - self._starts[k]]
        pieces = []
        while k < len(shards) and self._starts[k] < stop:
            pieces.append(shards[k][max(start - self._starts[k], 0) : stop - self._starts[k]])
            k += 1
        return np.concatenate(pieces)

    def chunks(self, size: int = 1 << 24):
        """Consecutive copies of at most ``size`` tokens, covering the sequence."""
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.array(self[:], dtype=dtype)


def _token_chunks(tokens, size: int = 1 << 24):
    return tokens.chunks(size) if isinstance(tokens, ShardedTokens) else (tokens[i : i + size] for i in range(0, len(tokens), size))


# ------------------------------------------------------------------------------------------------------------------
# Packed token windows
# ------------------------------------------------------------------------------------------------------------------


class TokenWindows(Dataset):
    """Consecutive, non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray | ShardedTokens, seq_len: int, limit: int | None = None):
        self.tokens = tokens
        self.seq_len = seq_len
        n = (len(tokens) - 1) // seq_len
        self.n = n if limit is None else min(n, limit)
        if self.n < 1:
            raise ConfigError("data.seq_len", f"{len(tokens)} tokens are too few for one window of seq_len={seq_len}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))


class TaskSamples(Dataset):
    """Synthetic task samples: ``(inputs [T], targets [T])`` with targets -100 outside answer positions."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, limit: int | None = None):
        self.inputs = torch.from_numpy(inputs[:limit])
        self.targets = torch.from_numpy(targets[:limit])

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices into ``range(n)``; epoch ``e`` uses a permutation seeded by ``(seed, e)``.

    The last incomplete batch is dropped. With ``num_replicas > 1``, rank ``r`` takes every ``num_replicas``-th batch
    starting at ``r``. :meth:`resume` makes the next pass over epoch ``e`` start after ``batches_done`` batches, so a
    run restored from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        return (self.n // self.batch_size) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch = epoch
        self._skip = batches_done

    def __iter__(self) -> Iterator[list[int]]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        skip, self._skip = self._skip, 0
        for i in range(skip, len(self)):
            start = (i * self.num_replicas + self.rank) * self.batch_size
            yield order[start : start + self.batch_size]


@dataclass
class CorpusStats:
    train_tokens: int
    val_tokens: int
    unigram_entropy: float  # nats per token, of the training split's token frequencies


class ZooDataModule(L.LightningDataModule):
    """Tokenizes a source once (shards cached under ``data.cache_dir``) and serves packed windows read from disk."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.train_tokens: ShardedTokens | np.ndarray | None = None  # np.ndarray for synthetic tasks
        self.val_tokens: ShardedTokens | np.ndarray | None = None
        self.task_train: tuple[np.ndarray, np.ndarray] | None = None  # synthetic tasks: (inputs, targets)
        self.task_val: tuple[np.ndarray, np.ndarray] | None = None
        self._documents: datasets.DatasetDict | None = None
        self._resume_position: dict[str, int] | None = None  # set from a checkpoint by load_state_dict

    def _key(self) -> str:
        if self.cfg.tokenizer in ("byte", "bpe"):
            tok = "byte" if self.cfg.tokenizer == "byte" else f"bpe{self.cfg.vocab_size}"
        else:
            tok = "tok" + hashlib.sha1(self.load_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()[:12]
        return f"{source_fingerprint(self.cfg)}-{tok}"

    def documents(self) -> datasets.DatasetDict:
        if self._documents is None:
            self._documents = load_documents(self.cfg, self.cache_dir)
        return self._documents

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        """The task or byte tokenizer, the BPE trained on this source's training split (cached), or a pretrained one."""
        if self.tokenizer is None:
            if self.cfg.task is not None:
                self.tokenizer = task_tokenizer(self.cfg.task.vocab_size)
            elif self.cfg.tokenizer == "byte":
                self.tokenizer = byte_tokenizer()
            elif self.cfg.tokenizer == "bpe":
                path = self.cache_dir / "tokenizers" / f"{self._key()}.json"
                if not path.exists():
                    texts = (batch["text"] for batch in self.documents()["train"].iter(batch_size=1000))
                    tok = train_bpe(texts, self.cfg.vocab_size)
                    _atomic_write_bytes(path, tok.backend_tokenizer.to_str().encode())
                self.tokenizer = _wrap(Tokenizer.from_file(str(path)))
            else:
                self.tokenizer = load_pretrained_tokenizer(self.cfg.tokenizer)
        return self.tokenizer

    def check_source(self) -> None:
        """Refuse a bad ``data.source`` or ``data.text_field`` before a run starts: loads the documents (which
        :meth:`prepare_data` reuses) unless both splits are already tokenized in the cache."""
        if self.cfg.task is None and not all((self._token_dir(s) / "index.json").exists() for s in ("train", "validation")):
            self.documents()

    def _token_dir(self, split: str) -> Path:
        return self.cache_dir / "tokens" / f"{self._key()}-{split}"

    def _write_split(self, split: str, directory: Path) -> None:
        """Tokenize one split with ``datasets.map`` (``data.num_proc`` processes; results in Arrow files on disk),
        each document followed by EOS, and stream the ids into shards under ``directory``."""
        tok = self.load_tokenizer()
        eos, dtype, byte = tok.eos_token_id, token_dtype(len(tok)), self.cfg.tokenizer == "byte"

        def encode(batch: dict) -> dict:
            texts = batch["text"]
            ids = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts] if byte else tok(texts, add_special_tokens=False)["input_ids"]
            out = []
            for piece in ids:
                arr = np.empty(len(piece) + 1, dtype)
                arr[:-1] = piece
                arr[-1] = eos
                out.append(arr)
            return {"ids": out}

        docs = self.documents()[split]
        scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        writer = _ShardWriter(directory, dtype, SHARD_TOKENS)
        try:
            encoded = docs.map(
                encode, batched=True, batch_size=64, writer_batch_size=64, remove_columns=docs.column_names,
                features=datasets.Features({"ids": datasets.List(datasets.Value(dtype.name))}),
                num_proc=self.cfg.num_proc if self.cfg.num_proc > 1 else None,
                cache_file_name=str(scratch / "ids.arrow"), load_from_cache_file=False, desc=f"tokenizing {split}",
            )
            for batch in encoded.with_format("arrow").iter(batch_size=64):
                for chunk in batch.column("ids").chunks:
                    writer.write(chunk.flatten().to_numpy(zero_copy_only=False))
            writer.close({"vocab_size": len(tok), "eos_token_id": eos, "documents": len(docs)})
        except BaseException:
            writer.abort()
            raise
        finally:
            del docs
            shutil.rmtree(scratch, ignore_errors=True)

    def prepare_data(self) -> None:
        """Tokenize both splits into shards under the cache (atomic writes; safe with several ranks).
        Synthetic tasks are generated in :meth:`setup` instead."""
        self.load_tokenizer()
        if self.cfg.task is not None:
            return
        for split in ("train", "validation"):
            directory = self._token_dir(split)
            if not (directory / "index.json").exists():
                directory.parent.mkdir(parents=True, exist_ok=True)
                self._write_split(split, directory)

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        if self.cfg.task is not None:
            self.task_train, self.task_val = generate_task(
                self.cfg.source, self.cfg.task, self.cfg.seq_len, self.cfg.task.train_samples, self.cfg.task.val_samples, self.seed,
            )
            self.train_tokens, self.val_tokens = self.task_train[0].ravel(), self.task_val[0].ravel()
            return
        self.prepare_data()
        self.train_tokens, self.val_tokens = ShardedTokens(self._token_dir("train")), ShardedTokens(self._token_dir("validation"))

    def stats(self) -> CorpusStats:
        self.setup()
        counts = np.zeros(len(self.load_tokenizer()), dtype=np.float64)
        for chunk in _token_chunks(self.train_tokens):
            counts += np.bincount(chunk, minlength=len(counts))
        p = counts[counts > 0] / counts.sum()
        return CorpusStats(len(self.train_tokens), len(self.val_tokens), float(-(p * np.log(p)).sum()))

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches (order fixed by seed and epoch; each rank takes its share), resumable mid-epoch."""
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        dataset = TaskSamples(*self.task_train) if self.cfg.task is not None else TokenWindows(self.train_tokens, self.cfg.seq_len)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = ResumableBatchSampler(len(dataset), self.cfg.batch_size, self.seed, num_replicas=world, rank=rank)
        if self._resume_position is not None:
            sampler.resume(**self._resume_position)
            self._resume_position = None
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers, generator=generator)

    def state_dict(self) -> dict[str, int]:
        """Training data position (epoch, batches of it consumed), saved in checkpoints for an exact resume."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume_position = {"epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"])}

    def val_dataloader(self) -> DataLoader:
        self.setup()
        if self.cfg.task is not None:
            windows = TaskSamples(*self.task_val, limit=self.cfg.val_batches * self.cfg.batch_size)
        else:
            windows = TokenWindows(self.val_tokens, self.cfg.seq_len, limit=self.cfg.val_batches * self.cfg.batch_size)
        return DataLoader(windows, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
