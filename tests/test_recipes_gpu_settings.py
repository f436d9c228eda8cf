"""Every shipped recipe trains with what a GPU user gets: bf16-mixed autocast, fused AdamW, gradient clipping; and
with ``trainer.compile=true`` for an attention, a recurrent and an MoE recipe. CPU autocast is real bf16, and
``optimizer.fused`` resolves to True on CPU as on CUDA, so these are the GPU code paths (not the kernels)."""
import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_overrides
from zoo.recipe_loader import builtin_recipe_names, load_recipe
from zoo.train import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
GPU_SETTINGS = {
    "trainer.precision": "bf16-mixed",
    "optimizer.fused": True,
    "trainer.grad_clip": 1.0,
    "trainer.max_steps": STEPS,
    "trainer.val_every": STEPS,
    "optimizer.lr": 3e-3,
}


def overrides(tmp_path: Path, recipe: str, **extra) -> list[str]:
    settings = {**GPU_SETTINGS, **extra}
    if load_recipe(recipe).data.task is not None:  # synthetic tasks: a tiny task set
        settings.update({"data.task.train_samples": 256, "data.task.val_samples": 64})
    return tiny_overrides(tmp_path, **settings)


def train_losses(out: Path) -> list[float]:
    return [float(row["train_loss"]) for row in csv.DictReader((out / "metrics.csv").open()) if row["train_loss"]]


def check_run(out: Path, summary: dict, finetune: bool = False) -> None:
    losses = train_losses(out)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(summary["val_loss"])
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # falling: the last three steps below the first three
    if not finetune:
        model = AutoModelForCausalLM.from_pretrained(out / "hf")
        assert torch.isfinite(model(torch.randint(0, 200, (1, 8))).logits).all()


@pytest.fixture(scope="module")
def mamba_export(tmp_path_factory) -> Path:
    """A tiny bf16-trained mamba_small: the base that lora_small fine-tunes."""
    tmp = tmp_path_factory.mktemp("mamba_base")
    train(load_recipe("mamba_small", overrides(tmp, "mamba_small")))
    return tmp / "run" / "hf"


@pytest.mark.parametrize("recipe", builtin_recipe_names())
def test_recipe_trains_with_gpu_settings(tmp_path, recipe, request):
    extra = {}
    if load_recipe(recipe).finetune is not None:
        extra = {"finetune.init_from": str(request.getfixturevalue("mamba_export")), "data.source": str(ROOT / "layers" / "*.py")}
    r = load_recipe(recipe, overrides(tmp_path, recipe, **extra))
    assert r.trainer.precision == "bf16-mixed" and r.optimizer.fused is True
    check_run(tmp_path / "run", train(r), finetune=r.finetune is not None)


@pytest.mark.parametrize("recipe", ["transformer_small", "mamba2_small", "moe_small"])
def test_compiled_training_with_gpu_settings(tmp_path, recipe):
    r = load_recipe(recipe, overrides(tmp_path, recipe, **{"trainer.compile": True}))
    check_run(tmp_path / "run", train(r))
