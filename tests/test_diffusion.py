"""Masked diffusion: schedules and NELBO weights, masking, the sampler, bidirectional denoisers, HF round trip, training."""
import csv
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

import zoo
from conftest import tiny_overrides
from zoo.config import DiffusionConfig
from zoo.data import byte_tokenizer
from zoo.diffusion import NoiseSchedule, denoise, diffusion_nelbo, generate_ids, mask_tokens, sample_times, sample_text
from zoo.errors import ConfigError
from zoo.layers import Bidirectional
from zoo.modeling import ZooConfig, ZooForCausalLM, ZooForMaskedLM
from zoo.recipe_loader import load_recipe
from zoo.typed import to_dict

MASK = 258


def tiny_config(blocks=("attention",), ffn="none", time_conditioning=False, **diffusion) -> ZooConfig:
    module_args = {"attention": {"n_heads": 2}, "mamba": {"d_state": 4, "expand": 1}, "lstm": {"hidden_size": 16}}
    settings = to_dict(DiffusionConfig(**diffusion))
    settings["sampling"]["context_length"] = 16
    return ZooConfig(
        d_model=16, n_layers=2, blocks=list(blocks), ffn=ffn, vocab_size=259, bidirectional=True,
        time_conditioning=time_conditioning, module_args={b: module_args[b] for b in blocks}, mask_token_id=MASK,
        diffusion=settings,
    )


@pytest.mark.parametrize("name", ["loglinear", "linear", "cosine"])
def test_schedule_matches_closed_form_and_its_derivative(name):
    eps = 1e-3
    s = NoiseSchedule(name, eps)
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    closed = {
        "loglinear": 1 - (1 - eps) * t,
        "linear": eps**t,
        "cosine": eps + (1 - eps) * torch.cos(math.pi * t / 2),
    }[name]
    torch.testing.assert_close(s.alpha(t), closed)
    assert float(s.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(s.alpha(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(eps)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.alpha_derivative(t), numeric, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(s.loss_weight(t), -numeric / (1 - closed), rtol=1e-5, atol=1e-8)


def test_loglinear_weight_is_one_over_t_and_antithetic_times_are_stratified():
    t = torch.tensor([0.01, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(NoiseSchedule("loglinear", 1e-3).loss_weight(t), 1 / t)
    times = sample_times(8, t_min=0.0, antithetic=True, generator=torch.Generator().manual_seed(3))
    gaps = times.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8))  # one per stratum of width 1/B
    times = sample_times(64, t_min=0.2, antithetic=True)
    assert float(times.min()) >= 0.2 and float(times.max()) <= 1.0


def test_masking_rate_and_prompt_is_never_masked():
    x = torch.randint(0, 256, (4, 2000))
    protected = torch.zeros_like(x, dtype=torch.bool)
    protected[:, :300] = True
    alpha = torch.tensor([0.0, 0.25, 0.5, 0.9])
    z, masked = mask_tokens(x, alpha, MASK, protected, torch.Generator().manual_seed(0))
    assert not masked[:, :300].any() and torch.equal(z[:, :300], x[:, :300])
    assert torch.equal(z == MASK, masked) and torch.equal(z[~masked], x[~masked])
    rate = masked[:, 300:].float().mean(1)
    torch.testing.assert_close(rate, 1 - alpha, atol=0.04, rtol=0)


def test_nelbo_is_the_weighted_masked_cross_entropy():
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config()).eval()
    x = torch.randint(0, 256, (3, 12))
    t = torch.tensor([0.2, 0.5, 0.9])
    schedule = NoiseSchedule("loglinear", 1e-3)
    loss = diffusion_nelbo(model, x, schedule, MASK, t, generator=torch.Generator().manual_seed(1))[0]
    z, masked = mask_tokens(x, schedule.alpha(t), MASK, generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=z).logits.float()
    logits[..., MASK] = float("-inf")
    nll = -logits.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)  # [B, T]
    expected = sum(float(nll[b][masked[b]].sum().detach()) / float(t[b]) for b in range(3)) / x.numel()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Masking every position at t = 1 the weight is 1 / (1 - eps) times the mean cross-entropy.
    full = diffusion_nelbo(model, x, NoiseSchedule("loglinear", 1e-9), MASK, torch.ones(3))[0]
    all_masked = model(input_ids=torch.full_like(x, MASK)).logits.float()
    all_masked[..., MASK] = float("-inf")
    ce = torch.nn.functional.cross_entropy(all_masked.flatten(0, 1), x.flatten())
    assert float(full) == pytest.approx(float(ce), rel=1e-4)


@pytest.mark.parametrize("block", ["attention", "mamba", "lstm"])
def test_bidirectional_denoiser_sees_future_tokens_and_causal_model_does_not(block):
    torch.manual_seed(0)
    config = tiny_config((block,))
    denoiser = ZooForMaskedLM(config).eval()
    causal = ZooForCausalLM(ZooConfig(**{k: v for k, v in config.to_dict().items() if k in ("d_model", "n_layers", "blocks", "ffn", "vocab_size", "module_args")})).eval()
    if block != "attention":
        assert all(isinstance(layer.mixer, Bidirectional) for layer in denoiser.model.layers)
    else:
        assert all(not layer.mixer.config.causal for layer in denoiser.model.layers)
    x = torch.randint(0, 256, (1, 10))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % 256
    with torch.no_grad():
        d_x, d_y = denoiser(input_ids=x).logits, denoiser(input_ids=y).logits
        c_x, c_y = causal(input_ids=x, use_cache=False).logits, causal(input_ids=y, use_cache=False).logits
    # Earlier positions change (the three before the edit: a freshly initialized Mamba forgets within a few tokens).
    assert (d_x[0, 4:7] - d_y[0, 4:7]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(c_x[0, :7], c_y[0, :7])  # the causal model's do not
    assert (c_x[0, 7] - c_y[0, 7]).abs().max() > 1e-6


def test_fixed_count_sampler_unmasks_one_position_per_step_and_keeps_the_prompt():
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config()).eval()
    schedule = NoiseSchedule("loglinear", 1e-3)
    prompt = torch.randint(0, 256, (2, 4))
    L = 10
    x = torch.cat((prompt, torch.full((2, L), MASK)), 1)
    history = []
    out, _ = denoise(model, x, L, schedule, MASK, unmasking="fixed_count", generator=torch.Generator().manual_seed(5), history=history)
    assert [(step == MASK).sum(1).tolist() for step in history] == [[L - k, L - k] for k in range(1, L + 1)]
    for before, after in zip([x, *history], history):
        assert torch.equal(after[:, :4], prompt)
        changed = before != after
        assert torch.equal(changed, (before == MASK) & (after != MASK))  # only masks change, each once
    assert (out != MASK).all()


def test_ancestral_sampler_fills_every_mask_and_reuses_the_cached_output():
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config()).eval()
    x = torch.full((1, 6), MASK)
    out, calls = denoise(model, x, 200, NoiseSchedule("loglinear", 1e-3), MASK, generator=torch.Generator().manual_seed(0))
    assert (out != MASK).all()
    assert calls <= 6  # at most one denoiser call per step that changed a token, not 200
    timed = ZooForMaskedLM(tiny_config(time_conditioning=True)).eval()
    _, timed_calls = denoise(timed, x, 20, NoiseSchedule("loglinear", 1e-3), MASK, time_conditioned=True)
    assert timed_calls > 6  # a time-conditioned denoiser's output changes with t: no cache


