"""End to end: a recipe trains with Lightning, writes metrics.csv / recipe.yaml / ckpt / hf, and the export loads."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import greedy_by_full_forward, tiny_overrides
from zoo.recipe_loader import load_recipe
from zoo.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", ["transformer_small", "lstm_small"])
def test_tiny_training_run_writes_everything(tmp_path, recipe):
    r = load_recipe(recipe, tiny_overrides(tmp_path))
    summary = train(r)
    out = tmp_path / "run"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == ["step", "train_loss", "lr", "tokens_per_s", "val_loss", "val_ppl"]
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(row["tokens_per_s"]) > 0 and float(row["lr"]) > 0 for row in rows)
    assert [row["step"] for row in rows if row["val_loss"]] == ["3", "6"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["trainer"]["max_steps"] == 6
    assert list((out / "ckpt").glob("*.ckpt"))
    hf_files = sorted(p.name for p in (out / "hf").iterdir())
    assert hf_files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "summary.json").read_text())["val_loss"] == pytest.approx(summary["val_loss"])
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert type(model.model.layers[0].mixer).__name__ == {"transformer_small": "Attention", "lstm_small": "LSTM"}[recipe]
    ids = tok("def f(", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        assert torch.equal(gen, greedy_by_full_forward(model, ids["input_ids"], 5))
    assert tok.decode(gen[0]).startswith("def f(")


def test_loggers_get_the_recipe_and_the_metrics(tmp_path, monkeypatch):
    """trainer.logger: csv always; tensorboard and wandb (offline) where installed. metrics.csv is written as ever."""
    import importlib.util

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    names = ["csv"] + [n for n, m in (("tensorboard", "tensorboard"), ("wandb", "wandb")) if importlib.util.find_spec(m)]
    r = load_recipe("transformer_small", tiny_overrides(tmp_path, **{"trainer.logger": "[" + ",".join(names) + "]"}))
    train(r)
    out = tmp_path / "run"
    assert [int(row["step"]) for row in csv.DictReader((out / "metrics.csv").open())] == [1, 2, 3, 4, 5, 6]
    hparams = yaml.safe_load((out / "logs" / "csv" / "hparams.yaml").read_text())
    assert hparams["trainer"]["logger"] == names and hparams["model"]["vocab_size"] == 259
    logged = list(csv.DictReader((out / "logs" / "csv" / "metrics.csv").open()))
    assert {"train_loss", "val_loss", "step"} <= set(logged[0]) and any(row["val_loss"] for row in logged)
    if "tensorboard" in names:
        assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
        assert (out / "logs" / "tensorboard" / "hparams.yaml").exists()
    if "wandb" in names:
        assert list((out / "logs" / "wandb").glob("offline-run-*"))


def test_logger_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from zoo.errors import ConfigError
    from zoo.train import make_loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    r = load_recipe("transformer_small", tiny_overrides(tmp_path, **{"trainer.logger": "[csv,tensorboard]"}))
    with pytest.raises(ConfigError, match=r"trainer.logger\[1\]: tensorboard is not installed; pip install 'zoo\[tensorboard\]'"):
        make_loggers(r, tmp_path / "run")


def test_training_lowers_validation_loss(tmp_path):
    r = load_recipe("transformer_small", tiny_overrides(tmp_path, **{"trainer.max_steps": 40, "trainer.val_every": 20, "trainer.log_every": 20, "model.d_model": 64, "optimizer.lr": 3e-3}))
    train(r)
    rows = [row for row in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if row["val_loss"]]
    first, last = float(rows[0]["val_loss"]), float(rows[-1]["val_loss"])
    assert last < first < 5.6  # 5.6 ~ ln(259): a uniform guess over the byte vocabulary


def test_readme_python_example_runs(tmp_path):
    """Train transformer_small (shrunk) into ./checkpoints like the README, then run the README's Python block."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("output_dir=")]
    proc = subprocess.run([sys.executable, "-m", "zoo.train", "recipe=transformer_small", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "transformer_small" / "hf" / "model.safetensors").exists()
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    """Two gloo ranks each train on their share of the batches (rank r takes batches r, r + 2, ...) and DDP averages
    their gradients: the exported weights are those of one process that accumulates the same two batches a step."""
    from safetensors.torch import load_file

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    args = tiny_overrides(ddp, **{"trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "zoo.train", "recipe=transformer_small", *args], cwd=ddp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert "All distributed processes registered. Starting with 2 processes" in proc.stderr + proc.stdout
    rows = list(csv.DictReader((ddp / "run" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert torch.isfinite(torch.tensor([float(r["train_loss"]) for r in rows])).all()
    one = tmp_path / "one"
    train(load_recipe("transformer_small", tiny_overrides(one, **{"trainer.accelerator": "cpu", "trainer.accumulate_grad_batches": 2})))
    trained, expected = load_file(ddp / "run" / "hf" / "model.safetensors"), load_file(one / "run" / "hf" / "model.safetensors")
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=1e-4, msg=name)
