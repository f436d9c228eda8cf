"""FSDP on CPU. Lightning refuses ``trainer.strategy=fsdp`` without CUDA (zoo says so with the recipe key), so two
gloo processes shard zoo models with torch's FSDP2 directly (tests/fsdp_worker.py): the gathered full weights equal the
unsharded model's at step 0 and after three AdamW steps (the unsharded copy trains on the whole batch, as DDP would),
and both exports load with ``AutoModelForCausalLM``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
from zoo.errors import ConfigError
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.recipe_loader import load_recipe
from zoo.train import check_strategy

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"


def test_lightning_fsdp_on_cpu_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.strategy: fsdp needs CUDA"):
        check_strategy(load_recipe("transformer_small", ["trainer.strategy=fsdp", "trainer.accelerator=cpu"]))
    check_strategy(load_recipe("transformer_small", ["trainer.strategy=ddp", "trainer.accelerator=cpu"]))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["transformer_small", "rwkv7_small"])
def test_fsdp2_two_processes_on_cpu_match_the_unsharded_model(tmp_path, recipe):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), recipe, str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["step0_max_diff"] == 0.0
    assert result["trained_max_diff"] < 1e-4, result  # 3 AdamW steps at lr 1e-3: float summation order only
    for sharded, whole in result["losses"]:  # the mean of the two halves' losses is the whole batch's loss
        assert abs(sharded - whole) < 1e-5, result["losses"]
    torch.manual_seed(0)
    expected = ZooForCausalLM(ZooConfig.from_model_config(load_recipe(recipe, ["model.d_model=64", "model.n_layers=2", "model.vocab_size=256"]).model))
    step0 = AutoModelForCausalLM.from_pretrained(tmp_path / "step0")
    assert type(step0) is ZooForCausalLM
    for (name, p), q in zip(step0.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    ids = torch.randint(0, 256, (1, 9))
    assert torch.isfinite(trained(input_ids=ids).logits).all()
    assert not torch.equal(trained.lm_head.weight, step0.lm_head.weight)
