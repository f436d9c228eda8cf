"""The Qwen3 / Qwen3-Next options of attention, norms and MoE: off by default (outputs as before), each changes the
output, together they match transformers' Qwen3-Next modules, and bad values name their key path."""
import pytest
import torch
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next import modeling_qwen3_next as hf

import zoo
from zoo.config import ModelConfig
from zoo.layers import Attention, AttentionConfig, MoE, MoEConfig
from zoo.layers.attention import apply_rope, rope_table
from zoo.layers.norm import NORMS, ZeroCentredRMSNorm

D = 32


def attention(backend="sdpa", **kw) -> Attention:
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, backend=backend, **kw)
    cfg.validate(D)
    torch.manual_seed(0)
    block = Attention(cfg, D, 0).double()
    for module in (getattr(block, "q_norm", None), getattr(block, "k_norm", None)):
        if module is not None:  # away from the identity, so that a wrong norm shows
            torch.nn.init.normal_(module.weight, 0.0, 0.5)
    return block


def test_options_off_compute_plain_attention_bit_for_bit():
    """Defaults: q/k/v projections, full RoPE, softmax attention, o_proj, the same ops as before the options."""
    block = attention()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    B, T, H, Hkv, Dh = 2, 7, 4, 2, 8
    q = block.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k = block.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
    v = block.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
    cos, sin = rope_table(T, Dh, 10000.0, x.device, x.dtype)
    q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
    y = block._attend(q, k, v, None).transpose(1, 2).reshape(B, T, H * Dh)
    assert torch.equal(block(x)[0], block.o_proj(y))
    assert block.q_proj.out_features == H * Dh and not hasattr(block, "q_norm")


@pytest.mark.parametrize("option", [{"output_gate": True}, {"qk_norm": "rmsnorm"}, {"qk_norm": "rmsnorm_zero_centred"},
                                    {"partial_rotary_factor": 0.5}])
def test_each_option_changes_the_output_and_keeps_the_cache_exact(option):
    x = torch.randn(2, 9, D, dtype=torch.float64)
    base, block = attention(), attention(**option)
    if "output_gate" in option:  # same query rows as the base, so only the gate differs
        block.q_proj.weight.data.view(4, 16, D)[:, :8] = base.q_proj.weight.data.view(4, 8, D)
        for name in ("k_proj", "v_proj", "o_proj"):
            getattr(block, name).load_state_dict(getattr(base, name).state_dict())
    else:
        block.load_state_dict(base.state_dict(), strict=False)
    y = block(x)[0]
    assert not torch.allclose(y, base(x)[0])
    _, state = block(x[:, :5])
    y_step, state = block(x[:, 5:8], state)
    torch.testing.assert_close(y_step, y[:, 5:8], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block(x[:, 8:], state)[0], y[:, 8:], rtol=1e-12, atol=1e-12)


def test_partial_rope_leaves_the_other_channels_alone():
    block = attention(partial_rotary_factor=0.25)
    assert block.rotary_dim == 2
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    cos, sin = rope_table(6, 2, 10000.0, q.device, q.dtype)
    out = block._rotate(q, cos[:6], sin[:6])
    assert torch.equal(out[..., 2:], q[..., 2:]) and not torch.equal(out[..., :2], q[..., :2])


def hf_config(**kw) -> Qwen3NextConfig:
    cfg = dict(vocab_size=64, hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
               num_hidden_layers=1, layer_types=["full_attention"])
    cfg.update(kw)
    config = Qwen3NextConfig(**cfg)
    config._attn_implementation = "eager"
    return config


def test_gated_attention_matches_qwen3_next_attention():
    config = hf_config()
    torch.manual_seed(1)
    ref = hf.Qwen3NextAttention(config, 0).double()
    for norm in (ref.q_norm, ref.k_norm):
        torch.nn.init.normal_(norm.weight, 0.0, 0.5)
    block = attention(output_gate=True, qk_norm="rmsnorm_zero_centred", partial_rotary_factor=0.25)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, D, dtype=torch.float64)
    positions = torch.arange(11)[None].expand(2, -1)
    cos, sin = hf.Qwen3NextRotaryEmbedding(config)(x, positions)
    mask = torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    expected = ref(x, (cos, sin), mask)[0]
    # transformers' eager attention takes its softmax in fp32 (zoo's eager path attends in fp32 throughout).
    torch.testing.assert_close(block(x)[0], expected, rtol=1e-6, atol=1e-6)
    block.set_backend("eager")
    torch.testing.assert_close(block(x)[0], expected, rtol=1e-6, atol=1e-6)


