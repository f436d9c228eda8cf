import json

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import zoo
from zoo.config import ModelConfig
from zoo.modeling import CACHE_FIELD, ZooConfig, ZooForCausalLM, ZooModel, output_cache


def tiny(blocks=("lstm", "attention"), **kw):
    spec = ModelConfig.from_dict(
        {"d_model": 32, "n_layers": 4, "blocks": list(blocks), "vocab_size": 50, "attention": {"n_heads": 4, "n_kv_heads": 2}, **kw}
    )
    torch.manual_seed(0)
    return ZooForCausalLM.from_spec(spec, eos_token_id=0).eval()


def test_pattern_tiles_layers():
    m = tiny(["lstm", "attention"], ffn=["swiglu", "none"])
    kinds = [(type(l.mixer).__name__, type(l.ffn).__name__) for l in m.model.layers]
    assert kinds == [("LSTM", "SwiGLU"), ("Attention", "NoneType"), ("LSTM", "SwiGLU"), ("Attention", "NoneType")]


def test_a_model_keeps_its_validated_spec_and_a_loaded_config_validates_once(tmp_path, monkeypatch):
    """from_spec keeps the spec object (no second validation); a loaded config.json is validated once, and setting a
    saved field validates the new fields on the next read. Counted for this spec's d_model: older transformers (5.8)
    also build default configs while saving and loading, each validated once as it is built."""
    from zoo.layers import AttentionConfig

    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "blocks": ["attention"], "vocab_size": 50})
    calls = []
    validate = AttentionConfig.validate
    monkeypatch.setattr(AttentionConfig, "validate", lambda self, d_model: calls.append(d_model) or validate(self, d_model))
    m = ZooForCausalLM.from_spec(spec, eos_token_id=0)
    assert calls == [] and m.config.model_config() == spec and m.config.eos_token_id == 0
    assert "_validated_spec" not in m.config.to_dict()
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert calls.count(32) == 1 and loaded.config.model_config() == spec
    loaded.config.module_args = {"attention": {"n_heads": 2}}
    assert loaded.config.model_config().args_for("attention").n_heads == 2 and calls.count(32) == 2


def test_save_load_with_auto_classes(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert AutoConfig.from_pretrained(tmp_path).model_type == "zoo"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ZooForCausalLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), ZooModel)
    x = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(loaded(x).logits, m(x).logits)


def test_bad_config_json_names_the_key(tmp_path):
    m = tiny()
    m.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["module_args"]["attention"]["n_headz"] = 3  # a hand-edited file
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(zoo.ConfigError, match=r"config\.attention\.n_headz: unknown key"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    # Saving checks the spec where transformers validates a config before writing it (5.25: tested), naming the key.
    m.config.module_args["attention"]["n_headz"] = 3
    if Version(transformers.__version__) >= Version("5.25"):
        with pytest.raises(Exception, match=r"config\.attention\.n_headz: unknown key"):  # huggingface_hub's validation error
            m.config.save_pretrained(tmp_path)


@pytest.mark.parametrize("blocks", [("attention",), ("lstm",), ("lstm", "attention")])
def test_greedy_generate_equals_full_forward_argmax(blocks):
    m = tiny(blocks)
    prompt = torch.randint(1, 50, (1, 6))
    out = m.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 18)
    seq = prompt
    for _ in range(12):
        nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_tied_embeddings_share_one_tensor(tmp_path):
    m = tiny(tie_embeddings=True)
    assert m.lm_head.weight.data_ptr() == m.model.embed.weight.data_ptr()
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, m.lm_head.weight)


def test_labels_give_shifted_loss():
    m = tiny()
    x = torch.randint(0, 50, (2, 9))
    out = m(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randint(0, 50, (9,)), r"input_ids: expected shape \[batch, seq_len\], got \[9\]"),
        (torch.rand(2, 9), "input_ids: expected an integer tensor, got torch.float32"),
        (torch.full((2, 9), 50), r"token ids must be in \[0, 50\), got values in \[50, 50\]"),
        (torch.full((2, 9), -1), r"token ids must be in \[0, 50\)"),
    ],
)
def test_bad_input_ids_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny()(bad)


@pytest.mark.parametrize("use_cache", [False, True])
def test_right_padded_rows_equal_their_tokens_alone(use_cache):
    """Right padding (transformers' default padding side): every row's tokens give the logits and the cache they give
    alone, so a continuation from the cache skips the padding."""
    model = tiny()
    x = torch.randint(1, 50, (2, 6))
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    with torch.no_grad():
        out = model(x, attention_mask=mask, use_cache=use_cache)
        alone = model(x[:1, :4], use_cache=True)
        torch.testing.assert_close(out.logits[0, :4], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits[1], model(x[1:]).logits[0], atol=1e-5, rtol=1e-5)
        if use_cache:
            nxt = torch.randint(1, 50, (2, 1))
            step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), **{CACHE_FIELD: output_cache(out)}).logits
            alone_step = model(nxt[:1], **{CACHE_FIELD: output_cache(alone)}).logits
            torch.testing.assert_close(step[0], alone_step[0], atol=1e-5, rtol=1e-5)


def test_a_gap_between_tokens_is_refused_not_silently_wrong():
    x = torch.randint(0, 50, (2, 5))
    mask = torch.ones_like(x)
    mask[0, 2] = 0  # left and right padding are supported; a pad between two tokens is not
    with pytest.raises(ValueError, match="padded position between two tokens in row 0"):
        tiny()(x, attention_mask=mask)
