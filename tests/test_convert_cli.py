"""``python -m zoo.convert HF_DIR OUT_DIR`` on tiny random Llama, Mistral, Mixtral, Mamba, Mamba-2 checkpoints and,
when flash-linear-attention is installed, fla RWKV-6, RWKV-7 and RetNet ones (run through fla's torch references,
tests/fla_torch.py)."""
import contextlib

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM,
    MambaConfig, MambaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3NextForCausalLM,
)

from fla_torch import fla_retnet_on_torch, fla_rwkv6_on_torch, fla_rwkv7_on_torch
from test_convert_qwen3_next import tiny_config as tiny_qwen3_next_config
import zoo
from zoo.convert.__main__ import CONVERTERS, main
from zoo.data import byte_tokenizer

ATTN = dict(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0)
SSM = dict(vocab_size=259, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
TINY = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**ATTN)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**ATTN, sliding_window=None)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**ATTN, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_next": lambda: Qwen3NextForCausalLM(tiny_qwen3_next_config()),
    "mamba": lambda: MambaForCausalLM(MambaConfig(**SSM, time_step_rank=4)),
    "mamba2": lambda: Mamba2ForCausalLM(Mamba2Config(**SSM, num_heads=4, head_dim=16, n_groups=1, chunk_size=16)),
    "retnet": lambda: tiny_fla_retnet(),
    "rwkv6": lambda: tiny_fla_rwkv6(),
    "rwkv7": lambda: tiny_fla_rwkv7(),
}
# model_type -> context in which the source model is built and runs on CPU (fla's Triton ops -> its torch references)
RUN_SOURCE = {"retnet": fla_retnet_on_torch, "rwkv6": fla_rwkv6_on_torch, "rwkv7": fla_rwkv7_on_torch}


def tiny_fla_retnet(**overrides):
    """A 2-layer fla RetNetForCausalLM: 2 heads of 16, value width 2 x 16, per-head RMSNorm with a weight, SwiGLU."""
    pytest.importorskip("fla")
    from fla.models import RetNetConfig, RetNetForCausalLM

    config = dict(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_heads=2, expand_k=1, expand_v=2, hidden_ratio=2,
                  fuse_norm=False, fuse_swiglu=False, use_cache=False)
    return RetNetForCausalLM(RetNetConfig(**{**config, **overrides}))


def tiny_fla_rwkv6(**overrides):
    """A 2-layer fla RWKV6ForCausalLM with zoo's widths (expand_k = expand_v = 1); GroupNorm eps 1e-5."""
    pytest.importorskip("fla")
    from fla.models import RWKV6Config, RWKV6ForCausalLM

    config = dict(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_heads=2, expand_k=1, expand_v=1,
                  proj_low_rank_dim=4, gate_low_rank_dim=8, hidden_ratio=3, fuse_norm=False)
    return RWKV6ForCausalLM(RWKV6Config(**{**config, **overrides}))


def tiny_fla_rwkv7(**overrides):
    """A 3-layer fla RWKV7ForCausalLM (layers 1 and 2 read layer 0's values); head_dim 16, norm_eps 1e-5: GroupNorm
    eps 1.6e-4, not zoo's default 6.4e-4."""
    pytest.importorskip("fla")
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    ranks = dict(decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=4)
    config = dict(vocab_size=259, hidden_size=32, num_hidden_layers=3, head_dim=16, hidden_ratio=3, fuse_norm=False, **ranks)
    return RWKV7ForCausalLM(RWKV7Config(**{**config, **overrides}))