def test_semi_autoregressive_blocks_extend_past_the_context():
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config()).eval()
    prompt = torch.randint(0, 256, (1, 5))
    out = generate_ids(model, prompt, length=30, steps=8, context_length=16, block_length=6)
    assert out.shape == (1, 35) and torch.equal(out[:, :5], prompt) and (out != MASK).all()


def test_hf_round_trip_and_sample_text(tmp_path):
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config(("mamba",), time_conditioning=True)).eval()
    with torch.no_grad():
        for modulation in adaln_modulations(model):
            torch.nn.init.normal_(modulation.weight, std=0.3)  # trained-like adaLN weights: zero-init must not hide them
    tok = byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ZooForMaskedLM and loaded.config.bidirectional and loaded.time_embed is not None
    for saved, restored in zip(adaln_modulations(model), adaln_modulations(loaded), strict=True):
        torch.testing.assert_close(restored.weight, saved.weight, atol=0, rtol=0)
    x = torch.randint(0, 256, (2, 9))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        logits = loaded(input_ids=x, timesteps=t).logits
        torch.testing.assert_close(logits, model(input_ids=x, timesteps=t).logits)
        assert (logits - loaded(input_ids=x, timesteps=t.flip(0)).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="timesteps"):
        loaded(input_ids=x)
    texts = sample_text(loaded, AutoTokenizer.from_pretrained(tmp_path), ["def f(", "x"], steps=4, length=6, seed=0)
    assert len(texts) == 2 and texts[0].startswith("def f(") and texts[1].startswith("x")


def test_recipe_diffusion_section_is_typed_with_full_paths():
    r = load_recipe("diffusion_mamba_small")
    assert r.objective == "diffusion" and r.model.blocks == ["mamba"] and r.diffusion.schedule == "loglinear"
    with pytest.raises(ConfigError, match=r"diffusion\.sampling\.steps"):
        load_recipe("diffusion_small", ["diffusion.sampling.steps=0"])
    with pytest.raises(ConfigError, match=r"diffusion\.schedule.*loglinear"):
        load_recipe("diffusion_small", ["diffusion.schedule=sqrt"])
    with pytest.raises(ConfigError, match=r"diffusion\.sampling\.unmask\b"):
        load_recipe("diffusion_small", ["diffusion.sampling.unmask=x"])
    with pytest.raises(ConfigError, match=r"model\.attention\.causal"):
        load_recipe("transformer_small", ["model.attention.causal=false"])


