"""Corpora, tokenizers and the LightningDataModule that packs documents into ``seq_len`` windows.

Sources (``data.source``):
- ``stdlib``: the ``.py`` files of the running Python's standard library (tests, site-packages and IDLE left out),
  split into train/validation by a hash of each file's path: offline and deterministic.
- a local text file, directory or glob: one document per file, split the same way.
- ``hf:NAME`` or ``hf:NAME/CONFIG``: a Hugging Face hub dataset (needs a network), its ``data.text_field`` column.
- ``mqar``, ``selective_copy``, ``induction``: synthetic tasks (zoo.synthetic, settings in ``data.task``), served as
  ``(inputs, targets)`` pairs whose targets are -100 outside answer positions.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from zoo.checkpoints.sampler import ResumableBatchSampler
from zoo.config import DataConfig
from zoo.errors import ConfigError
from zoo.synthetic import generate as generate_task

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, MASK_TOKEN]
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# ------------------------------------------------------------------------------------------------------------------
# Documents
# ------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without tests, site-packages or IDLE's tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts[:-1]))


def _in_validation(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _documents_from_files(files: list[Path], root: Path) -> dict[str, list[str]]:
    keys, texts = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        key = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if len(files) == 1:
            # A single file: documents are blocks of 100 lines, so both splits get some.
            lines = text.splitlines(keepends=True)
            for start in range(0, len(lines), 100):
                keys.append(f"{key}:{start}")
                texts.append("".join(lines[start : start + 100]))
        else:
            keys.append(key)
            texts.append(text)
    return {"key": keys, "text": texts}


def _split(ds: datasets.Dataset, val_fraction: float) -> datasets.DatasetDict:
    is_val = [_in_validation(k, val_fraction) for k in ds["key"]]
    val_idx = [i for i, v in enumerate(is_val) if v]
    train_idx = [i for i, v in enumerate(is_val) if not v]
    if not val_idx or not train_idx:
        raise ConfigError("data.val_fraction", f"split of {len(is_val)} documents left one side empty; raise val_fraction or add data")
    return datasets.DatasetDict(train=ds.select(train_idx), validation=ds.select(val_idx))


def local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())


def load_documents(cfg: DataConfig) -> datasets.DatasetDict:
    """Train/validation documents (columns ``key`` and ``text``) for ``cfg.source``."""
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _split(datasets.Dataset.from_dict(_documents_from_files(stdlib_files(), root)), cfg.val_fraction)
    if cfg.source.startswith("hf:"):
        name, _, subset = cfg.source[3:].partition("/")
        loaded = datasets.load_dataset(name, subset or None)
        if cfg.text_field not in loaded["train"].column_names:
            raise ConfigError("data.text_field", f"'{cfg.text_field}' is not a column of {cfg.source}; columns: {loaded['train'].column_names}")
        pick = lambda split: split.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text")  # noqa: E731
        if "validation" in loaded:
            return datasets.DatasetDict(train=pick(loaded["train"]), validation=pick(loaded["validation"]))
        train = pick(loaded["train"])
        return _split(train.add_column("key", [str(i) for i in range(len(train))]), cfg.val_fraction)
    files = local_files(cfg.source)
    if not files:
        raise ConfigError(
            "data.source",
            f"'{cfg.source}' is neither a built-in source (stdlib), an existing file, directory or glob, nor hf:NAME",
        )
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return _split(datasets.Dataset.from_dict(_documents_from_files(files, root)), cfg.val_fraction)


def source_fingerprint(cfg: DataConfig) -> str:
    """Changes when the corpus would: the files' paths and sizes, or the hub name."""
    h = hashlib.sha1(f"{cfg.source}|{cfg.val_fraction}|{cfg.text_field}".encode())
    if cfg.source == "stdlib":
        files = stdlib_files()
    elif cfg.source.startswith("hf:"):
        files = []
    else:
        files = local_files(cfg.source)
    for f in files:
        h.update(f"{f}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN, mask_token=MASK_TOKEN,
        model_max_length=int(1e30), padding_side="left",  # batched generation pads prompts on the left
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id == byte value for ids 0..255; then the special tokens. 259 tokens in all."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def task_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Synthetic tasks: token ``<i>`` has id i for i < ``vocab_size``; then the special tokens."""
    tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def train_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained with ``tokenizers`` on an iterable of texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


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


# ------------------------------------------------------------------------------------------------------------------
# Packed token windows
# ------------------------------------------------------------------------------------------------------------------


class TokenWindows(Dataset):
    """Consecutive, non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, limit: int | None = None):
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


@dataclass
class CorpusStats:
    train_tokens: int
    val_tokens: int
    unigram_entropy: float  # nats per token, of the training split's token frequencies


class ZooDataModule(L.LightningDataModule):
    """Tokenizes a source once (cached under ``data.cache_dir``) and serves packed windows."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.task_train: tuple[np.ndarray, np.ndarray] | None = None  # synthetic tasks: (inputs, targets)
        self.task_val: tuple[np.ndarray, np.ndarray] | None = None
        self._documents: datasets.DatasetDict | None = None
        self._resume_position: dict[str, int] | None = None  # set from a checkpoint by load_state_dict

    def _key(self) -> str:
        tok = "byte" if self.cfg.tokenizer == "byte" else f"bpe{self.cfg.vocab_size}"
        return f"{source_fingerprint(self.cfg)}-{tok}"

    def documents(self) -> datasets.DatasetDict:
        if self._documents is None:
            self._documents = load_documents(self.cfg)
        return self._documents

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        """The byte tokenizer, or the BPE trained on this source's training split (cached)."""
        if self.tokenizer is None:
            if self.cfg.task is not None:
                self.tokenizer = task_tokenizer(self.cfg.task.vocab_size)
            elif self.cfg.tokenizer == "byte":
                self.tokenizer = byte_tokenizer()
            else:
                path = self.cache_dir / "tokenizers" / f"{self._key()}.json"
                if not path.exists():
                    tok = train_bpe(self.documents()["train"]["text"], self.cfg.vocab_size)
                    _atomic_write_bytes(path, tok.backend_tokenizer.to_str().encode())
                self.tokenizer = _wrap(Tokenizer.from_file(str(path)))
        return self.tokenizer

    def _encode_split(self, split: str) -> np.ndarray:
        tok = self.load_tokenizer()
        eos = tok.convert_tokens_to_ids(EOS_TOKEN)
        docs = self.documents()[split]
        if self.cfg.tokenizer == "byte":
            pieces = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for text in docs["text"]]
        else:
            encoded = docs.map(lambda b: {"ids": tok(b["text"])["input_ids"]}, batched=True, remove_columns=docs.column_names)
            pieces = [np.asarray(ids, dtype=np.uint16) for ids in encoded["ids"]]
        out = []
        for piece in pieces:
            out.append(piece)
            out.append(np.array([eos], dtype=np.uint16))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)

    def prepare_data(self) -> None:
        """Tokenize both splits into ``.npy`` files under the cache (atomic writes; safe with several ranks).
        Synthetic tasks are generated in :meth:`setup` instead."""
        self.load_tokenizer()
        if self.cfg.task is not None:
            return
        for split in ("train", "validation"):
            path = self.cache_dir / "tokens" / f"{self._key()}-{split}.npy"
            if not path.exists():
                buf = io.BytesIO()
                np.save(buf, self._encode_split(split), allow_pickle=False)
                _atomic_write_bytes(path, buf.getvalue())

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
        load = lambda split: np.load(self.cache_dir / "tokens" / f"{self._key()}-{split}.npy", allow_pickle=False)  # noqa: E731
        self.train_tokens, self.val_tokens = load("train"), load("validation")

    def stats(self) -> CorpusStats:
        self.setup()
        counts = np.bincount(self.train_tokens, minlength=len(self.load_tokenizer())).astype(np.float64)
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
