"""Every shipped recipe trains with what a GPU user gets: bf16-mixed autocast, fused AdamW, gradient clipping; and
with ``trainer.compile=true`` for an attention, a recurrent and an MoE recipe (the last two with activation
checkpointing). CPU autocast is real bf16, and
``optimizer.fused`` resolves to True on CPU as on CUDA, so these are the GPU code paths (not the kernels)."""
import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

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
    "trainer.val_every": STEPS // 2,
    "optimizer.lr": 3e-3,
    "model.d_model": 64,  # the smallest width every recipe's head sizes allow (RWKV heads are 64 wide)
    "model.n_layers": 4,  # the longest block pattern (hybrid_small: 3 x mamba2 + attention)
}


def overrides(tmp_path: Path, recipe: str, **extra) -> list[str]:
    settings = {**GPU_SETTINGS, **extra}
    if load_recipe(recipe).data.task is not None:  # synthetic tasks: a tiny task set
        settings.update({"data.task.train_samples": 256, "data.task.val_samples": 64})
    return tiny_overrides(tmp_path, **settings)


def losses(out: Path, column: str) -> list[float]:
    return [float(row[column]) for row in csv.DictReader((out / "metrics.csv").open()) if row[column]]


def check_run(out: Path, summary: dict, recipe) -> None:
    train, val = losses(out, "train_loss"), losses(out, "val_loss")
    assert len(train) == STEPS and all(math.isfinite(x) for x in train), train
    # Falling, measured on the validation set (fixed windows, and fixed times and masks for diffusion), at half time
    # and at the end: the training loss of a single step is too noisy for a diffusion NELBO.
    assert len(val) == 2 and all(math.isfinite(x) for x in val) and val[1] < val[0], val
    assert summary["val_loss"] == pytest.approx(val[1], abs=1e-5)
    if recipe.finetune is None:
        auto = AutoModelForMaskedLM if recipe.objective == "diffusion" else AutoModelForCausalLM
        model = auto.from_pretrained(out / "hf")
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        assert torch.isfinite(model(ids).logits).all()


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
        extra = {
            "finetune.init_from": str(request.getfixturevalue("mamba_export")), "data.source": str(ROOT / "layers" / "*.py"),
            "trainer.activation_checkpointing": "all",  # checkpointed layers under PEFT's LoRA wrappers
        }
    r = load_recipe(recipe, overrides(tmp_path, recipe, **extra))
    assert r.trainer.precision == "bf16-mixed" and r.optimizer.fused is True
    check_run(tmp_path / "run", train(r), r)


@pytest.mark.parametrize("recipe,checkpointing", [("transformer_small", "none"), ("mamba2_small", "all"), ("moe_small", "all")])
def test_compiled_training_with_gpu_settings(tmp_path, recipe, checkpointing):
    """Compiled, and (for two) with activation checkpointing, which torch.compile traces through."""
    r = load_recipe(recipe, overrides(tmp_path, recipe, **{"trainer.compile": True, "trainer.activation_checkpointing": checkpointing}))
    check_run(tmp_path / "run", train(r), r)
