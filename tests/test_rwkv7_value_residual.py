"""RWKV-7's value residual (paper Eqs. 8-10): the block against a token-by-token x070 reference, the model's
producer/consumer roles (hybrids, short_conv), full forward == chunked prefill + decode, gradient flow through
``v_first``, old saved configs, and fla's ``RWKV7Attention`` for layers 0 and >= 1 (fla's torch references)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fla_torch import fla_rwkv7_on_torch
from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers import NORMS, RWKV7, RWKV7Config
from zoo.modeling import ZooConfig, ZooForCausalLM

F64 = torch.float64
ARGS = {"head_dim": 8, "decay_lora_rank": 4, "a_lora_rank": 4, "gate_lora_rank": 4, "value_lora_rank": 3}


def perturb(module, scale=0.3, seed=1):
    """Move every parameter off its init so a wrong term cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def x070_reference(block: RWKV7, x: torch.Tensor, v_first: torch.Tensor | None):
    """RWKV-LM's x070 time mixing one token at a time (its ``RWKV_x070_TMix_one``), state ``[H, V, K]`` as the paper's;
    ``v_first`` None: the first layer (returns its values). Returns ``(y [B, T, D], v_first [B, T, D])``."""
    B, T, D = x.shape
    H, N = block.n_heads, block.head_dim
    p = dict(block.named_parameters())
    mu = p["x_mix"]
    ys, vs = [], []
    for b in range(B):
        state = torch.zeros(H, N, N, dtype=x.dtype)
        prev = torch.zeros(D, dtype=x.dtype)
        for t in range(T):
            xt = x[b, t]
            xx = prev - xt
            prev = xt
            xr, xw, xk, xv, xa, xg = (xt + xx * mu[i] for i in range(6))
            r = block.receptance.weight @ xr
            w = torch.exp(-math.exp(-0.5) * torch.sigmoid(p["w0"] + torch.tanh(xw @ p["w1"]) @ p["w2"]))
            k = block.key.weight @ xk
            v = block.value.weight @ xv
            a = torch.sigmoid(p["a0"] + (xa @ p["a1"]) @ p["a2"])
            g = torch.sigmoid(xg @ p["g1"]) @ p["g2"]
            kk = F.normalize((k * p["k_k"]).view(H, N), dim=-1).view(D)
            k = k * (1 + (a - 1) * p["k_a"])
            if v_first is None:
                vs.append(v)
            else:
                v = v + (v_first[b, t] - v) * torch.sigmoid(p["v0"] + (xv @ p["v1"]) @ p["v2"])
            vk = v.view(H, N, 1) @ k.view(H, 1, N)
            ab = (-kk).view(H, N, 1) @ (kk * a).view(H, 1, N)
            state = state * w.view(H, 1, N) + state @ ab + vk
            out = (state @ r.view(H, N, 1)).view(D)
            out = F.group_norm(out[None], H, block.ln_x.weight, block.ln_x.bias, block.config.group_norm_eps)[0]
            out = out + ((r * k * p["r_k"].view(D)).view(H, N).sum(-1, keepdim=True) * v.view(H, N)).view(D)
            ys.append(block.output.weight @ (out * g))
    y = torch.stack(ys).view(B, T, D)
    return y, (torch.stack(vs).view(B, T, D) if v_first is None else v_first)


def pair(d_model=16, **args):
    """A first (producer) and a later (consumer) RWKV-7 block, fp64, perturbed."""
    config = RWKV7Config(**{**ARGS, **args})
    first, later = RWKV7(config, d_model, 0), RWKV7(config, d_model, 1)
    first.set_shared_role(producer=True)
    later.set_shared_role(producer=False)
    return perturb(first.double()), perturb(later.double(), seed=2)


def test_blocks_match_the_x070_reference():
    first, later = pair()
    assert not hasattr(first, "v0") and later.v1.shape == (16, 3)
    x0, x1 = torch.randn(2, 7, 16, dtype=F64), torch.randn(2, 7, 16, dtype=F64)
    shared = {}
    y0, _ = first(x0, shared=shared)
    y1, _ = later(x1, shared=shared)
    ref0, v_first = x070_reference(first, x0, None)
    ref1, _ = x070_reference(later, x1, v_first)
    torch.testing.assert_close(shared["rwkv7.v_first"], v_first)
    torch.testing.assert_close(y0, ref0)
    torch.testing.assert_close(y1, ref1)
    # the residual matters: v_first = the layer's own values (a lerp to itself) gives a different output
    own_values = later.value(x1 + (F.pad(x1, (0, 0, 1, -1)) - x1) * later.x_mix[3])  # [B, T, D]
    assert (y1 - x070_reference(later, x1, own_values)[0]).abs().max() > 1e-3


