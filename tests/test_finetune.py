"""LoRA fine-tuning through PEFT: a ``finetune:`` recipe trains only adapters (MoE experts included), saves them in
PEFT format, and ``python -m zoo.merge`` folds them into a plain checkpoint with the same logits."""
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_overrides
from test_blocks import TEST_ARGS
from zoo.config import LoRAConfig, ModelConfig
from zoo.data import byte_tokenizer
from zoo.errors import ConfigError
from zoo.finetune import peft_lora_config
from zoo.layers import MIXERS
from zoo.merge import main as merge_main
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.recipe_loader import load_recipe
from zoo.train import train
from zoo.training import export_hf

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
EXPERTS = ["ffn.w_gate", "ffn.w_up", "ffn.w_down"]


def base_checkpoint(tmp_path, recipe_name, overrides):
    """A random base model of the recipe's (shrunk) architecture, exported like zoo.train's hf/."""
    recipe = load_recipe(recipe_name, overrides)
    recipe.model.vocab_size = 259
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = ZooForCausalLM(ZooConfig.from_model_config(recipe.model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return export_hf(model, tok, tmp_path / "base")


def finetune_overrides(tmp_path, base_dir, **extra):
    return tiny_overrides(tmp_path, **{
        "data.source": str(ROOT / "layers" / "*.py"), "data.val_fraction": 0.1, "data.cache_dir": str(tmp_path / "cache"),
        "trainer.max_steps": 4, "trainer.val_every": 4, "trainer.log_every": 2, "optimizer.lr": 0.01,
        "finetune.init_from": str(base_dir), **extra,
    })


def test_lora_trains_adapters_only_and_merges(tmp_path):
    shrink = {"model.n_layers": 2, "model.moe.num_experts": 4, "model.moe.expert_hidden": 32}
    base_dir = base_checkpoint(tmp_path, "mamba_moe_small", tiny_overrides(tmp_path, **shrink))
    recipe = load_recipe("mamba_moe_small", finetune_overrides(tmp_path, base_dir, **shrink, **{
        "finetune.lora.r": 4, "finetune.lora.target_parameters": "[" + ",".join(EXPERTS) + "]",
    }))
    summary = train(recipe)
    adapter = tmp_path / "run" / "adapter"
    assert summary["hf_dir"] == str(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}

    # Base weights are bit-identical after training: the Lightning checkpoint holds them under PEFT's names.
    base_weights = load_file(base_dir / "model.safetensors")
    (ckpt,) = (tmp_path / "run" / "ckpt").glob("*.ckpt")
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    compared = 0
    for name, tensor in trained.items():
        if "lora_" in name:
            continue
        plain = name.removeprefix("model.base_model.model.").replace(".base_layer", "")
        assert torch.equal(tensor, base_weights[plain]), plain
        compared += 1
    assert compared == len(base_weights)

    adapter_weights = load_file(adapter / "adapter_model.safetensors")
    assert any(".mixer.in_proj.lora_B" in k for k in adapter_weights) and any(".mixer.out_proj.lora_A" in k for k in adapter_weights)
    expert_adapters = [k for k in adapter_weights if re.search(r"\.ffn\.(base_layer\.)*lora_B", k)]  # nested ParamWrappers
    assert len(expert_adapters) == 3  # w_gate, w_up, w_down of the one MoE layer
    assert all(adapter_weights[k].abs().sum() > 0 for k in adapter_weights if "lora_B" in k)  # trained off their zero init

    # The adapter loads with plain PEFT on the base, changes the logits, and merges into a plain checkpoint.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    x = torch.randint(0, 259, (2, 12))
    assert merge_main(["--base", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(merged, ZooForCausalLM)
    with torch.no_grad():
        adapted = peft_model(x).logits
        assert not torch.allclose(adapted, base_model(x).logits, atol=1e-4)
        torch.testing.assert_close(merged(x).logits, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MIXERS.names())
def test_all_linear_targets_every_blocks_projections(name):
    spec = ModelConfig.from_dict({"d_model": 48, "n_layers": 1, "blocks": [name], "vocab_size": 50, **({name: TEST_ARGS[name]} if name in TEST_ARGS else {})})
    model = ZooForCausalLM(ZooConfig.from_model_config(spec))
    model = get_peft_model(model, peft_lora_config(LoRAConfig(r=2), model))
    adapted = {n.split(".lora_A")[0].split("layers.0.")[1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert any(a.startswith("mixer.") for a in adapted), adapted
    assert not any("lm_head" in n or "embed" in n for n in adapted)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # Every adapter is used: giving one adapter a nonzero B (PEFT zero-initializes it) changes the logits (bitwise:
    # at init some projections, e.g. mamba's dt_proj with its small step sizes, move the logits only by ~1e-7).
    x = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        base = model(x).logits
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                weight = module.lora_B["default"].weight
                weight.normal_()
                assert not torch.equal(model(x).logits, base), f"the adapter on {module_name} changes nothing"
                weight.zero_()


def test_finetune_errors_are_clear(tmp_path):
    missing = load_recipe("lora_small", finetune_overrides(tmp_path, tmp_path / "nope"))  # loads: the dir is checked at train time
    with pytest.raises(ConfigError, match=r"finetune\.init_from: '.*nope' is not a Hugging Face checkpoint directory"):
        train(missing)
    base_dir = base_checkpoint(tmp_path, "mamba_small", tiny_overrides(tmp_path))
    mismatch = load_recipe("lora_small", finetune_overrides(tmp_path, base_dir, **{"model.d_model": 48}))
    with pytest.raises(ConfigError, match=r"model\.d_model: .*model\.d_model \(48 in the recipe, 32 in the checkpoint\)"):
        train(mismatch)
    with pytest.raises(ConfigError, match=r"finetune\.lora\.dropout: must be 0 with target_parameters"):
        load_recipe("lora_small", ["finetune.lora.dropout=0.1", "finetune.lora.target_parameters=[ffn.w_up]"])
