"""Mamba / Mamba-2: chunked kernels against their sequential references, HF oracles, save/load, config checks."""
import pytest
import transformers
from packaging.version import Version
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from conftest import prefill_then_decode_logits
import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
from zoo.config import ModelConfig
from zoo.convert import convert_state_dict
from zoo.convert.mamba import MAMBA_KEY_MAP, from_mamba, from_mamba2
from zoo.errors import BackendUnavailableError, ConfigError
from zoo.kernels.selective_scan import selective_scan, selective_scan_chunked, selective_scan_naive, selective_scan_recurrent
from zoo.kernels.ssd import ssd_chunked, ssd_naive, ssd_scan
from zoo.layers import MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM

F64 = torch.float64


def scan_inputs(T, batch=2, dim=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(
        u=r(batch, T, dim), delta=r(batch, T, dim), A=-torch.rand(dim, n, generator=g, dtype=F64) * 4 - 0.1,
        B=r(batch, T, n), C=r(batch, T, n), D=r(dim), z=r(batch, T, dim), delta_bias=r(dim), initial_state=r(batch, dim, n),
    )


def grads(out, inputs):
    y, state = out
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum() + state.square().sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("T", [1, 2, 63, 65])
@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("form", [selective_scan_chunked, selective_scan_recurrent], ids=["chunked", "recurrent"])
def test_selective_scan_torch_forms_match_naive_with_gradients(T, chunk_size, form):
    inputs = {k: v.requires_grad_() for k, v in scan_inputs(T).items()}
    ref = selective_scan_naive(**inputs)
    out = form(**inputs, chunk_size=chunk_size)
    torch.testing.assert_close(out[0], ref[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[1], ref[1], atol=1e-10, rtol=1e-10)
    leaves = list(inputs.values())
    for name, a, b in zip(inputs, grads(out, leaves), grads(ref, leaves)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"grad of {name}: {m}")


def test_selective_scan_state_carries_across_calls():
    full = scan_inputs(40)
    y_full, h_full = selective_scan(**full)
    first = {k: (v[:, :17] if v.dim() == 3 and v.shape[1] == 40 else v) for k, v in full.items()}
    second = {k: (v[:, 17:] if v.dim() == 3 and v.shape[1] == 40 else v) for k, v in full.items()}
    y1, h1 = selective_scan(**first)
    y2, h2 = selective_scan(**{**second, "initial_state": h1})
    torch.testing.assert_close(torch.cat((y1, y2), 1), y_full)
    torch.testing.assert_close(h2, h_full)


def test_selective_scan_checks_shapes():
    inputs = scan_inputs(6)
    with pytest.raises(ValueError, match=r"selective_scan: B must be \[B, T, N\] = \[2, 6, 4\], got \[2, 6, 3\]"):
        selective_scan(**{**inputs, "B": inputs["B"][..., :3]})
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(**{**inputs, "initial_state": inputs["initial_state"][:1]})


def ssd_inputs(T, batch=2, heads=4, p=3, groups=2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(
        x=r(batch, T, heads, p), dt=torch.rand(batch, T, heads, generator=g, dtype=F64) * 0.5,
        A=-torch.rand(heads, generator=g, dtype=F64) * 4 - 0.1, B=r(batch, T, groups, n), C=r(batch, T, groups, n),
        D=r(heads), initial_state=r(batch, heads, p, n),
    )


@pytest.mark.parametrize("T", [1, 15, 16, 63, 65])
def test_ssd_chunked_matches_naive_with_gradients(T):
    inputs = {k: v.requires_grad_() for k, v in ssd_inputs(T).items()}
    ref = ssd_naive(**inputs)
    out = ssd_chunked(**inputs, chunk_size=16)
    torch.testing.assert_close(out[0], ref[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[1], ref[1], atol=1e-10, rtol=1e-10)
    leaves = list(inputs.values())
    for name, a, b in zip(inputs, grads(out, leaves), grads(ref, leaves)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"grad of {name}: {m}")


def test_ssd_scan_applies_dt_bias_softplus_and_limit():
    inputs = ssd_inputs(9)
    bias = torch.randn(4, dtype=F64)
    y, h = ssd_scan(**inputs, dt_bias=bias, dt_limit=(0.0, 0.3), chunk_size=4)
    dt = torch.nn.functional.softplus(inputs["dt"] + bias).clamp(max=0.3)
    y_ref, h_ref = ssd_naive(**{**inputs, "dt": dt})
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    with pytest.raises(ValueError, match=r"ssd_scan: B must be \[B, T, G, N\] with G dividing H=4"):
        ssd_scan(**{**inputs, "B": inputs["B"][:, :, :1].expand(-1, -1, 3, -1)})


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face oracles
# ---------------------------------------------------------------------------------------------------------------


def perturb(model):
    """Move every weight off its init (norm weights, D, biases...) so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_mamba(**kw):
    cfg = dict(
        vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        use_bias=False, use_conv_bias=True, time_step_rank=5, layer_norm_epsilon=1e-5,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return perturb(MambaForCausalLM(MambaConfig(**cfg))).eval()


def tiny_mamba2(**kw):
    cfg = dict(
        vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, num_heads=4,
        head_dim=16, n_groups=1, chunk_size=16, layer_norm_epsilon=1e-5,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return perturb(Mamba2ForCausalLM(Mamba2Config(**cfg))).eval()


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False, "use_bias": True}, {"time_step_rank": 3, "conv_kernel": 3}])
def test_logits_match_hf_mamba(kw):
    hf = tiny_mamba(**kw)
    model = from_mamba(hf).eval()
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    x = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kw", [{}, {"n_groups": 2, "chunk_size": 8, "tie_word_embeddings": True}, {"time_step_limit": (0.0, 0.05), "use_bias": True}]
)
def test_logits_match_hf_mamba2(kw):
    if kw.get("n_groups", 1) > 1 and Version(transformers.__version__) < Version("5.23.0"):
        pytest.skip("transformers < 5.23 normalizes Mamba-2's gated RMSNorm over all of d_inner, not per group as mamba-ssm and zoo do (fixed in 5.23)")
    hf = tiny_mamba2(**kw)
    model = from_mamba2(hf).eval()
    x = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make, convert", [(tiny_mamba, from_mamba), (tiny_mamba2, from_mamba2)])
def test_decode_with_cache_matches_hf_full_sequence(make, convert):
    hf = make()
    model = convert(hf).eval()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(prefill_then_decode_logits(model, x, 7), hf(x).logits[:, 7:], atol=1e-4, rtol=0)


def test_unmapped_mamba_weight_is_an_error():
    with pytest.raises(KeyError, match="'backbone.layers.0.mixer.extra' has no zoo counterpart"):
        convert_state_dict({"backbone.layers.0.mixer.extra": torch.zeros(1)}, MAMBA_KEY_MAP, "Mamba")


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        from_mamba(tiny_mamba(hidden_act="gelu"))


# ---------------------------------------------------------------------------------------------------------------
# zoo models: save / load, init, config
# ---------------------------------------------------------------------------------------------------------------


def tiny_zoo(block, **args):
    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "blocks": [block], "ffn": "none", "vocab_size": 50, block: args})
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig.from_model_config(spec)).eval()


@pytest.mark.parametrize("block, args", [("mamba", {"d_state": 8}), ("mamba2", {"d_state": 8, "head_dim": 16, "chunk_size": 8})])
def test_hf_save_load_round_trip(tmp_path, block, args):
    model = tiny_zoo(block, **args)
    with torch.no_grad():
        model.model.layers[0].mixer.A_log.add_(0.5)  # a value init would not produce: loading must keep it
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 50, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    torch.testing.assert_close(loaded.model.layers[0].mixer.A_log, model.model.layers[0].mixer.A_log, atol=0, rtol=0)


def test_mamba_init_follows_the_paper():
    mixer = tiny_zoo("mamba", d_state=8).model.layers[1].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 9.0)).expand(64, -1))
    torch.testing.assert_close(mixer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert 0.001 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001
    mixer2 = tiny_zoo("mamba2", d_state=8, head_dim=16).model.layers[0].mixer
    A = torch.exp(mixer2.A_log)
    assert 1 <= A.min() and A.max() <= 16 and mixer2.A_log.unique().numel() == 4


def test_bad_configs_name_their_key():
    with pytest.raises(ConfigError, match=r"model\.mamba2\.head_dim: d_inner = expand \* d_model = 64 is not divisible by head_dim=24"):
        ModelConfig.from_dict({"d_model": 32, "blocks": ["mamba2"], "mamba2": {"head_dim": 24}}, "model")
    with pytest.raises(ConfigError, match=r"model\.mamba2\.n_groups"):
        ModelConfig.from_dict({"d_model": 32, "blocks": ["mamba2"], "mamba2": {"head_dim": 16, "n_groups": 3}}, "model")
    with pytest.raises(ConfigError, match=r"model\.mamba\.dt_rank"):
        ModelConfig.from_dict({"d_model": 32, "blocks": ["mamba"], "mamba": {"dt_rank": 0}}, "model")
    with pytest.raises(ConfigError, match=r"model\.mamba\.backend: expected one of 'auto', .*, got 'cuda'"):
        ModelConfig.from_dict({"d_model": 32, "blocks": ["mamba"], "mamba": {"backend": "cuda"}}, "model")
