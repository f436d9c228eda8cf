"""``model.<block>.short_conv``: the ShortConv wrapper keeps the block contract, round-trips the config, trains."""
import pytest
import torch

from test_blocks import D_MODEL, TEST_ARGS, TOL, check_states, run_chunks
from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.layers import MIXERS
from zoo.layers.short_conv import ShortConv
from zoo.modeling import ZooConfig, ZooForCausalLM


@pytest.mark.parametrize("name", MIXERS.names())
def test_wrapped_block_full_equals_prefill_then_decode(name):
    spec = ModelConfig.from_dict({"d_model": D_MODEL, "blocks": [name], "n_layers": 1, name: {**TEST_ARGS.get(name, {}), "short_conv": 4}})
    block = ShortConv.wrap(MIXERS.get(name).cls(spec.args_for(name), D_MODEL, 0), spec.short_conv[name]).double().eval()
    torch.nn.init.normal_(block.weight)  # not the identity it starts as
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    full, full_state = block(x)
    for sizes in ([19], [1] * 19, [7] + [1] * 12, [2, 5, 12]):
        y, state = run_chunks(block, x, sizes)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, full, atol=TOL, rtol=TOL)
        check_states(state, full_state, torch.float64)
    assert full_state.conv.shape == (2, D_MODEL, 3)
    torch.testing.assert_close(full_state.conv, x[:, -3:].transpose(1, 2), atol=0, rtol=0)
    assert block.state_size() == D_MODEL * 3 + block.inner.state_size()
    # The identity start: the wrapped block computes what the block alone does.
    torch.nn.init.zeros_(block.weight)
    with torch.no_grad():
        block.weight[:, :, -1] = 1
    torch.testing.assert_close(block(x)[0], block.inner(x)[0], atol=TOL, rtol=TOL)


def test_short_conv_config_round_trips_and_is_checked():
    cfg = ModelConfig.from_dict({"blocks": ["conv", "attention"], "n_layers": 2, "attention": {"n_heads": 2, "short_conv": 3}})
    assert cfg.short_conv == {"attention": 3} and cfg.to_dict()["attention"]["short_conv"] == 3
    assert ModelConfig.from_dict(cfg.to_dict()).short_conv == {"attention": 3}
    assert ZooConfig.from_model_config(ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": 10})).model_config().short_conv == {"attention": 3}
    with pytest.raises(ConfigError, match=">= 0") as err:
        ModelConfig.from_dict({"attention": {"short_conv": -1}})
    assert err.value.path == "model.attention.short_conv"
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({"attention": {"short_conv": "3"}})
    assert err.value.path == "model.attention.short_conv"
    with pytest.raises(ConfigError, match="unknown key") as err:
        ModelConfig.from_dict({"swiglu": {"short_conv": 3}})
    assert err.value.path == "model.swiglu.short_conv"


def test_model_with_short_conv_wraps_only_that_block_and_trains():
    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 2, "blocks": ["lstm", "attention"], "vocab_size": 16, "attention": {"n_heads": 2, "short_conv": 3}})
    model = ZooForCausalLM(ZooConfig.from_model_config(spec))
    lstm_layer, attention_layer = model.model.layers
    assert not isinstance(lstm_layer.mixer, ShortConv) and isinstance(attention_layer.mixer, ShortConv)
    torch.testing.assert_close(attention_layer.mixer.weight[:, 0, -1], torch.ones(32))  # identity start
    ids = torch.randint(0, 16, (4, 24))
    full = model(input_ids=ids, use_cache=False).logits
    prefill = model(input_ids=ids[:, :20], use_cache=True)
    cache = prefill.past_key_values if hasattr(prefill, "past_key_values") and prefill.past_key_values is not None else prefill.cache
    step = model(input_ids=ids[:, 20:21], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, 20], atol=1e-4, rtol=1e-4)
    before = attention_layer.mixer.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not torch.equal(attention_layer.mixer.weight, before)


def test_output_attentions_reaches_attention_inside_a_short_conv():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=3, blocks=["attention", "mamba2", "attention"], vocab_size=50,
                      module_args={"attention": {"n_heads": 2, "n_kv_heads": 2}}, short_conv={"attention": 3})
    model = ZooForCausalLM(ZooConfig.from_model_config(cfg)).eval()
    assert isinstance(model.model.layers[0].mixer, ShortConv)
    out = model(input_ids=torch.randint(0, 50, (2, 7)), output_attentions=True)
    assert len(out.attentions) == 2 and all(a.shape == (2, 2, 7, 7) for a in out.attentions)
    for a in out.attentions:  # causal probabilities: rows sum to 1, nothing above the diagonal
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 7))
        assert torch.all(a.triu(1) == 0)
