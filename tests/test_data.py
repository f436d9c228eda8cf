import numpy as np
import pytest
from transformers import AutoTokenizer

from zoo.config import DataConfig
from zoo.data import TokenWindows, ZooDataModule, byte_tokenizer, load_documents, stdlib_files
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
    assert dm.train_tokens.max() < 300 and len(dm.val_tokens) > 0
    stats = dm.stats()
    assert 0 < stats.unigram_entropy < np.log(300)
    # The cache is reused: a second module reads the same arrays.
    dm2 = ZooDataModule(dm.cfg)
    dm2.setup()
    assert np.array_equal(dm2.train_tokens, dm.train_tokens)


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