def perturb(model):
    """Move every weight off its init (norms, D, biases) so a wrong mapping cannot hide; sharpen routers."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_every_converter_is_tested():
    assert sorted(TINY) == sorted(CONVERTERS)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_convert_cli_logits_match(tmp_path, model_type, capsys):
    torch.manual_seed(0)
    with RUN_SOURCE.get(model_type, contextlib.nullcontext)():
        hf = perturb(TINY[model_type]())
        assert hf.config.model_type == model_type
        hf.save_pretrained(tmp_path / "hf")
        byte_tokenizer().save_pretrained(tmp_path / "hf")
        assert main([str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
        assert "wrote" in capsys.readouterr().out
        converted = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo")
        assert isinstance(converted, zoo.ZooForCausalLM)
        assert (tmp_path / "zoo" / "tokenizer.json").is_file()
        x = torch.randint(0, 259, (2, 11))
        with torch.no_grad():
            expected = hf(x).logits
            torch.testing.assert_close(converted(x).logits, expected, atol=1e-4, rtol=1e-4)
            if model_type in RUN_SOURCE:  # fla models: the converted model's chunked prefill + decode too
                out = converted(x[:, :4], use_cache=True)
                cache = out.cache
                parts = [out.logits, converted(x[:, 4:7], cache=cache, use_cache=True).logits]
                parts += [converted(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(7, 11)]
                torch.testing.assert_close(torch.cat(parts, 1), expected, atol=1e-4, rtol=1e-4)


def test_convert_cli_errors_name_the_problem(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    MistralForCausalLM(MistralConfig(**ATTN, sliding_window=16)).save_pretrained(tmp_path / "sliding")
    capsys.readouterr()  # save_pretrained's progress bars
    assert main([str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo.convert: error:") and "model_type 'gpt2' has no zoo converter" in err and "mamba2" in err
    assert main([str(tmp_path / "sliding"), str(tmp_path / "out")]) == 2
    assert "sliding-window attention is not supported" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported (zoo's rwkv7_cmix uses sqrelu)"),
    ({"norm_bias": False}, "norm_bias=False is not supported"),
])
def test_fla_settings_zoo_cannot_reproduce_are_refused(tmp_path, capsys, overrides, message):
    with RUN_SOURCE["rwkv7"]():
        tiny_fla_rwkv7(**overrides).save_pretrained(tmp_path / "hf")
        capsys.readouterr()
        assert main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot convert this rwkv7 checkpoint" in err and message in err


def test_fla_configs_zoo_cannot_reproduce_are_refused():
    """Settings whose fla models do not build at tiny sizes: checked on the configs."""
    pytest.importorskip("fla")
    from fla.models import RetNetConfig, RWKV6Config, RWKV7Config

    from zoo.convert.fla import retnet_config_to_zoo, rwkv6_config_to_zoo, rwkv7_config_to_zoo

    with pytest.raises(ValueError, match=r"value_dim \[64, 64\] != hidden_size 32 is not supported"):
        rwkv7_config_to_zoo(RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, value_dim=64))
    with pytest.raises(ValueError, match="attn=.*softmax-attention layers are not supported"):
        rwkv7_config_to_zoo(RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, attn={"layers": [1], "num_heads": 2}))
    with pytest.raises(ValueError, match="num_kv_heads=1 is not supported by zoo's retnet block"):
        retnet_config_to_zoo(RetNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, num_kv_heads=1))
    with pytest.raises(ValueError, match="use_short_conv=True is not supported"):
        retnet_config_to_zoo(RetNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, use_short_conv=True))
    with pytest.raises(ValueError, match=r"expand_k=0.5, expand_v=1.0: zoo's rwkv6 has key and value width d_model"):
        rwkv6_config_to_zoo(RWKV6Config(hidden_size=32, num_hidden_layers=2, num_heads=2))


def test_fla_gla_is_refused_with_the_reason(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gla"}')
    assert main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'gla' is not converted" in err and "zoo has no gated linear attention (GLA) block" in err


@pytest.mark.parametrize("model_type", sorted(RUN_SOURCE))
def test_fla_checkpoints_with_fused_norms_convert(model_type):
    """fla's default fuse_norm=True (the hub checkpoints') names some norms differently (RetNet's
    g_norm_swish_gate); the key maps take both. The fused model gets the unfused one's (perturbed) weights, parameter
    for parameter, and converts to the same zoo weights. Weights only: fla's fused norms need a GPU to run."""
    with RUN_SOURCE[model_type]():
        hf = perturb(TINY[model_type]())
    fused_config = type(hf.config)(**{**hf.config.to_dict(), "fuse_norm": True})
    fused = type(hf)(fused_config)
    with torch.no_grad():
        for (fused_name, p), (name, q) in zip(fused.state_dict().items(), hf.state_dict().items(), strict=True):
            assert p.shape == q.shape, (fused_name, name)
            p.copy_(q)
    expected = CONVERTERS[model_type][1](hf).state_dict()
    converted = CONVERTERS[model_type][1](fused).state_dict()
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
