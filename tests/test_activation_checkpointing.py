"""Activation checkpointing (``trainer.activation_checkpointing``): the same losses and gradients as without it, layers
really recomputed (and only the chosen ones), MoE routing recorded once, and training through ``zoo.train``."""
import csv

import pytest
import torch

from conftest import tiny_overrides
from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers import MIXERS, MoE, ResidualLayer
from zoo.modeling import ZooConfig, ZooForCausalLM, set_activation_checkpointing
from zoo.recipe_loader import load_recipe
from zoo.train import train


def _model(blocks: list[str], ffn: str = "swiglu") -> ZooForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=2 * len(blocks), blocks=blocks, ffn=ffn, vocab_size=64)
    return ZooForCausalLM(ZooConfig.from_model_config(config)).train()


def _loss_and_grads(model: ZooForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _count_mixer_calls(model: ZooForCausalLM) -> tuple[list[int], list]:
    calls = [0] * len(model.model.layers)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mixer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)))
    return calls, hooks


@pytest.mark.parametrize("block", MIXERS.names())
def test_every_block_gives_the_same_loss_and_gradients_and_is_recomputed(block):
    model = _model([block])
    ids = torch.randint(0, 64, (2, 20))
    loss, grads = _loss_and_grads(model, ids)
    assert set_activation_checkpointing(model, "all") == len(model.model.layers)
    calls, hooks = _count_mixer_calls(model)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids)
    for hook in hooks:
        hook.remove()
    assert calls == [2] * len(calls)  # forward, then the backward's recomputation
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_only_the_named_blocks_are_checkpointed_and_none_turns_it_off():
    model = _model(["attention", "mamba2"])
    ids = torch.randint(0, 64, (2, 12))
    assert set_activation_checkpointing(model, ["mamba2"]) == 2
    calls, hooks = _count_mixer_calls(model)
    _loss_and_grads(model, ids)
    assert calls == [1, 2, 1, 2]
    assert set_activation_checkpointing(model, "none") == 0
    calls[:] = [0] * 4
    _loss_and_grads(model, ids)
    assert calls == [1, 1, 1, 1]
    with torch.no_grad():  # no backward to replay for: evaluation runs each layer once
        set_activation_checkpointing(model, "all")
        calls[:] = [0] * 4
        model(input_ids=ids)
    assert calls == [1, 1, 1, 1]
    for hook in hooks:
        hook.remove()


def test_moe_routing_is_recorded_once_and_router_losses_are_unchanged():
    model = _model(["attention"], ffn="moe")
    ids = torch.randint(0, 64, (2, 16))
    out = model(input_ids=ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    set_activation_checkpointing(model, "all")
    model.zero_grad(set_to_none=True)
    out_ckpt = model(input_ids=ids[:, :-1], labels=ids[:, 1:])
    out_ckpt.loss.backward()
    torch.testing.assert_close(out_ckpt.aux_loss, out.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(out_ckpt.expert_load, out.expert_load, rtol=0, atol=0)
    # the replay in the backward recorded nothing that the next forward would pool with its own routes
    assert all(not m.pending_routes for m in model.modules() if isinstance(m, MoE))


def test_hugging_face_switch_turns_it_on_for_every_layer():
    model = _model(["rwkv7"])
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.modules() if isinstance(layer, ResidualLayer))
    assert model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing
    ids = torch.randint(0, 64, (1, 10))
    calls, hooks = _count_mixer_calls(model)
    _loss_and_grads(model, ids)
    assert calls == [2, 2]
    for hook in hooks:
        hook.remove()


def test_recipe_key_is_validated_with_its_path():
    assert load_recipe("transformer_small", ["trainer.activation_checkpointing=[attention]"]).trainer.activation_checkpointing == ["attention"]
    with pytest.raises(ConfigError, match=r"trainer\.activation_checkpointing\[0\].*not in model\.blocks"):
        load_recipe("transformer_small", ["trainer.activation_checkpointing=[mamba]"])
    with pytest.raises(ConfigError, match=r"trainer\.activation_checkpointing\[1\].*unknown block 'mambo'"):
        load_recipe("transformer_small", ["trainer.activation_checkpointing=[attention,mambo]"])
    with pytest.raises(ConfigError, match=r"trainer\.activation_checkpointing"):
        load_recipe("transformer_small", ["trainer.activation_checkpointing=some"])


@pytest.mark.parametrize("recipe", ["moe_small", "hybrid_small"])
def test_training_losses_are_identical_with_and_without(tmp_path, recipe):
    losses = {}
    for mode in ("none", "all"):
        overrides = tiny_overrides(tmp_path / mode, **{"model.n_layers": 4, "trainer.max_steps": 4, "trainer.val_every": 4, "trainer.activation_checkpointing": mode})
        train(load_recipe(recipe, overrides))
        rows = list(csv.DictReader((tmp_path / mode / "run" / "metrics.csv").open()))
        losses[mode] = [(r["train_loss"], r["val_loss"]) for r in rows]
    assert len(losses["none"]) == 4 and losses["all"] == losses["none"]