def test_later_block_without_the_shared_values_is_refused():
    _, later = pair()
    with pytest.raises(ValueError, match=r"rwkv7 block \(layer 1\) mixes in the first RWKV-7 layer's values"):
        later(torch.randn(1, 3, 16, dtype=F64))


def model(blocks, n_layers=3, value_residual=True, **rwkv7):
    spec = ModelConfig.from_dict({
        "d_model": 16, "n_layers": n_layers, "blocks": blocks, "ffn": "rwkv7_cmix", "vocab_size": 40,
        "rwkv7": {**ARGS, "value_residual": value_residual, **rwkv7}, "attention": {"n_heads": 2},
    })
    return perturb(ZooForCausalLM(ZooConfig.from_model_config(spec)), scale=0.1).eval()


def mixers(m):
    return [layer.mixer.inner if hasattr(layer.mixer, "inner") else layer.mixer for layer in m.model.layers]


@pytest.mark.parametrize("blocks, rwkv7, readers", [
    (["rwkv7"], {}, [False, True, True]),
    (["attention", "rwkv7", "rwkv7"], {}, [None, False, True]),  # the first rwkv7 layer (1) produces
    (["rwkv7", "attention"], {"short_conv": 3}, [False, None, True, None]),  # through the ShortConv wrapper
])
def test_first_rwkv7_layer_produces_and_later_ones_read(blocks, rwkv7, readers):
    m = model(blocks, len(readers), **rwkv7)
    assert [getattr(mixer, "reads_v_first", None) for mixer in mixers(m)] == readers
    for mixer, reads in zip(mixers(m), readers):
        assert hasattr(mixer, "v0") == bool(reads)
    off = model(blocks, len(readers), value_residual=False, **rwkv7)
    assert not any(hasattr(mixer, "v0") for mixer in mixers(off))
    x = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(m(x).logits).all()


@pytest.mark.parametrize("blocks", [["rwkv7"], ["attention", "rwkv7"]])
def test_full_forward_equals_chunked_prefill_then_decode(blocks):
    """v_first is per token: each chunk and each decoded token carries its own first-layer values."""
    m = model(blocks, 4)
    x = torch.randint(0, 40, (2, 13))
    with torch.no_grad():
        full = m(x).logits
        out = m(x[:, :5], use_cache=True)
        cache, parts = out.cache, [out.logits]
        out = m(x[:, 5:9], cache=cache, use_cache=True)
        parts.append(out.logits)
        for t in range(9, 13):
            parts.append(m(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value_residual", [True, False])
def test_gradient_reaches_the_first_layer_values_through_v_first(value_residual):
    """Layer 0's output projection is zero, so its values reach the loss only through the later layers' v_first."""
    m = model(["rwkv7"], 2, value_residual=value_residual).train()
    with torch.no_grad():
        m.model.layers[0].mixer.output.weight.zero_()
    m(torch.randint(0, 40, (2, 9))).logits.square().sum().backward()
    grad = m.model.layers[0].mixer.value.weight.grad
    assert (grad.abs().max() > 1e-6) == value_residual
    assert torch.isfinite(grad).all()


def test_config_keys_are_validated_with_their_path():
    with pytest.raises(ConfigError, match=r"model\.rwkv7\.value_lora_rank: must be >= 1"):
        ModelConfig.from_dict({"d_model": 16, "blocks": ["rwkv7"], "rwkv7": {"head_dim": 8, "value_lora_rank": 0}})
    with pytest.raises(ConfigError, match=r"model\.rwkv7\.value_residual: expected bool"):
        ModelConfig.from_dict({"d_model": 16, "blocks": ["rwkv7"], "rwkv7": {"head_dim": 8, "value_residual": "yes"}})
    with pytest.raises(ConfigError, match=rf"model\.norm: unknown norm 'batchnorm'; norms: {', '.join(NORMS)}"):
        ModelConfig.from_dict({"d_model": 16, "norm": "batchnorm"})
    assert ModelConfig.from_dict({"d_model": 16, "blocks": ["rwkv7"], "rwkv7": {"head_dim": 8}}).args_for("rwkv7").value_residual


def test_a_config_saved_before_the_value_residual_loads_without_it(tmp_path):
    """A checkpoint whose config predates value_residual, group_norm_eps, value_lora_rank, norm and embed_norm
    loads as zoo's RWKV-7 was then (every layer its own values, RMSNorm) and gives the same logits."""
    old = model(["rwkv7"], 2, value_residual=False)
    old.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    for key in ("value_residual", "value_lora_rank", "group_norm_eps"):
        del saved["module_args"]["rwkv7"][key]
    del saved["norm"], saved["embed_norm"]
    path.write_text(json.dumps(saved))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not loaded.config.model_config().args_for("rwkv7").value_residual
    assert not any(hasattr(mixer, "v0") for mixer in mixers(loaded))
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, old(x).logits)


def test_a_saved_config_with_the_value_residual_round_trips(tmp_path):
    m = model(["rwkv7"], 3)
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [getattr(mixer, "reads_v_first") for mixer in mixers(loaded)] == [False, True, True]
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x).logits)