def test_gated_attention_gradients_match_qwen3_next_attention(monkeypatch):
    """The backward too (issue 27: the hybrid with these options stalls on MQAR): every parameter's gradient and the
    input's of a random loss, fp64, with transformers' fp32 islands (eager softmax, the norms' ``x.float()``) in fp64."""
    def eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key, value = hf.repeat_kv(key, module.num_key_value_groups), hf.repeat_kv(value, module.num_key_value_groups)
        weights = torch.softmax(query @ key.transpose(2, 3) * scaling + attention_mask, dim=-1)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    def norm64(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(hf, "eager_attention_forward", eager64)
    monkeypatch.setattr(hf, "ALL_ATTENTION_FUNCTIONS", type("Eager64", (), {"get_interface": staticmethod(lambda name, default: eager64)})())
    monkeypatch.setattr(hf.Qwen3NextRMSNorm, "forward", norm64)
    monkeypatch.setattr(ZeroCentredRMSNorm, "forward", norm64)
    config = hf_config()
    torch.manual_seed(4)
    ref = hf.Qwen3NextAttention(config, 0).double()
    for norm in (ref.q_norm, ref.k_norm):
        torch.nn.init.normal_(norm.weight, 0.0, 0.5)
    block = attention(output_gate=True, qk_norm="rmsnorm_zero_centred", partial_rotary_factor=0.25)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, D, dtype=torch.float64)
    probe = torch.randn(2, 11, D, dtype=torch.float64)
    cos, sin = hf.Qwen3NextRotaryEmbedding(config)(x, torch.arange(11)[None].expand(2, -1))
    mask = torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    x_ref, x_zoo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(x_ref, (cos, sin), mask)[0] * probe).sum().backward()
    (block(x_zoo)[0] * probe).sum().backward()
    grads = dict(ref.named_parameters())
    assert set(grads) == {name for name, _ in block.named_parameters()}
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(x_zoo.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_gated_attention_in_a_model_inits_like_qwen3_next():
    """A built model's gated attention: q_proj (query and gate halves), k/v/o_proj normal(0, init_std) as
    transformers' ``_init_weights`` (initializer_range 0.02), the zero-centred q/k norms' weights zero (scale 1)."""
    spec = {"d_model": 64, "n_layers": 1, "vocab_size": 50, "blocks": ["attention"], "init_std": 0.02,
            "attention": {"n_heads": 2, "output_gate": True, "qk_norm": "rmsnorm_zero_centred", "partial_rotary_factor": 0.25}}
    torch.manual_seed(5)
    model = zoo.ZooForCausalLM(zoo.ZooConfig.from_model_config(ModelConfig.from_dict(spec)))
    block = model.model.layers[0].mixer
    assert torch.equal(block.q_norm.weight, torch.zeros(32)) and torch.equal(block.k_norm.weight, torch.zeros(32))
    query, gate = block.q_proj.weight.view(2, 2, 32, 64).unbind(1)  # per head [query | gate] rows
    for weight in (query, gate, block.k_proj.weight, block.v_proj.weight, block.o_proj.weight):
        assert abs(weight.mean().item()) < 0.002 and abs(weight.std().item() - 0.02) < 0.001


def test_zero_centred_rmsnorm_matches_qwen3_next():
    torch.manual_seed(2)
    ref, norm = hf.Qwen3NextRMSNorm(D, eps=1e-6), NORMS["rmsnorm_zero_centred"](D, 1e-6)
    assert torch.equal(norm.weight, torch.zeros(D))  # scale 1 at init
    torch.nn.init.normal_(ref.weight)
    norm.load_state_dict(ref.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, D).to(dtype)
        assert torch.equal(norm(x), ref(x))
    plain = NORMS["rmsnorm"](D, 1e-6)
    plain.load_state_dict(ref.state_dict())
    assert not torch.allclose(norm(x).float(), plain(x).float())


def test_model_norm_zero_centred_changes_a_model_and_inits_to_one():
    cfg = {"d_model": D, "n_layers": 2, "vocab_size": 50, "norm_eps": 1e-6}
    models = {}
    for norm in ("rmsnorm", "rmsnorm_zero_centred"):
        torch.manual_seed(3)
        models[norm] = zoo.ZooForCausalLM(zoo.ZooConfig.from_model_config(ModelConfig.from_dict({**cfg, "norm": norm})))
    zc = models["rmsnorm_zero_centred"]
    assert isinstance(zc.model.norm, ZeroCentredRMSNorm) and torch.equal(zc.model.norm.weight, torch.zeros(D))
    ids = torch.randint(0, 50, (1, 6))
    # Same scale 1 at init, so the same logits; a trained (nonzero) weight w scales by 1 + w instead of w.
    torch.testing.assert_close(zc(ids).logits, models["rmsnorm"](ids).logits)
    with torch.no_grad():
        zc.model.norm.weight.fill_(0.5)
        models["rmsnorm"].model.norm.weight.fill_(0.5)
    assert not torch.allclose(zc(ids).logits, models["rmsnorm"](ids).logits)


def test_moe_shared_expert_gate_matches_qwen3_next_sparse_moe():
    config = hf_config(hidden_act="silu")
    torch.manual_seed(4)
    ref = hf.Qwen3NextSparseMoeBlock(config).double()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, shared_experts=1, shared_expert_gate=True, dispatch="loop")
    moe = MoE(cfg, D, 0).double()
    gate_up, down = ref.experts.gate_up_proj.data, ref.experts.down_proj.data  # [E, 2I, D], [E, D, I]
    state = {"gate.weight": ref.gate.weight.data, "w_gate": gate_up[:, :16].transpose(1, 2), "w_up": gate_up[:, 16:].transpose(1, 2),
             "w_down": down.transpose(1, 2), "shared_gate.weight": ref.shared_expert_gate.weight.data,
             **{f"shared.{k}": v for k, v in ref.shared_expert.state_dict().items()}}
    moe.load_state_dict(state)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    expected = ref(x)
    torch.testing.assert_close(moe(x), expected, rtol=1e-6, atol=1e-6)  # transformers routes in fp32
    ungated = MoE(MoEConfig(**{**cfg.__dict__, "shared_expert_gate": False}), D, 0).double()
    ungated.load_state_dict({k: v for k, v in state.items() if k != "shared_gate.weight"})
    assert not torch.allclose(ungated(x), expected)