def test_tiny_diffusion_training_writes_metrics_and_exports(tmp_path, capsys):
    from zoo.train import train

    r = load_recipe("diffusion_small", tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.val_every": 2}))
    summary = train(r)
    rows = [row for row in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if row["val_loss"]]
    assert [row["step"] for row in rows] == ["2", "4"]
    assert all(float(row["val_ppl"]) == pytest.approx(math.exp(float(row["val_loss"])), rel=1e-4) for row in rows)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "hf")
    assert type(model) is ZooForMaskedLM and model.config.diffusion["sampling"]["context_length"] == 32
    assert summary["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)
    text = sample_text(model, AutoTokenizer.from_pretrained(tmp_path / "run" / "hf"), "import ", steps=4, length=8, seed=0)
    assert text[0].startswith("import ")
    # python -m zoo.generate dispatches a masked-diffusion checkpoint to sample_text.
    from zoo.generate import main

    capsys.readouterr()
    assert main([str(tmp_path / "run"), "--prompt", "import ", "--max-new-tokens", "8", "--diffusion-steps", "4"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    assert main([str(tmp_path / "run"), "--prompt", "x", "--greedy"]) == 2
    assert "--greedy is not supported" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# Time conditioning: adaLN-Zero in every layer and on the final norm
# ------------------------------------------------------------------------------------------------------------------


def adaln_modulations(model: ZooForMaskedLM) -> list[torch.nn.Module]:
    """Every layer's modulation, then the final norm's."""
    return [layer.modulation for layer in model.model.layers] + [model.model.final_modulation]


def denoise_logits(model, x, t):
    with torch.no_grad():
        return model(input_ids=x, timesteps=torch.tensor(t)).logits


@pytest.mark.parametrize("ffn", ["none", "swiglu"])
def test_adaln_zero_starts_time_independent_then_conditions_each_row_on_its_own_time(ffn):
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config(ffn=ffn, time_conditioning=True)).eval()
    n_branches = 1 if ffn == "none" else 2
    assert [tuple(m.weight.shape) for m in adaln_modulations(model)] == [(3 * n_branches * 16, 16)] * 2 + [(2 * 16, 16)]
    assert all(not m.weight.any() and not m.bias.any() for m in adaln_modulations(model))  # zero after post_init
    x = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(denoise_logits(model, x, [0.1, 0.2]), denoise_logits(model, x, [0.9, 0.6]), atol=0, rtol=0)
    with torch.no_grad():
        for modulation in adaln_modulations(model):
            torch.nn.init.normal_(modulation.weight)
    both = denoise_logits(model, x, [0.1, 0.9])
    assert (both - denoise_logits(model, x, [0.9, 0.1])).abs().amax((1, 2)).min() > 1e-3  # every row depends on t
    rows = torch.cat((denoise_logits(model, x[:1], [0.1]), denoise_logits(model, x[1:], [0.9])))
    torch.testing.assert_close(both, rows, atol=1e-5, rtol=1e-5)  # each row follows its own t
    # A left-padded row runs alone with its own conditioning: its tokens' logits match the unpadded call.
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask, timesteps=torch.tensor([0.1, 0.9])).logits
    torch.testing.assert_close(padded[0, 3:], denoise_logits(model, x[:1, 3:], [0.1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], both[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1, 2])  # layer 0, layer 1, the final norm
def test_every_layer_and_the_final_norm_have_their_own_modulation(which):
    torch.manual_seed(0)
    model = ZooForMaskedLM(tiny_config(("mamba",), ffn="swiglu", time_conditioning=True)).eval()
    modulations = adaln_modulations(model)
    assert len({id(m.weight) for m in modulations}) == 3
    with torch.no_grad():
        torch.nn.init.normal_(modulations[which].weight)
    x = torch.randint(0, 256, (1, 8))
    # Exactly equal before the perturbation (see above); a freshly initialized layer's branch is small, so is the change.
    assert (denoise_logits(model, x, [0.1]) - denoise_logits(model, x, [0.9])).abs().max() > 1e-6


def test_conditioning_errors_name_the_layer_and_the_expected_shape():
    from zoo.layers import ResidualLayer
    from zoo.layers.attention import Attention, AttentionConfig

    torch.manual_seed(0)
    conditioned = ResidualLayer(Attention(AttentionConfig(n_heads=2), 16, 3), None, 16, 1e-5, conditioned=True)
    plain = ResidualLayer(Attention(AttentionConfig(n_heads=2), 16, 3), None, 16, 1e-5)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"layer 3\).*adaLN-conditioned: pass conditioning \[batch, 16\]"):
        conditioned(x)
    with pytest.raises(ValueError, match=r"layer 3\) is not conditioned.*pass conditioning=None"):
        plain(x, conditioning=torch.randn(2, 16))
    model = ZooForMaskedLM(tiny_config(time_conditioning=True)).eval()
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match=r"conditioning: expected a floating-point tensor of shape \[2, 16\], got .* \[1, 16\]"):
        model.model(input_ids=ids, conditioning=torch.randn(1, 16), use_cache=False)
    with pytest.raises(ValueError, match=r"conditioning: this model is adaLN-conditioned.*\[2, 16\]"):
        model.model(input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match=r"timesteps: expected shape \[2\]"):
        model(input_ids=ids, timesteps=torch.tensor(0.5))
    unconditioned = ZooForMaskedLM(tiny_config()).eval()
    assert unconditioned.model.final_modulation is None and all(layer.modulation is None for layer in unconditioned.model.layers)
    with pytest.raises(ValueError, match=r"conditioning: this model is not conditioned"):
        unconditioned.model(input_ids=ids, conditioning=torch.randn(2, 16), use_cache=False)


