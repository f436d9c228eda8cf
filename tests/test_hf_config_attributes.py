"""transformers' standard config attributes on ``ZooConfig`` (derived from the spec, read-only, per layer where layers
differ), read the way transformers and third-party tools read them: the shapes of ``generate``'s dict outputs and of
the cache, a transformers ``StaticCache`` built from the config; gradients reach the returned hidden states and
attention maps."""
import json

import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import LinearAttentionLayer, StaticLayer
from transformers.configuration_utils import ALLOWED_LAYER_TYPES, get_head_shapes
from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

import zoo  # noqa: F401  (registers the zoo model type)
from zoo.layers import FFNS, MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM, output_cache

VOCAB = 61
ARGS = {
    "attention": {"n_heads": 4, "n_kv_heads": 2, "rope_theta": 5000.0, "backend": "eager"},
    "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
}
MODELS = {"attention": ["attention"], "recurrent": ["mamba2"], "hybrid": ["mamba2", "attention"]}
MODES = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 0}, "beam": {"do_sample": False, "num_beams": 2}}


def config(blocks, ffn="swiglu", n_layers=2, **module_args):
    args = {name: ARGS[name] for name in blocks if name in ARGS}
    return ZooConfig(d_model=32, n_layers=n_layers, blocks=list(blocks), ffn=ffn, vocab_size=VOCAB, module_args={**args, **module_args})


def model(blocks, **kw):
    torch.manual_seed(0)
    return ZooForCausalLM(config(blocks, **kw)).eval()


def test_attributes_of_an_attention_a_recurrent_and_a_hybrid_model():
    attention, recurrent, hybrid = (config(MODELS[name]) for name in ("attention", "recurrent", "hybrid"))
    assert attention.layer_types == ["full_attention"] * 2 and hybrid.layer_types == ["linear_attention", "full_attention"]
    for c in (attention, hybrid):
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta) == (4, 2, 8, 5000.0)
    # Without attention: no heads, no head size, no RoPE base (rather than a made-up count).
    assert recurrent.layer_types == ["linear_attention"] * 2
    assert (recurrent.num_attention_heads, recurrent.num_key_value_heads, recurrent.head_dim, recurrent.rope_theta) == (0, 0, None, None)
    for c in (attention, recurrent, hybrid):
        assert c.intermediate_size == 128  # SwiGLU's 8/3 * 32 rounded up to a multiple of 64
        assert c.max_position_embeddings is None  # no block limits positions
        assert c.num_hidden_layers == 2 and c.hidden_size == 32 and not c.is_heterogeneous


@pytest.mark.parametrize("name", MODELS)
def test_attributes_match_the_built_modules(name):
    m = model(MODELS[name])
    c = m.config
    for layer, layer_type in zip(m.model.layers, c.layer_types):
        assert layer.ffn.up_proj.out_features == c.intermediate_size
        if layer_type == "full_attention":
            assert layer.mixer.q_proj.out_features == c.num_attention_heads * c.head_dim
            assert layer.mixer.k_proj.out_features == c.num_key_value_heads * c.head_dim
        else:
            assert not hasattr(layer.mixer, "q_proj")


def test_short_conv_attention_and_conv_blocks_have_transformers_layer_types():
    c = config(["conv", "attention"], attention={**ARGS["attention"], "short_conv": 4})
    assert c.layer_types == ["conv", "hybrid"]  # a KV cache and a convolution state in one layer
    for name in MIXERS.names():  # every registered block names a kind transformers knows
        assert MIXERS.get(name).cls.layer_type in ALLOWED_LAYER_TYPES, name


def test_every_ffn_states_its_hidden_size():
    for name in FFNS.names():
        assert callable(getattr(FFNS.get(name).config_cls, "resolved_hidden_size", None)), name
    c = config(["attention"], ffn="rwkv7_cmix")
    assert c.intermediate_size == 128  # RWKV-7's 4 * d_model
    assert config(["attention"], ffn="none").intermediate_size == 0


def test_mixed_ffn_sizes_are_per_layer_as_in_transformers_heterogeneous_configs(tmp_path):
    c = config(MODELS["hybrid"], ffn=["swiglu", "moe"], n_layers=4, moe={"num_experts": 4, "top_k": 2, "expert_hidden": 48})
    assert c.is_heterogeneous and c.per_layer_attributes == {"intermediate_size"}
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError, match="per_layer_config"):
        c.intermediate_size
    assert [layer.intermediate_size for layer in c.per_layer_config] == [128, 48, 128, 48]
    assert [layer.num_attention_heads for layer in c.per_layer_config] == [4] * 4  # uniform ones stay global
    m = ZooForCausalLM(c)
    assert m.model.layers[0].ffn.up_proj.out_features == 128 and m.model.layers[1].ffn.expert_hidden == 48
    m.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    derived = {"layer_types", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "intermediate_size",
               "max_position_embeddings", "per_layer_config"}
    assert not derived & set(saved)  # the spec is saved, nothing derived from it
    loaded = ZooForCausalLM.from_pretrained(tmp_path).config
    assert [layer.intermediate_size for layer in loaded.per_layer_config] == [128, 48, 128, 48]