@pytest.mark.parametrize("section, kw, key", [
    ("attention", {"partial_rotary_factor": 0.0}, "attention.partial_rotary_factor"),
    ("attention", {"partial_rotary_factor": 1.5}, "attention.partial_rotary_factor"),
    ("attention", {"partial_rotary_factor": 0.125}, "attention.partial_rotary_factor"),  # 1 of 8 channels: odd
    ("attention", {"qk_norm": "batchnorm"}, "attention.qk_norm"),
    ("attention", {"qk_norm_eps": 0.0}, "attention.qk_norm_eps"),
    ("attention", {"output_gate": "yes"}, "attention.output_gate"),
    ("moe", {"shared_expert_gate": True}, "moe.shared_expert_gate"),
])
def test_config_errors_name_the_key_path(section, kw, key):
    spec = {"d_model": D, "n_layers": 2, section: {"n_heads": 4, **kw} if section == "attention" else kw}
    if section == "moe":
        spec["ffn"] = "moe"
    with pytest.raises(zoo.ConfigError, match=rf"model\.{key}"):
        ModelConfig.from_dict(spec)


def test_model_norm_error_lists_the_zero_centred_norm():
    with pytest.raises(zoo.ConfigError, match="rmsnorm_zero_centred"):
        ModelConfig.from_dict({"d_model": D, "n_layers": 2, "norm": "groupnorm"})
