"""RetNet: the three retention forms agree (values and gradients), the block matches the paper's equations, HF round trip."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import greedy_by_full_forward
import zoo
from zoo.config import ModelConfig
from zoo.errors import BackendUnavailableError, ConfigError
from zoo.kernels.retention import retention
from zoo.layers import MIXERS, RetNet, RetNetConfig
from zoo.modeling import ZooConfig, ZooForCausalLM

B, H, K, V = 2, 3, 6, 10  # head dims deliberately not powers of two


def inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    log_decay = torch.log1p(-torch.exp2(-5.0 - torch.arange(H, dtype=torch.float64)))
    return [t.requires_grad_() for t in (q, k, v, log_decay, s0)]


def run(form, tensors, chunk_size=64):
    q, k, v, log_decay, s0 = tensors
    o, final = retention(q, k, v, log_decay, s0, form=form, chunk_size=chunk_size)
    # Weighted sums so every output element and state element gets its own gradient.
    loss = (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() + (final.sin()).sum()
    return o, final, torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("form, chunk_size", [("parallel", 64), ("chunk", 64), ("chunk", 16), ("chunk", 7)])
def test_forms_agree_with_recurrent_reference(T, form, chunk_size):
    tensors = inputs(T)
    o_ref, s_ref, g_ref = run("recurrent", tensors)
    o, s, grads = run(form, tensors, chunk_size)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(["q", "k", "v", "log_decay", "initial_state"], grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_recurrent_form_is_eq6_by_hand():
    q, k, v, log_decay, s0 = (t.detach() for t in inputs(2))
    gamma = log_decay.exp()[None, :, None, None]
    s1 = gamma * s0 + k[:, 0, :, :, None] * v[:, 0, :, None, :]
    s2 = gamma * s1 + k[:, 1, :, :, None] * v[:, 1, :, None, :]
    o, final = retention(q, k, v, log_decay, s0, form="recurrent")
    torch.testing.assert_close(o[:, 1], torch.einsum("bhk,bhkv->bhv", q[:, 1], s2))
    torch.testing.assert_close(final, s2)


def test_no_initial_state_means_zeros_and_state_chains():
    q, k, v, log_decay, _ = (t.detach() for t in inputs(65))
    zeros = torch.zeros(B, H, K, V, dtype=torch.float64)
    o, final = retention(q, k, v, log_decay)
    torch.testing.assert_close((o, final), retention(q, k, v, log_decay, zeros))
    o1, s1 = retention(q[:, :40], k[:, :40], v[:, :40], log_decay, chunk_size=16)
    o2, s2 = retention(q[:, 40:], k[:, 40:], v[:, 40:], log_decay, s1, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(s2, final)


def test_low_precision_inputs_compute_in_fp32():
    q, k, v, log_decay, s0 = (t.detach().float() for t in inputs(33))
    o, final = retention(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay, s0)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref, _ = retention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), log_decay, s0)
    torch.testing.assert_close(o.float(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": torch.zeros(B, 5, H, K + 1)}, r"k must be \[B, T, H, K\] = \[2, 5, 3, 6\] like q, got \[2, 5, 3, 7\]"),
        ({"v": torch.zeros(B, 4, H, V)}, r"v must be \[B, T, H, V\] = \[2, 5, 3, V\]"),
        ({"log_decay": torch.zeros(H + 1)}, r"log_decay must be \[H\] = \[3\]"),
        ({"initial_state": torch.zeros(B, H, V, K)}, r"initial_state must be \[B, H, K, V\] = \[2, 3, 6, 10\]"),
        ({"form": "fused"}, "unknown form 'fused'"),
    ],
)
def test_bad_inputs_are_named(change, message):
    args = {"q": torch.zeros(B, 5, H, K), "k": torch.zeros(B, 5, H, K), "v": torch.zeros(B, 5, H, V), "log_decay": torch.zeros(H)}
    with pytest.raises(ValueError, match=message):
        retention(**{**args, **change})


def make_block(**kw):
    torch.manual_seed(0)
    cfg = RetNetConfig(**{"n_heads": 4, "chunk_size": 8, **kw})
    block = RetNet(cfg, 48, 0).double()
    if cfg.group_norm_affine:
        with torch.no_grad():
            block.norm_weight.uniform_(0.5, 1.5)
            block.norm_bias.normal_()
    return block


def test_decays_are_the_papers():
    block = make_block()
    gamma = block.log_decay(torch.device("cpu"), torch.float64).exp()
    torch.testing.assert_close(gamma, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=torch.float64))


@pytest.mark.parametrize("affine", [False, True])
def test_block_matches_eq5_and_eq8_with_complex_rotation(affine):
    """Oracle from the paper's notation: Q_n = q_n e^{i n theta}, K_m = k_m e^{i m theta},
    retention_nm = gamma^(n-m) Re(Q_n · conj(K_m)) / sqrt(d_k), GroupNorm per head, swish gate, W_O."""
    block = make_block(group_norm_affine=affine, value_factor=2)
    T, Hh, Kh, Vh = 37, block.n_heads, block.key_dim, block.value_dim
    x = torch.randn(2, T, 48, dtype=torch.float64)
    q = block.q_proj(x).view(2, T, Hh, Kh // 2, 2)
    k = block.k_proj(x).view(2, T, Hh, Kh // 2, 2)
    v = block.v_proj(x).view(2, T, Hh, Vh)
    theta = 1.0 / 10000 ** torch.linspace(0, 1, Kh // 2, dtype=torch.float64)  # [K/2]
    rot = torch.exp(1j * torch.arange(T, dtype=torch.float64)[:, None] * theta)  # [T, K/2]
    qc = torch.view_as_complex(q.contiguous()) * rot[:, None]
    kc = torch.view_as_complex(k.contiguous()) * rot[:, None]
    scores = torch.einsum("bnhj,bmhj->bhnm", qc, kc.conj()).real / math.sqrt(Kh)
    n = torch.arange(T)
    gamma = 1 - 2.0 ** (-5 - torch.arange(Hh, dtype=torch.float64))
    D = torch.where(n[:, None] >= n[None, :], gamma[:, None, None] ** (n[:, None] - n[None, :]), 0.0)  # [H, T, T]
    heads = torch.einsum("bhnm,bmhv->bnhv", scores * D, v)
    y = F.group_norm(heads.reshape(2 * T, Hh * Vh), Hh, block.norm_weight, block.norm_bias, eps=block.config.norm_eps)
    ref = block.o_proj(F.silu(block.g_proj(x)) * y.view(2, T, Hh * Vh))
    out, _ = block(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="n_heads: d_model=48 is not divisible by n_heads=5"):
        RetNetConfig(n_heads=5).validate(48)
    with pytest.raises(ConfigError, match="n_heads: key head dim .* = 3 must be even"):
        RetNetConfig(n_heads=16).validate(48)
    with pytest.raises(ConfigError, match="value_factor: must be >= 1"):
        RetNetConfig(value_factor=0)  # bounds are checked at construction
    with pytest.raises(ConfigError, match=r"model\.retnet\.backend: expected one of 'auto', .*, got 'cuda'"):
        ModelConfig.from_dict({"d_model": 48, "blocks": ["retnet"], "retnet": {"backend": "cuda"}}, "model")
    with pytest.raises(ConfigError, match=r"model\.retnet\.n_heads"):
        ModelConfig.from_dict({"d_model": 48, "blocks": ["retnet"], "retnet": {"n_heads": 5}}, "model")


def tiny_lm():
    spec = ModelConfig.from_dict(
        {"d_model": 32, "n_layers": 2, "blocks": ["retnet"], "vocab_size": 50, "retnet": {"n_heads": 2, "chunk_size": 4, "group_norm_affine": True}}
    )
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig.from_model_config(spec, eos_token_id=0)).eval()


def test_hf_save_load_round_trip(tmp_path):
    m = tiny_lm()
    assert "retnet" in MIXERS and isinstance(m.model.layers[0].mixer, RetNet)
    with torch.no_grad():
        m.model.layers[1].mixer.norm_bias.normal_()  # a non-default value must survive the round trip
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ZooForCausalLM)
    torch.testing.assert_close(loaded.model.layers[1].mixer.norm_bias, m.model.layers[1].mixer.norm_bias)
    x = torch.randint(0, 50, (2, 11))
    torch.testing.assert_close(loaded(x).logits, m(x).logits)


def test_greedy_generate_equals_full_forward_argmax():
    m = tiny_lm()
    prompt = torch.randint(1, 50, (1, 6))
    out = m.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, greedy_by_full_forward(m, prompt, 10))