def test_attributes_are_read_only_and_follow_the_spec():
    c = config(MODELS["attention"])
    c.num_attention_heads = 4  # the same value: allowed (transformers re-sets attributes it reads)
    with pytest.raises(ValueError, match=r"attention\.n_heads"):
        c.num_attention_heads = 8
    with pytest.raises(ValueError, match="blocks"):
        c.layer_types = ["linear_attention"] * 2
    c.module_args = {"attention": {"n_heads": 2}}
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, 16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_generate_dict_output_shapes_follow_the_config_attributes(name, mode):
    m = model(MODELS[name])
    c = m.config
    B, P, N = 2, 5, 3
    torch.manual_seed(1)
    prompt = torch.randint(3, VOCAB, (B, P))
    out = m.generate(
        prompt, max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
        output_hidden_states=True, output_attentions=True, **MODES[mode],
    )
    rows = B * MODES[mode].get("num_beams", 1)
    n_attention = c.layer_types.count("full_attention")  # recurrent layers compute no attention map (as Jamba)
    assert len(out.hidden_states) == len(out.attentions) == N
    for step in range(N):
        width = P if step == 0 else 1
        assert [h.shape for h in out.hidden_states[step]] == [(rows, width, c.hidden_size)] * (c.num_hidden_layers + 1)
        assert [a.shape for a in out.attentions[step]] == [(rows, c.num_attention_heads, width, P + step)] * n_attention
    cache = output_cache(out)
    for layer, layer_type in zip(cache.layers, c.layer_types):
        if layer_type == "full_attention":
            assert layer.keys.shape == (rows, c.num_key_value_heads, P + N - 1, c.head_dim)
        else:
            assert layer.keys is None


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_the_returned_hidden_states_and_attentions(name, padded):
    m = model(MODELS[name])
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0  # the rows run one by one; the returned states are still the ones the next layer reads
    out = m(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, use_cache=False)
    assert len(out.hidden_states) == m.config.num_hidden_layers + 1
    assert len(out.attentions) == m.config.layer_types.count("full_attention")
    for tensor in (*out.hidden_states, *out.attentions):
        tensor.retain_grad()
    out.logits[:, -1].sum().backward()
    assert all(h.grad is not None and bool(h.grad.abs().sum() > 0) for h in out.hidden_states)
    if not padded:  # a padded batch's maps are its rows' maps stacked (no batch-wide map exists)
        assert all(a.grad is not None and bool(a.grad.abs().sum() > 0) for a in out.attentions)
    if padded:
        assert bool((out.hidden_states[1][0, :2] == 0).all())  # zeros at the padding, as before
        with torch.no_grad():
            alone = m(ids[:1, 2:], output_hidden_states=True, use_cache=False)
        for batch, row in zip(out.hidden_states, alone.hidden_states):
            torch.testing.assert_close(batch[0, 2:], row[0], atol=1e-5, rtol=1e-5)


def test_a_transformers_static_cache_built_from_the_config():
    """What a serving tool does: size a StaticCache from the config alone, then let the model's KV go into it."""
    m = model(MODELS["attention"])
    c = m.config
    assert get_head_shapes(c) == (c.num_key_value_heads, c.head_dim) == (2, 8)
    cache = StaticCache(config=c, max_cache_len=16)
    assert len(cache.layers) == c.num_hidden_layers and all(isinstance(layer, StaticLayer) for layer in cache.layers)
    cache.early_initialization(3, c.num_key_value_heads, c.head_dim, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ours = output_cache(m(torch.randint(3, VOCAB, (3, 5)), use_cache=True))
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == (3, c.num_key_value_heads, 16, c.head_dim)
        keys, values = cache.update(ours.layers[i].keys, ours.layers[i].values, i)
        torch.testing.assert_close(keys[:, :, :5], ours.layers[i].keys)
    hybrid = StaticCache(config=config(MODELS["hybrid"]), max_cache_len=16)
    assert isinstance(hybrid.layers[0], LinearAttentionLayer) and isinstance(hybrid.layers[1], StaticLayer)


def test_a_hybrid_reports_layer_types_attentions_and_hidden_states_as_transformers_jamba():
    """A zoo Mamba-2 + attention hybrid and a transformers Jamba of the same pattern give the same layer_types, and the
    same number and shapes of attention maps (attention layers only) and hidden states."""
    from transformers import JambaConfig, JambaModel

    jamba_config = JambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, mamba_d_state=8, mamba_dt_rank=4, attn_implementation="eager",
    )
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        jamba = JambaModel(jamba_config).eval()(ids, output_attentions=True, output_hidden_states=True)
        ours = model(MODELS["hybrid"]).model(ids, output_attentions=True, output_hidden_states=True)
    assert config(MODELS["hybrid"]).layer_types == jamba_config.layer_types == ["linear_attention", "full_attention"]
    assert [a.shape for a in ours.attentions] == [a.shape for a in jamba.attentions] == [(2, 4, 5, 5)]
    assert [h.shape for h in ours.hidden_states] == [h.shape for h in jamba.hidden_states]
