"""Where documents come from and how they become ids: corpus sources and tokenizers.

Sources (``data.source``):
- ``stdlib``: the ``.py`` files of the running Python's standard library (tests, site-packages and IDLE left out),
  split into train/validation by a hash of each file's path: offline and deterministic.
- a local text file, directory or glob: one document per file, split the same way.
- local ``.parquet``, ``.jsonl``/``.json`` or ``.arrow`` files (a file, directory or glob of one kind): one document per
  row, its ``data.text_field`` column, split by a hash of the row index.
- ``hf:NAME`` or ``hf:NAME/CONFIG``: a Hugging Face hub dataset (needs a network), its ``data.text_field`` column.

Tokenizers (``data.tokenizer``): ``byte``, ``bpe`` (trained on the training split), or an existing one: a
``tokenizer.json`` file, a local Hugging Face tokenizer directory or a hub name; ``task_tokenizer`` for the synthetic
tasks.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from zoo.config import DataConfig
from zoo.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, MASK_TOKEN]
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}  # suffix -> datasets builder

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


def _file_documents(files: list[str], root: str):
    """Yield ``{key, text}`` per document: one per file, or blocks of 100 lines of a single file (so both splits get some)."""
    root = Path(root)
    for path in map(Path, files):
        text = path.read_text(encoding="utf-8", errors="replace")
        key = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if len(files) == 1:
            lines = text.splitlines(keepends=True)
            for start in range(0, len(lines), 100):
                yield {"key": f"{key}:{start}", "text": "".join(lines[start : start + 100])}
        else:
            yield {"key": key, "text": text}


def _documents_from_files(files: list[Path], root: Path, cache_dir: Path) -> datasets.Dataset:
    """The files' documents as a dataset written to ``cache_dir`` (memory-mapped, not held in RAM)."""
    features = datasets.Features({"key": datasets.Value("string"), "text": datasets.Value("string")})
    return datasets.Dataset.from_generator(
        _file_documents, features=features, gen_kwargs={"files": [str(f) for f in files], "root": str(root)},
        cache_dir=str(cache_dir), writer_batch_size=64,
    )


def _split(ds: datasets.Dataset, val_fraction: float) -> datasets.DatasetDict:
    is_val = [_in_validation(k, val_fraction) for k in ds.with_format("arrow")["key"].to_pylist()]
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


def _table_documents(files: list[Path], cfg: DataConfig, cache_dir: Path) -> datasets.Dataset:
    kinds = {TABLE_FORMATS.get(f.suffix, f"{f.suffix or 'suffixless'} text") for f in files}
    if len(kinds) > 1:
        raise ConfigError("data.source", f"'{cfg.source}' mixes file kinds ({', '.join(sorted(kinds))}); use one")
    table = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir))
    if cfg.text_field not in table.column_names:
        raise ConfigError("data.text_field", f"'{cfg.text_field}' is not a column of {cfg.source}; columns: {table.column_names}")
    table = table.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        table = table.rename_column(cfg.text_field, "text")
    return table.add_column("key", [str(i) for i in range(len(table))])


def load_documents(cfg: DataConfig, cache_dir: Path | None = None) -> datasets.DatasetDict:
    """Train/validation documents (columns ``key`` and ``text``) for ``cfg.source``; local corpora are written as
    Arrow files under ``cache_dir/documents`` (default: ``data.cache_dir``) and memory-mapped."""
    cache_dir = Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser() / "documents" / source_fingerprint(cfg)
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _split(_documents_from_files(stdlib_files(), root, cache_dir), cfg.val_fraction)
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
    if any(f.suffix in TABLE_FORMATS for f in files):
        return _split(_table_documents(files, cfg, cache_dir), cfg.val_fraction)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return _split(_documents_from_files(files, root, cache_dir), cfg.val_fraction)


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


def load_pretrained_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """A ``tokenizer.json`` file, a local Hugging Face tokenizer directory or a hub name. Missing EOS, pad or mask
    tokens are added as zoo's special tokens; BOS defaults to EOS (documents are separated by EOS)."""
    path = Path(spec).expanduser()
    if path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), model_max_length=int(1e30), padding_side="left")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec, padding_side="left")
        except (OSError, ValueError) as err:
            raise ConfigError("data.tokenizer", f"'{spec}' is neither byte, bpe, a tokenizer.json, a tokenizer directory nor a loadable hub name ({err})") from None
        if not isinstance(tok, PreTrainedTokenizerFast):
            raise ConfigError("data.tokenizer", f"'{spec}' has no fast (tokenizers) tokenizer")
    missing = {
        attr: token for attr, token in (("eos_token", EOS_TOKEN), ("pad_token", PAD_TOKEN), ("mask_token", MASK_TOKEN))
        if getattr(tok, attr) is None
    }
    if missing:
        tok.add_special_tokens(missing)
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    return tok
