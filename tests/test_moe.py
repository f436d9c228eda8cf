"""The ``moe`` FFN: dispatch paths agree, routing semantics, router losses, the Mixtral oracle, HF round trip."""
import copy
import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from conftest import prefill_then_decode_logits
import zoo
from zoo.config import ModelConfig
from zoo.convert.mixtral import from_mixtral
from zoo.layers import MoE, MoEConfig
from zoo.layers.moe import grouped_mm_supported, router_losses
from zoo.modeling import ZooConfig, ZooForCausalLM


def make_moe(d_model=16, dtype=torch.float64, **kw):
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, "expert_hidden": 24, **kw})
    cfg.validate(d_model)
    torch.manual_seed(0)
    m = MoE(cfg, d_model, 0).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def with_dispatch(m, dispatch):
    other = copy.deepcopy(m)
    other.config = dataclasses.replace(m.config, dispatch=dispatch)
    return other


@pytest.mark.parametrize("kw", [{}, {"top_k": 3, "router": "topk_softmax"}, {"shared_experts": 2}, {"num_experts": 1, "top_k": 1}])
def test_grouped_equals_loop_outputs_and_grads(kw):
    grouped = make_moe(**kw)
    loop = with_dispatch(grouped, "loop")
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [grouped(xs[0]), loop(xs[1])]
    torch.testing.assert_close(ys[0], ys[1], atol=1e-12, rtol=0)
    g = torch.randn_like(ys[0])
    for y in ys:
        (y * g).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-12, rtol=0)
    for (name, a), b in zip(grouped.named_parameters(), loop.parameters()):
        trivial_router = name == "gate.weight" and grouped.num_experts == 1  # one expert: weight 1, no router gradient
        assert a.grad is not None and (trivial_router or a.grad.abs().sum() > 0), name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0, msg=name)


def test_grouped_mm_bf16_path_matches_loop(monkeypatch):
    """bf16 with aligned sizes takes ``torch._grouped_mm`` (supported on CPU in this torch: three calls a forward) and
    agrees with the loop to within a bf16 rounding (the two agree exactly on this CPU)."""
    assert grouped_mm_supported(torch.bfloat16, torch.device("cpu"), 32, 48)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kwargs: calls.append(1) or grouped_mm(*args, **kwargs))
    grouped = make_moe(d_model=32, expert_hidden=48, num_experts=5, dtype=torch.bfloat16)
    loop = with_dispatch(grouped, "loop")
    x = torch.randn(2, 13, 32, dtype=torch.bfloat16)
    ya = grouped(x.clone().requires_grad_())
    assert len(calls) == 3
    yb = loop(x.clone().requires_grad_())
    assert len(calls) == 3
    bf16_ulp = 2.0**-7  # relative spacing of bf16 numbers
    torch.testing.assert_close(ya.float(), yb.float(), atol=0, rtol=bf16_ulp)
    ya.float().square().sum().backward()
    yb.float().square().sum().backward()
    torch.testing.assert_close(grouped.w_down.grad.float(), loop.w_down.grad.float(), atol=0, rtol=bf16_ulp)


def manual_moe(m, h):
    """Per-token reference: pick experts by the router definitions, sum weighted SwiGLU experts."""
    logits = h @ m.gate.weight.T
    out = torch.zeros_like(h)
    for i in range(h.shape[0]):
        top = torch.topk(logits[i], m.top_k).indices
        if m.config.router == "softmax_topk":
            w = torch.softmax(logits[i], -1)[top]
            w = w / w.sum()
        else:
            w = torch.softmax(logits[i][top], -1)
        for wj, e in zip(w, top.tolist()):
            a = torch.nn.functional.silu(h[i] @ m.w_gate[e]) * (h[i] @ m.w_up[e])
            out[i] += wj * (a @ m.w_down[e])
    return out


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_routing_semantics(router):
    m = make_moe(router=router, top_k=3)
    h = torch.randn(17, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(h[None])[0], manual_moe(m, h), atol=1e-12, rtol=0)


