"""RWKV-6 / RWKV-7: chunked kernels against the sequential references, numerical range, config checks, HF round trip."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import greedy_by_full_forward
import zoo
from zoo.config import ModelConfig
from zoo.errors import BackendUnavailableError, ConfigError
from zoo.kernels.rwkv6 import rwkv6, rwkv6_chunked, rwkv6_naive
from zoo.kernels.dplr_delta_rule import dplr_delta_rule, dplr_delta_rule_chunked, dplr_delta_rule_naive, dplr_delta_rule_recurrent
from zoo.layers import RWKV6, RWKV6Config, RWKV7, RWKV7Config
from zoo.modeling import ZooConfig, ZooForCausalLM

F64 = torch.float64


def rwkv6_inputs(B, T, H, K, V, w_log_range=(-5.0, 0.0), dtype=F64):
    lo, hi = w_log_range
    r, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    w_log = lo + (hi - lo) * torch.rand(B, T, H, K, dtype=dtype)
    u = torch.randn(H, K, dtype=dtype)
    s0 = torch.randn(B, H, K, V, dtype=dtype)
    return [t.requires_grad_() for t in (r, k, v, w_log, u, s0)]


def rwkv7_inputs(B, T, H, K, V, w_log_range=(-math.exp(-0.5), 0.0), dtype=F64):
    lo, hi = w_log_range
    r, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    w_log = lo + (hi - lo) * torch.rand(B, T, H, K, dtype=dtype)
    kk = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    alpha = torch.rand(B, T, H, K, dtype=dtype)
    a, b = -kk, kk * alpha
    s0 = torch.randn(B, H, K, V, dtype=dtype)
    return [t.requires_grad_() for t in (r, w_log, k, v, a, b, s0)]


def outputs_and_grads(fn, inputs, **kw):
    o, s = fn(*inputs[:-1], initial_state=inputs[-1], **kw)
    # Random projections so every output element and every state element carries gradient.
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return o, s, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_rwkv6_chunked_equals_naive(T, chunk_size):
    inputs = rwkv6_inputs(2, T, 3, 12, 10)  # head dim 12: not a power of two; V != K
    o_ref, s_ref, g_ref = outputs_and_grads(rwkv6_naive, inputs)
    o, s, g = outputs_and_grads(rwkv6_chunked, inputs, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(["r", "k", "v", "w_log", "u", "initial_state"], g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("form", [dplr_delta_rule_chunked, dplr_delta_rule_recurrent], ids=["chunked", "recurrent"])
def test_rwkv7_torch_forms_equal_naive(T, chunk_size, form):
    inputs = rwkv7_inputs(2, T, 3, 12, 10)
    o_ref, s_ref, g_ref = outputs_and_grads(dplr_delta_rule_naive, inputs)
    o, s, g = outputs_and_grads(form, inputs, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(s, s_ref, atol=1e-9, rtol=1e-9)
    for name, a, b in zip(["r", "w_log", "k", "v", "a", "b", "initial_state"], g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8, msg=f"gradient of {name}")


def test_rwkv6_naive_matches_the_parallel_form_of_the_paper():
    """wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i, o_t = r_t wkv_t (no initial state)."""
    r, k, v, w_log, u, _ = (t.detach() for t in rwkv6_inputs(1, 6, 2, 4, 3))
    o, _ = rwkv6_naive(r, k, v, w_log, u)
    w = w_log.exp()
    for t in range(6):
        wkv = u[None, :, :, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        for i in range(t):
            decay = torch.ones_like(w[:, 0])
            for j in range(i + 1, t):
                decay = decay * w[:, j]
            wkv = wkv + decay[..., None] * k[:, i, :, :, None] * v[:, i, :, None, :]
        torch.testing.assert_close(o[:, t], torch.einsum("bhk,bhkv->bhv", r[:, t], wkv))


def test_rwkv7_naive_matches_the_paper_state_layout():
    """S'_t = S'_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t with S' [V, K] (the paper's layout), o_t = S'_t r_t^T."""
    r, w_log, k, v, a, b, _ = (t.detach() for t in rwkv7_inputs(1, 5, 1, 4, 3))
    o, s = dplr_delta_rule_naive(r, w_log, k, v, a, b)
    S = torch.zeros(3, 4, dtype=F64)
    for t in range(5):
        rt, wt, kt, vt, at, bt = (x[0, t, 0] for x in (r, w_log, k, v, a, b))
        S = S @ (torch.diag(wt.exp()) + at[:, None] * bt[None, :]) + vt[:, None] * kt[None, :]
        torch.testing.assert_close(o[0, t, 0], S @ rt)
    torch.testing.assert_close(s[0, 0], S.T)