def fla_layers(n_layers=3):
    """fla RWKV7Attention layers 0..n-1 (fuse_norm off: torch's GroupNorm), perturbed, and zoo blocks holding their weights."""
    from fla.layers.rwkv7 import RWKV7Attention

    from zoo.convert.fla import convert_rwkv7_state_dict

    D, ranks = 32, dict(decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=4)
    config = RWKV7Config(head_dim=16, decay_lora_rank=8, a_lora_rank=8, gate_lora_rank=8, value_lora_rank=4, group_norm_eps=16e-5)
    pairs = []
    for i in range(n_layers):
        theirs = perturb(RWKV7Attention(hidden_size=D, head_dim=16, norm_eps=1e-5, layer_idx=i, num_hidden_layers=n_layers, **ranks), 0.1, i)
        ours = RWKV7(config, D, i)
        ours.set_shared_role(producer=i == 0)
        state = convert_rwkv7_state_dict({f"model.layers.{i}.attn.{k}": v for k, v in theirs.state_dict().items()})
        ours.load_state_dict({k.removeprefix(f"model.layers.{i}.mixer."): v for k, v in state.items()})
        pairs.append((theirs, ours))
    return pairs


def test_blocks_match_fla_rwkv7_attention_for_every_layer():
    """Layer 0 (produces v_first) and layers 1, 2 (read it): outputs, v_first and the input gradients, in fp32."""
    pytest.importorskip("fla")
    with fla_rwkv7_on_torch():
        pairs = fla_layers()
        xs = [torch.randn(2, 11, 32, requires_grad=True) for _ in pairs]
        v_first, shared, results = None, {}, []
        for (theirs, ours), x in zip(pairs, xs):
            o_theirs, _, _, v_first = theirs(x, v_first=v_first)
            o_ours, _ = ours(x, shared=shared)
            torch.testing.assert_close(o_ours, o_theirs, atol=1e-5, rtol=1e-5)
            results.append((o_theirs, o_ours))
        torch.testing.assert_close(shared["rwkv7.v_first"], v_first)
        g = torch.Generator().manual_seed(3)
        cotangents = [torch.randn(o.shape, generator=g) for o, _ in results]
        grads = {}
        for side in (0, 1):
            outs = [r[side] for r in results]
            grads[side] = torch.autograd.grad(outs, xs, cotangents, retain_graph=True)
        for i, (theirs, ours) in enumerate(zip(grads[0], grads[1])):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=lambda m: f"d x_{i}: {m}")


def test_static_decoder_and_left_padded_batches_carry_v_first():
    """rwkv7 at layers 0 and 2 (layer 2 reads v_first), attention between: zoo.decoding's static steps and a
    left-padded batch (rows prefilled one by one) generate what each row generates alone."""
    from zoo.decoding import StaticDecoder

    m = model(["rwkv7", "attention"], 4)
    ids = torch.randint(1, 40, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = m.generate(ids, attention_mask=mask, **greedy)
    torch.testing.assert_close(StaticDecoder(m, max_length=12).generate(ids, mask, max_new_tokens=5), expected)
    torch.testing.assert_close(m.generate(ids[1:], **greedy), expected[1:])
    torch.testing.assert_close(m.generate(ids[:1, 2:], **greedy), expected[:1, 2:])