def test_router_types_pick_the_same_experts_and_normalized_weights():
    """Both routers take the top-k logits; a full softmax renormalized over the chosen set equals a softmax over that
    set, so the weights agree too (the options differ only numerically); the weights sum to 1."""
    for k in (2, 3):
        m = make_moe(top_k=k)
        h = torch.randn(9, 16, dtype=torch.float64)
        _, probs, w_a, idx_a = m.route(h)
        m.config = dataclasses.replace(m.config, router="topk_softmax")
        _, _, w_b, idx_b = m.route(h)
        assert torch.equal(idx_a, idx_b)
        assert torch.equal(idx_a, torch.topk(h @ m.gate.weight.T, k).indices)
        torch.testing.assert_close(w_a.sum(-1), torch.ones(9, dtype=w_a.dtype))
        torch.testing.assert_close(w_a, w_b)
        assert (w_a > probs.gather(1, idx_a)).all()  # renormalized: larger than the raw probabilities


def test_router_losses_closed_form():
    # 2 experts, top-1, 4 tokens: logits chosen so that token 0,1,2 -> expert 0 and token 3 -> expert 1.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 3.0]])
    probs = torch.softmax(logits, -1)
    idx = probs.argmax(-1, keepdim=True)
    lb, z, load = router_losses(logits, probs, idx)
    f = torch.tensor([3 / 4, 1 / 4])
    p = probs.mean(0)
    torch.testing.assert_close(lb, 2 * (f * p).sum())
    lse = [math.log(math.exp(2) + 1), math.log(math.e + 1), math.log(1 + math.exp(-1)), math.log(1 + math.exp(3))]
    torch.testing.assert_close(z, torch.tensor(sum(v * v for v in lse) / 4))
    torch.testing.assert_close(load, f)
    # the mask drops token 3: only expert 0 is loaded
    lb_m, z_m, load_m = router_losses(logits, probs, idx, torch.tensor([True, True, True, False]))
    torch.testing.assert_close(lb_m, 2 * probs[:3, 0].mean())
    torch.testing.assert_close(z_m, torch.tensor(sum(v * v for v in lse[:3]) / 3))
    torch.testing.assert_close(load_m, torch.tensor([1.0, 0.0]))
    # perfectly balanced uniform router: loss equals top_k
    u = torch.zeros(4, 2)
    lb_u, _, _ = router_losses(u, torch.softmax(u, -1), torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]]))
    torch.testing.assert_close(lb_u, torch.tensor(2.0))


def test_moe_records_stats_and_token_mask():
    m = make_moe()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    m(x, token_mask=mask)
    stats = m.pop_stats()
    assert not m.pending_routes and stats.router_logits.shape == (10, 6)
    logits = stats.router_logits
    lb, z, load = router_losses(logits, torch.softmax(logits, -1), torch.topk(logits, 2).indices, mask.reshape(-1))
    torch.testing.assert_close(stats.load_balancing_loss, lb)
    torch.testing.assert_close(stats.weighted_loss, 0.01 * lb + 0.001 * z)
    torch.testing.assert_close(stats.expert_load, load)
    torch.testing.assert_close(load.sum(), torch.tensor(1.0, dtype=load.dtype))


def test_router_jitter_only_in_training():
    m = make_moe(router_jitter=0.5)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"top_k": 9}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"expert_hidden": 0}, "expert_hidden"),
        ({"shared_experts": -1}, "shared_experts"),
        ({"router_jitter": 1.5}, "router_jitter"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"router": "sigmoid"}, "router"),
        ({"dispatch": "scatter"}, "dispatch"),
    ],
)
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(zoo.ConfigError, match=rf"moe\.{key}"):
        ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "ffn": "moe", "moe": kw})


