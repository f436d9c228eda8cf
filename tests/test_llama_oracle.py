"""zoo's attention model loads a tiny random HF Llama (GQA, RoPE) and matches its logits in fp32."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import prefill_then_decode_logits
from zoo.convert import convert_state_dict
from zoo.convert.llama import LLAMA_KEY_MAP, from_llama


def tiny_llama(**kw):
    cfg = dict(
        vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=512, rms_norm_eps=1e-6,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "head_dim": 16}])
def test_logits_match_llama(kw):
    hf = tiny_llama(**kw)
    zoo_model = from_llama(hf).eval()
    x = torch.randint(0, 101, (2, 47))
    with torch.no_grad():
        torch.testing.assert_close(zoo_model(x).logits, hf(x).logits, atol=1e-5, rtol=0)


def test_decode_matches_llama_with_cache():
    hf = tiny_llama()
    zoo_model = from_llama(hf).eval()
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(prefill_then_decode_logits(zoo_model, x, 8), hf(x).logits[:, 8:], atol=1e-5, rtol=0)


def test_unmapped_weight_is_an_error():
    with pytest.raises(KeyError, match="'model.layers.0.self_attn.rotary.weight' has no zoo counterpart"):
        convert_state_dict({"model.layers.0.self_attn.rotary.weight": torch.zeros(1)}, LLAMA_KEY_MAP, "Llama")


def test_unsupported_llama_feature_is_refused():
    hf = tiny_llama(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        from_llama(hf)
