import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

import zoo.data
from zoo.config import DataConfig
from zoo.data import ShardedTokens, TokenWindows, ZooDataModule, byte_tokenizer, load_documents, stdlib_files
from zoo.errors import ConfigError


def test_byte_tokenizer_ids_are_bytes_and_roundtrip(tmp_path):
    tok = byte_tokenizer()
    text = "def f(x):\n\treturn x  # é ☃ \x00\x7f"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 259 and tok.eos_token_id == 256 and tok.pad_token_id == 257
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.eos_token == "<|endoftext|>"


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
    files = stdlib_files()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    a, b = load_documents(DataConfig()), load_documents(DataConfig())
    assert a["validation"]["key"] == b["validation"]["key"]
    assert not set(a["train"]["key"]) & set(a["validation"]["key"])
    assert 0.02 < len(a["validation"]) / (len(a["train"]) + len(a["validation"])) < 0.1


def test_local_directory_source_with_bpe(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog\n" * 30)
    dm = ZooDataModule(DataConfig(source=str(corpus), tokenizer="bpe", vocab_size=300, seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache")))
    dm.setup()
    tok = dm.load_tokenizer()
    assert len(tok) == 300
    assert len(tok("the quick brown fox")["input_ids"]) < len("the quick brown fox")
    assert np.asarray(dm.train_tokens).max() < 300 and len(dm.val_tokens) > 0
    stats = dm.stats()
    assert 0 < stats.unigram_entropy < np.log(300)
    # The cache is reused: a second module reads the same arrays.
    dm2 = ZooDataModule(dm.cfg)
    dm2.setup()
    assert np.array_equal(np.asarray(dm2.train_tokens), np.asarray(dm.train_tokens))


def test_missing_source_is_named():
    with pytest.raises(ConfigError, match="data.source: 'no/such/dir' is neither"):
        load_documents(DataConfig(source="no/such/dir"))


def test_windows_are_inputs_plus_shifted_targets():
    tokens = np.arange(100, dtype=np.uint16)
    w = TokenWindows(tokens, seq_len=10)
    assert len(w) == 9
    assert w[1].tolist() == list(range(10, 21))
    with pytest.raises(ConfigError, match="too few"):
        TokenWindows(tokens[:5], seq_len=10)


def _wordlevel_json(path, n):
    """A WordLevel tokenizer.json of ``n`` words ``w0`` .. ``w{n-1}`` (ids = their numbers)."""
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_large_vocabulary_ids_survive_cache_and_loader(tmp_path, monkeypatch):
    """A 70,000-id tokenizer.json: tokens are stored as uint32, across several shards, and come back exactly."""
    monkeypatch.setattr(zoo.data, "SHARD_TOKENS", 50)  # several shards, windows crossing shard boundaries
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"d{d}.txt").write_text(" ".join(f"w{65530 + (d * 7 + i) % 4000}" for i in range(40)))
    cfg = DataConfig(source=str(corpus), tokenizer=str(_wordlevel_json(tmp_path / "tokenizer.json", 70_000)),
                     seq_len=16, batch_size=2, val_batches=1, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm = ZooDataModule(cfg)
    dm.setup()
    tok = dm.load_tokenizer()
    assert len(tok) == 70_003 and tok.eos_token_id == 70_000  # EOS, pad and mask added after the vocabulary
    expected = []
    for text in dm.documents()["train"]["text"]:
        expected += [int(w[1:]) for w in text.split()] + [tok.eos_token_id]
    index = json.loads((dm._token_dir("train") / "index.json").read_text())
    assert index["dtype"] == "uint32" and len(index["shards"]) > 2 and index["tokens"] == len(expected)
    tokens = np.asarray(dm.train_tokens)
    assert tokens.tolist() == expected and tokens.max() > 65_535
    windows = TokenWindows(dm.train_tokens, seq_len=16)
    seen = [tuple(row.tolist()) for batch in dm.train_dataloader() for row in batch]
    assert len(seen) == len(windows) // 2 * 2  # the sampler drops the last partial batch
    assert {tuple(windows[i].tolist()) for i in range(len(windows))} == {tuple(expected[i * 16 : i * 16 + 17]) for i in range(len(windows))}
    assert set(seen) <= {tuple(expected[i * 16 : i * 16 + 17]) for i in range(len(windows))}
    assert max(max(row) for row in seen) > 65_535


def test_sharded_tokens_read_through_memmap_and_pickle_as_paths(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setattr(zoo.data, "SHARD_TOKENS", 7)
    writer = zoo.data._ShardWriter(tmp_path / "split", np.dtype(np.uint16), 7)
    writer.write(np.arange(10))
    writer.write(np.arange(10, 30))
    writer.close({})
    tokens = ShardedTokens(tmp_path / "split")
    assert len(tokens) == 30 and tokens[5:23].tolist() == list(range(5, 23)) and tokens[28:40].tolist() == [28, 29]
    assert isinstance(tokens._shards()[0].base, np.memmap) and not tokens[0:3].flags.writeable
    assert len(pickle.dumps(tokens)) < 2000
    assert np.concatenate(list(tokens.chunks(4))).tolist() == list(range(30))
    assert not [p for p in (tmp_path / "split").iterdir() if p.name.startswith(".")]  # no temp files left


def test_local_tokenizer_directory_and_jsonl_source(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    rows = [{"body": f"line {i} of the corpus\n" * 5, "n": i} for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(tmp_path / "docs.jsonl"), text_field="body", tokenizer=str(tmp_path / "tok"),
                     seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm = ZooDataModule(cfg)
    dm.setup()
    docs = dm.documents()
    assert len(docs["train"]) + len(docs["validation"]) == 30 and set(docs["train"].column_names) == {"key", "text"}
    expected = b"".join(t.encode() + bytes([0]) for t in docs["train"]["text"])
    tokens = np.asarray(dm.train_tokens)
    assert tokens.dtype == np.uint16 and len(tokens) == len(expected)
    assert (tokens[tokens != 256] < 256).all() and (tokens == 256).sum() == len(docs["train"])


def test_parquet_source_with_the_default_text_column(tmp_path):
    """A parquet corpus whose column is already ``text`` (the default ``data.text_field``), in two files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " * 4 for i in range(20)]
    (tmp_path / "corpus").mkdir()
    for part in range(2):
        pq.write_table(pa.table({"text": texts[part::2], "id": list(range(part, 20, 2))}), tmp_path / "corpus" / f"p{part}.parquet")
    cfg = DataConfig(source=str(tmp_path / "corpus"), tokenizer="byte", seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    docs = ZooDataModule(cfg).documents()
    assert sorted([*docs["train"]["text"], *docs["validation"]["text"]]) == sorted(texts)
    assert set(docs["train"].column_names) == {"key", "text"}


def test_parallel_tokenization_gives_the_same_shards(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "some words here " * (i + 3))
    tokens = []
    for num_proc in (1, 2):
        dm = ZooDataModule(DataConfig(source=str(corpus), tokenizer="bpe", vocab_size=300, seq_len=8, val_fraction=0.2,
                                      num_proc=num_proc, cache_dir=str(tmp_path / f"cache{num_proc}")))
        dm.setup()
        tokens.append(np.asarray(dm.train_tokens))
    assert len(tokens[0]) > 100 and np.array_equal(tokens[0], tokens[1])


def test_mixed_file_kinds_are_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text('{"text": "x"}')
    (tmp_path / "src" / "b.txt").write_text("y")
    with pytest.raises(ConfigError, match="mixes file kinds"):
        load_documents(DataConfig(source=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache")))


def test_unknown_tokenizer_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer: no such tokenizer file"):
        DataConfig(tokenizer=str(tmp_path / "missing.json"))