def tiny_mixtral(n_layers=2, **kw):
    cfg = dict(
        vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, rope_theta=5000.0,
        max_position_embeddings=512, rms_norm_eps=1e-6, router_aux_loss_coef=0.02,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(**cfg)).eval()
    with torch.no_grad():  # a sharper router than the 0.02 init, so routing is not near-uniform
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return hf


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_logits_and_aux_loss_match_mixtral(dispatch):
    hf = tiny_mixtral(n_layers=1)
    model = from_mixtral(hf).eval()
    model.config.module_args["moe"]["dispatch"] = dispatch
    for layer in model.model.layers:
        layer.ffn.config = dataclasses.replace(layer.ffn.config, dispatch=dispatch)
    x = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        ref = hf(x, labels=x, output_router_logits=True)
        out = model(x, labels=x, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.router_logits[0], ref.router_logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)  # z_loss_coef is 0 for Mixtral


def test_multi_layer_mixtral_aux_loss_is_mean_of_per_layer_losses():
    """zoo balances each layer (mean of per-layer losses); HF pools the statistics of all layers first."""
    hf = tiny_mixtral(n_layers=3)
    model = from_mixtral(hf).eval()
    x = torch.randint(0, 101, (2, 29))
    with torch.no_grad():
        ref = hf(x, output_router_logits=True)
        out = model(x, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    per_layer = torch.stack([load_balancing_loss_func((r,), 6, 2) for r in ref.router_logits])
    torch.testing.assert_close(out.aux_loss, per_layer.mean(), atol=1e-6, rtol=0)
    assert out.expert_load.shape == (3, 6)


def test_decode_with_cache_matches_full_forward():
    model = from_mixtral(tiny_mixtral()).eval()
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(prefill_then_decode_logits(model, x, 8), model(x).logits[:, 8:], atol=1e-5, rtol=0)


def test_decode_steps_compute_router_statistics_only_on_request():
    """Prefill: the router fields; a decode step: none (and no statistics left pending), unless the router logits or
    a loss are asked for."""
    model = tiny_zoo_moe()
    x = torch.randint(1, 50, (2, 7))
    with torch.no_grad():
        prefill = model(x[:, :6], use_cache=True)
        assert prefill.aux_loss is not None and prefill.expert_load.shape == (1, 4)
        step = model(x[:, 6:], cache=prefill.past_key_values, use_cache=True)
        assert step.aux_loss is None and step.router_loss is None and step.expert_load is None
        assert all(not m.pending_routes for m in model.modules() if isinstance(m, MoE))
        full = model(x)
    torch.testing.assert_close(step.logits, full.logits[:, 6:], atol=1e-5, rtol=0)
    with torch.no_grad():
        cache = model(x[:, :6], use_cache=True).past_key_values
        asked = model(x[:, 6:], cache=cache, use_cache=True, output_router_logits=True)
        cache = model(x[:, :6], use_cache=True).past_key_values
        labelled = model(x[:, 6:], cache=cache, use_cache=True, labels=x[:, 6:])
    assert asked.aux_loss is not None and asked.router_logits[0].shape == (2, 4)
    assert labelled.aux_loss is not None and labelled.router_loss is not None


def tiny_zoo_moe(**moe):
    spec = ModelConfig.from_dict(
        {
            "d_model": 32, "n_layers": 2, "blocks": ["attention"], "ffn": ["moe", "swiglu"], "vocab_size": 50,
            "attention": {"n_heads": 4, "n_kv_heads": 2},
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "shared_experts": 1, **moe},
        }
    )
    torch.manual_seed(0)
    return ZooForCausalLM(ZooConfig.from_model_config(spec, eos_token_id=0)).eval()


def test_init_parameters_fills_stacked_weights():
    ffn = tiny_zoo_moe().model.layers[0].ffn
    for w in (ffn.w_gate, ffn.w_up, ffn.w_down):
        assert torch.isfinite(w).all() and 0.015 < w.std() < 0.025