@pytest.mark.parametrize("w_log_range", [(-20.0, -19.0), (-1e-7, 0.0), (-20.0, 0.0)])
def test_rwkv6_extreme_decays_stay_finite_and_exact(w_log_range):
    """Decays near 0 (w = e^-20) and near 1; fp32 chunked against an fp64 reference."""
    inputs = [t.detach().float().requires_grad_() for t in rwkv6_inputs(2, 65, 2, 16, 16, w_log_range)]
    o, s, g = outputs_and_grads(rwkv6, inputs)
    o_ref, s_ref = rwkv6_naive(*(t.detach().double() for t in inputs[:-1]), initial_state=inputs[-1].detach().double())
    assert torch.isfinite(o).all() and torch.isfinite(s).all() and all(torch.isfinite(x).all() for x in g)
    # fp32 error relative to the output scale (cumulative log decays reach -320 in a 16-token chunk).
    assert (o.double() - o_ref).abs().max() <= 2e-5 * o_ref.abs().max()
    assert (s.double() - s_ref).abs().max() <= 2e-5 * s_ref.abs().max()


@pytest.mark.parametrize("w_log_range", [(-20.0, -19.0), (-1e-7, 0.0), (-20.0, 0.0)])
@pytest.mark.parametrize("form", [dplr_delta_rule_chunked, dplr_delta_rule_recurrent], ids=["chunked", "recurrent"])
def test_rwkv7_extreme_decays_stay_finite_and_exact(w_log_range, form):
    inputs = [t.detach().float().requires_grad_() for t in rwkv7_inputs(2, 65, 2, 16, 16, w_log_range)]
    o, s, g = outputs_and_grads(form, inputs)
    o_ref, s_ref = dplr_delta_rule_naive(*(t.detach().double() for t in inputs[:-1]), initial_state=inputs[-1].detach().double())
    assert torch.isfinite(o).all() and torch.isfinite(s).all() and all(torch.isfinite(x).all() for x in g)
    # fp32 error relative to the output scale (cumulative log decays reach -320 in a 16-token chunk).
    assert (o.double() - o_ref).abs().max() <= 2e-5 * o_ref.abs().max()
    assert (s.double() - s_ref).abs().max() <= 2e-5 * s_ref.abs().max()