def test_moe_denoiser_training_step_adds_router_loss_and_takes_the_stats():
    import lightning as L

    from zoo.training import DiffusionLightningModule
    from zoo.layers import MoE
    from zoo.modeling import ZooMoeMaskedLMOutput

    overrides = [
        "model.ffn=moe", "model.d_model=32", "model.n_layers=2", "model.vocab_size=259", "model.attention.n_heads=2",
        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=16",
    ]
    module = DiffusionLightningModule(load_recipe("diffusion_small", overrides), {"mask_token_id": MASK})
    module.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    moes = [m for m in module.model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2 and "train_aux_loss" in module.metric_columns()
    batch = torch.randint(0, 256, (4, 17))
    torch.manual_seed(1)
    step = module.training_step(batch, 0)
    assert all(m.pop_stats() is None for m in moes)  # taken by the model's forward
    torch.manual_seed(1)  # replay the step's times and masks
    x = batch[:, 1:]
    times = sample_times(4, module.diffusion.t_min, module.diffusion.antithetic, device=x.device)
    nelbo, out = diffusion_nelbo(module.model, x, module.schedule, MASK, times)
    assert isinstance(out, ZooMoeMaskedLMOutput) and out.router_loss > 0 and out.expert_load.shape == (2, 4)
    torch.testing.assert_close(out.router_loss, torch.stack([0.01 * out.aux_loss + 0.001 * out.z_loss]).mean())
    torch.testing.assert_close(logged["train_loss"], nelbo)  # train_loss: the NELBO alone
    torch.testing.assert_close(step["loss"], nelbo + out.router_loss)
    torch.testing.assert_close(logged["train_aux_loss"], out.aux_loss)
    step["loss"].backward()
    assert moes[0].gate.weight.grad.abs().sum() > 0


def test_architecture_flags_are_model_fields_checked_with_the_objective():
    r = load_recipe("diffusion_small", ["model.time_conditioning=true"])
    assert r.model.bidirectional and r.model.time_conditioning
    with pytest.raises(ConfigError, match=r"model\.bidirectional: objective: diffusion trains a denoiser"):
        load_recipe("diffusion_small", ["model.bidirectional=false"])
    with pytest.raises(ConfigError, match=r"model\.time_conditioning: conditions the layers on a diffusion time"):
        load_recipe("transformer_small", ["model.time_conditioning=true"])
    with pytest.raises(ConfigError, match=r"model\.bidirectional: objective: causal needs causal layers"):
        load_recipe("transformer_small", ["model.bidirectional=true"])
    causal_config = ZooConfig(d_model=16, n_layers=2, blocks=["attention"], vocab_size=259, module_args={"attention": {"n_heads": 2}})
    with pytest.raises(ValueError, match="ZooForMaskedLM is a denoiser that sees the whole sequence"):
        ZooForMaskedLM(causal_config)


def test_sampling_a_saved_checkpoint_does_not_import_lightning(tmp_path):
    """``python -m zoo.generate`` on a masked-diffusion checkpoint runs the sampler without importing Lightning."""
    import subprocess
    import sys

    torch.manual_seed(0)
    ZooForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    code = (
        "import sys\nfrom zoo.generate import main\n"
        f"assert main([{str(tmp_path)!r}, '--prompt', 'ab', '--max-new-tokens', '4', '--diffusion-steps', '2', '--seed', '0']) in (0, None)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