def test_save_load_round_trip(tmp_path):
    m = tiny_zoo_moe(router="topk_softmax")
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].ffn, MoE) and loaded.model.layers[0].ffn.config.router == "topk_softmax"
    x = torch.randint(0, 50, (2, 9))
    a, b = loaded(x, labels=x), m(x, labels=x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(loaded.model.layers[0].ffn.w_down, m.model.layers[0].ffn.w_down)


def test_loss_includes_router_loss_and_backprops_to_router():
    m = tiny_zoo_moe().train()
    x = torch.randint(0, 50, (2, 9))
    out = m(x, labels=x)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.router_loss, 0.01 * out.aux_loss + 0.001 * out.z_loss)
    torch.testing.assert_close(out.loss, lm + out.router_loss)
    assert out.router_logits is None and out.expert_load.shape == (1, 4)
    out.router_loss.backward()
    assert m.model.layers[0].ffn.gate.weight.grad.abs().sum() > 0
    assert not m.model.layers[0].ffn.pending_routes  # taken by the model, no graph kept alive


def test_dense_model_output_is_unchanged():
    """A model without MoE returns transformers' plain causal-LM output: the loss is the LM cross entropy alone, and
    there are no router fields."""
    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "vocab_size": 50, "attention": {"n_heads": 4}})
    ids = torch.randint(0, 50, (2, 5))
    out = ZooForCausalLM(ZooConfig.from_model_config(spec))(ids, labels=ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert not [f for f in ("aux_loss", "z_loss", "router_loss", "router_logits", "expert_load") if hasattr(out, f)]
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm)


def test_tiny_moe_training_logs_router_metrics(tmp_path):
    import csv

    from conftest import tiny_overrides
    from zoo.recipe_loader import load_recipe
    from zoo.train import train

    overrides = tiny_overrides(tmp_path, **{"trainer.log_every": 2, "model.moe.expert_hidden": 32})
    train(load_recipe("moe_small", overrides))
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    moe_columns = ["train_aux_loss", "train_z_loss", "moe/load_max_over_mean", "moe/load_max_over_mean/layer0", "moe/load_max_over_mean/layer1"]
    assert list(rows[0]) == ["step", "train_loss", "lr", "tokens_per_s", "val_loss", "val_ppl", *moe_columns]
    logged = [row for row in rows if row["train_loss"]]
    assert [int(row["step"]) for row in logged] == [2, 4, 6]
    for row in logged:
        assert 0 < float(row["train_aux_loss"]) <= 8 * 2  # E * sum_e f_e P_e lies in (0, E * top_k]
        assert float(row["train_z_loss"]) > 0
        ratios = [float(row[f"moe/load_max_over_mean/layer{i}"]) for i in range(2)]
        assert 1 <= float(row["moe/load_max_over_mean"]) <= 4 and float(row["moe/load_max_over_mean"]) == pytest.approx(sum(ratios) / 2, abs=1e-5)


def test_left_padded_batch_router_losses_count_every_rows_real_tokens():
    """The model runs a left-padded batch row by row; the router losses must pool all rows' real tokens (not keep
    only the last row's call) and never count padding."""
    m = tiny_zoo_moe()
    a, b = torch.randint(1, 50, (1, 5)), torch.randint(1, 50, (1, 3))
    logits = torch.cat([m(row, output_router_logits=True).router_logits[0] for row in (a, b)])  # [8, E]: real tokens
    lb, z, _ = router_losses(logits, torch.softmax(logits, -1), torch.topk(logits, 2).indices)
    batch = torch.cat((a, torch.cat((torch.zeros(1, 2, dtype=torch.long), b), 1)))  # row 1 left-padded by 2
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    out = m(batch, attention_mask=mask, output_router_logits=True)
    assert out.router_logits[0].shape == (8, 4)
    torch.testing.assert_close(out.aux_loss, lb)
    torch.testing.assert_close(out.z_loss, z)
