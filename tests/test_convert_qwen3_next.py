"""``python -m zoo.convert`` on a tiny random Qwen3-Next (three Gated DeltaNet layers to one gated attention, MoE
with a gated shared expert, fp32): the same logits and the same greedy generation; settings zoo cannot reproduce
are refused with the reason."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

import zoo
from zoo.convert.__main__ import main
from zoo.convert.qwen3_next import qwen3_next_config_to_zoo
from zoo.data import byte_tokenizer

LINEAR, FULL = "linear_attention", "full_attention"


def tiny_config(**overrides) -> Qwen3NextConfig:
    config = dict(
        vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=4, layer_types=[LINEAR] * 3 + [FULL],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.25},
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Qwen3NextConfig(**{**config, **overrides})


def perturb(model):
    """Every weight off its init (zero-centred norms, A_log, dt_bias included) so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"mlp_only_layers": [1]}])
def test_convert_cli_logits_and_greedy_generation_match(tmp_path, capsys, overrides):
    torch.manual_seed(0)
    hf = perturb(Qwen3NextForCausalLM(tiny_config(**overrides)).float())
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert isinstance(converted, zoo.ZooForCausalLM)
    spec = converted.config.model_config()
    assert spec.blocks == ["gated_deltanet"] * 3 + ["attention"] and spec.norm == "rmsnorm_zero_centred"
    x = torch.randint(3, 259, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)
        kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = hf.generate(x, **kwargs)
        assert torch.equal(converted.generate(x, **kwargs), expected)


@pytest.mark.parametrize("overrides, message", [
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"shared_expert_intermediate_size": 24}, "shared_expert_intermediate_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}, "rope_type"),
])
def test_settings_zoo_cannot_reproduce_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        qwen3_next_config_to_zoo(tiny_config(**overrides))


def test_kimi_linear_is_refused_with_the_reason(tmp_path, capsys):
    from transformers import KimiLinearConfig

    KimiLinearConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path / "kimi")
    assert main([str(tmp_path / "kimi"), str(tmp_path / "zoo")]) != 0
    err = capsys.readouterr().err
    assert "kimi_linear" in err and "multi-head latent attention" in err and not (tmp_path / "zoo").exists()