@pytest.mark.parametrize("log_log_decay", [-30.0, 30.0])
def test_rwkv6_block_with_extreme_decay_is_finite(log_log_decay):
    block = RWKV6(RWKV6Config(head_dim=16, decay_lora_rank=4, mix_lora_rank=4), 32, 0)
    with torch.no_grad():
        block.time_decay.fill_(log_log_decay)  # w = exp(-exp(-30)) ~ 1, or exp(-exp(30)) ~ 0 (clamped)
    x = torch.randn(2, 40, 32, requires_grad=True)
    y, state = block(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(state.wkv).all() and torch.isfinite(x.grad).all()


def test_kernel_input_checks():
    r, k, v, w_log, u, s0 = (t.detach() for t in rwkv6_inputs(2, 5, 3, 4, 4))
    with pytest.raises(ValueError, match=r"rwkv6: u must be \[H, K\] = \[3, 4\]"):
        rwkv6(r, k, v, w_log, u[:2])
    with pytest.raises(ValueError, match=r"rwkv6: k must be \[B, T, H, K\] = \[2, 5, 3, 4\] like r"):
        rwkv6(r, k[:, :4], v, w_log, u)
    with pytest.raises(ValueError, match=r"rwkv6: initial_state must be \[B, H, K, V\]"):
        rwkv6(r, k, v, w_log, u, s0[:1])
    r, w_log, k, v, a, b, s0 = (t.detach() for t in rwkv7_inputs(2, 5, 3, 4, 4))
    with pytest.raises(ValueError, match=r"dplr_delta_rule: b must be \[B, T, H, K\] = \[2, 5, 3, 4\] like r"):
        dplr_delta_rule(r, w_log, k, v, a, b[..., :2])
    with pytest.raises(ValueError, match=r"dplr_delta_rule: v must be \[B, T, H, V\] = \[2, 5, 3, V\]"):
        dplr_delta_rule(r, w_log, k, v[:, :3], a, b)


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7"])
def test_config_errors_name_the_key(name):
    with pytest.raises(ConfigError, match=rf"model\.{name}\.head_dim: d_model=48 must be a positive multiple of head_dim=20"):
        ModelConfig.from_dict({"d_model": 48, "blocks": [name], name: {"head_dim": 20}})
    with pytest.raises(ConfigError, match=rf"model\.{name}\.backend: expected one of 'auto', .*, got 'cuda'"):
        ModelConfig.from_dict({"d_model": 48, "blocks": [name], name: {"head_dim": 16, "backend": "cuda"}})


@pytest.mark.parametrize("name, args", [("rwkv6", {"head_dim": 8, "decay_lora_rank": 4, "mix_lora_rank": 4}),
                                        ("rwkv7", {"head_dim": 8, "decay_lora_rank": 4, "a_lora_rank": 4, "gate_lora_rank": 4})])
def test_hf_save_load_round_trip(tmp_path, name, args):
    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "blocks": [name], "vocab_size": 50, name: args})
    model = ZooForCausalLM(ZooConfig.from_model_config(spec, eos_token_id=0)).eval()
    mixer = model.model.layers[1].mixer
    # The block init ran (not only the generic one): decay and bonus parameters have their RWKV values.
    if name == "rwkv6":
        assert mixer.time_decay.min() < -5.5 and mixer.time_faaaa.abs().max() > 0.3
    else:
        assert mixer.w0.min() < -6 and torch.all(mixer.k_k == 0.85)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ZooForCausalLM)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, msg=n1)
    x = torch.randint(0, 50, (2, 21))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    out = loaded.generate(x[:1, :5], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = x[:1, :5]
    for _ in range(6):
        seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_cmix_full_sequence_matches_the_formula():
    """k = relu(W_k lerp(x_t, x_{t-1}, mu_k))^2, out = sigmoid(W_r lerp(x_t, x_{t-1}, mu_r)) * W_v k; x_{-1} = 0."""
    from zoo.layers import RWKVChannelMix, RWKVChannelMixConfig

    ffn = RWKVChannelMix(RWKVChannelMixConfig(hidden_size=40), 16, 0).double()
    x = torch.randn(2, 9, 16, dtype=F64)
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    xk = x + (prev - x) * ffn.time_maa_k
    xr = x + (prev - x) * ffn.time_maa_r
    ref = torch.sigmoid(xr @ ffn.receptance.weight.T) * (torch.relu(xk @ ffn.key.weight.T).square() @ ffn.value.weight.T)
    y, state = ffn(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(state, x[:, -1])


def test_cmix_state_makes_split_calls_exact():
    """The token-shift state carries the previous call's last token: prefill + decode == full."""
    from zoo.layers import RWKVChannelMix, RWKVChannelMixConfig

    ffn = RWKVChannelMix(RWKVChannelMixConfig(), 16, 0).double()
    x = torch.randn(2, 8, 16, dtype=F64)
    full, _ = ffn(x)
    y1, state = ffn(x[:, :5])
    steps = [y1]
    for t in range(5, 8):
        y, state = ffn(x[:, t : t + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_cmix_model_generates_like_full_forward():
    """A model with rwkv_cmix FFNs: cached greedy decoding == argmax of full forwards."""
    from zoo.config import ModelConfig
    from zoo.modeling import ZooConfig, ZooForCausalLM

    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "blocks": ["attention"], "ffn": "rwkv_cmix", "vocab_size": 40})
    model = ZooForCausalLM(ZooConfig.from_model_config(spec)).eval()
    prompt = torch.randint(0, 40, (1, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, greedy_by_full_forward(model, prompt, 6))
