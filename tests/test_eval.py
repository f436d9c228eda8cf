"""``python -m zoo.eval``: loss by position (chunked == one pass, by hand, from a run's recipe) and
lm-evaluation-harness tasks on a zoo model, checked against log-likelihoods computed directly with the model."""
import json

import pytest
import torch
import torch.nn.functional as F

from test_generate import tiny
from zoo.data import byte_tokenizer
from zoo.eval import main as eval_main
from zoo.eval import position_losses
from zoo.training import export_hf

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40))


def export(tmp_path, blocks, name="run"):
    tok = byte_tokenizer()
    model = tiny(blocks, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    export_hf(model, tok, tmp_path / name / "hf")
    return model, tok


@pytest.mark.parametrize("blocks", [["attention"], ["mamba2", "rwkv7"], ["lstm"]], ids="+".join)
def test_chunked_loss_equals_one_pass_and_a_direct_computation(blocks):
    """Windows fed 7 tokens at a time, carrying the cache, give the one-pass losses; both equal cross-entropy by hand."""
    tok = byte_tokenizer()
    model = tiny(blocks, vocab_size=len(tok))
    windows = torch.tensor(tok(TEXT)["input_ids"][: 2 * 25]).view(2, 25)  # [W=2, N + 1 = 25]
    one_pass = position_losses(model, windows, batch_size=1)
    chunked = position_losses(model, windows, chunk=7, batch_size=2)
    with torch.no_grad():
        logits = model(windows[:, :-1], use_cache=False).logits  # [2, 24, V]
    by_hand = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)  # [24]
    assert one_pass.shape == (24,)
    torch.testing.assert_close(one_pass, by_hand.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=1e-5)


def test_loss_by_position_cli_two_checkpoints(tmp_path, capsys):
    data = tmp_path / "val.txt"
    data.write_text(TEXT)
    export(tmp_path, ["attention"], "attn")
    export(tmp_path, ["mamba2"], "m2")
    argv = [str(tmp_path / "attn"), str(tmp_path / "m2" / "hf"), "--loss-by-position", "--max-length", "48",
            "--bucket", "16", "--data", str(data), "--windows", "4"]
    assert eval_main(argv + ["--chunk", "16"]) == 0
    out = tmp_path / "attn" / "eval"
    result = json.loads((out / "loss_by_position.json").read_text())
    assert [r["label"] for r in result["checkpoints"]] == ["attn", "m2"]
    assert [(b["start"], b["end"]) for b in result["checkpoints"][0]["buckets"]] == [(0, 16), (16, 32), (32, 48)]
    assert all(r["windows"] == 4 and r["seq_len"] is None for r in result["checkpoints"])
    table = (out / "loss_by_position.md").read_text()
    assert table.startswith("| positions | attn | m2 |") and "| 32-47 |" in table
    assert (out / "loss_by_position.png").stat().st_size > 1000
    assert "loss_by_position.json" in capsys.readouterr().out
    assert eval_main(argv + ["--out", str(tmp_path / "one")]) == 0  # one pass: the same numbers
    again = json.loads((tmp_path / "one" / "loss_by_position.json").read_text())
    for a, b in zip(result["checkpoints"], again["checkpoints"]):
        assert [x["loss"] for x in a["buckets"]] == pytest.approx([x["loss"] for x in b["buckets"]], abs=1e-5)


def test_loss_by_position_reads_the_runs_corpus(tmp_path):
    """A trained run: its recipe.yaml gives the validation corpus and the training seq_len (here 32, evaluated to 64)."""
    from conftest import tiny_overrides
    from zoo.recipe_loader import load_recipe
    from zoo.train import train

    train(load_recipe("lstm_small", tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.val_every": 2})))
    assert eval_main([str(tmp_path / "run"), "--loss-by-position", "--max-length", "64", "--chunk", "16", "--windows", "2"]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "loss_by_position.json").read_text())
    run = result["checkpoints"][0]
    assert run["seq_len"] == 32 and run["windows"] == 2 and len(run["buckets"]) == 32 and run["blocks"] == ["lstm"]
    assert 0 < run["mean_loss"] < 10


@pytest.mark.parametrize("argv, message", [
    (["--max-length", "8"], "nothing to do"),
    (["--loss-by-position"], "needs --max-length"),
    (["--loss-by-position", "--max-length", "8", "--chunk", "0"], "--chunk must be >= 1"),
    (["--loss-by-position", "--max-length", "8"], "no recipe.yaml beside it"),
    (["--loss-by-position", "--max-length", "100000", "--data", "VAL"], "fewer than --max-length + 1"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    (tmp_path / "val.txt").write_text(TEXT)
    export(tmp_path, ["attention"])
    argv = [a.replace("VAL", str(tmp_path / "val.txt")) for a in argv]
    capsys.readouterr()
    assert eval_main([str(tmp_path / "run")] + argv) == 2
    err = capsys.readouterr().err
    assert "zoo.eval: error: " in err and message in err.split("zoo.eval: error: ", 1)[1]
