"""The block contract, checked for every registered block: full == chunked prefill + decode, states are new."""
import pytest
import torch

from zoo.config import ModelConfig
from zoo.layers import MIXERS, map_state

D_MODEL = 48
TOL = 1e-10  # fp64: the correct paths agree to ~1e-15; a state rounded through fp32 between calls is off by ~1e-9
# Per-block settings small enough for fast CPU tests; blocks not listed use their defaults.
TEST_ARGS = {"attention": {"n_heads": 4, "n_kv_heads": 2}, "lstm": {"hidden_size": 40}, "retnet": {"n_heads": 4, "value_factor": 2, "chunk_size": 16}, "mamba": {"d_state": 8, "dt_rank": 4}, "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 16}, "rwkv6": {"head_dim": 12, "decay_lora_rank": 8, "mix_lora_rank": 4, "chunk_size": 16}, "rwkv7": {"head_dim": 16, "decay_lora_rank": 8, "a_lora_rank": 8, "gate_lora_rank": 8, "chunk_size": 16}}


def make_block(name, layer_idx=0):
    spec = ModelConfig.from_dict({"d_model": D_MODEL, "blocks": [name], "n_layers": 1, **({name: TEST_ARGS[name]} if name in TEST_ARGS else {})})
    return MIXERS.get(name).cls(spec.args_for(name), D_MODEL, layer_idx).double().eval()


def run_chunks(block, x, sizes):
    state, outs, start = None, [], 0
    for size in sizes:
        y, state = block(x[:, start : start + size], state)
        outs.append(y)
        start += size
    return torch.cat(outs, dim=1), state


def flat(state):
    out = []
    map_state(state, lambda t: out.append(t) or t)
    return out


def check_states(state, expected, dtype):
    """Every state tensor in ``dtype`` and equal to ``expected``'s, tensor for tensor (same count, same order)."""
    assert all(t.dtype == dtype for t in flat(state)), [t.dtype for t in flat(state)]
    for a, b in zip(flat(state), flat(expected), strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", MIXERS.names())
@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_full_equals_prefill_then_decode(name, T):
    block = make_block(name)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    full, full_state = block(x)
    for k in sorted({0, 1, T // 2, T - 1} & set(range(T))):
        sizes = ([k] if k else []) + [1] * (T - k)
        y, state = run_chunks(block, x, sizes)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, full, atol=TOL, rtol=TOL)
        check_states(state, full_state, torch.float64)


# Measured here: layers/mamba2.py builds A from ``self.A_log.float()``, so an fp64 block rounds A to fp32 and sums dA
# in fp32; chunked and full dA_log then differ by 3e-9 (relative 2e-8).
@pytest.mark.parametrize("name", MIXERS.names())
def test_chunked_equals_full_with_gradients(name):
    block = make_block(name)
    x = torch.randn(2, 65, D_MODEL, dtype=torch.float64, requires_grad=True)
    full, _ = block(x)
    g_full = torch.autograd.grad(full.square().sum(), [x, *block.parameters()])
    chunked, _ = run_chunks(block, x, [16, 1, 30, 18])
    g_chunked = torch.autograd.grad(chunked.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(chunked, full, atol=TOL, rtol=TOL)
    for a, b in zip(g_chunked, g_full, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", MIXERS.names())
def test_state_passed_in_is_not_modified(name):
    block = make_block(name)
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64)
    _, state = block(x)
    before = [t.clone() for t in flat(state)]
    _, new_state = block(x[:, :1], state)
    for a, b in zip(flat(state), before, strict=True):
        assert torch.equal(a, b)
    assert len(flat(new_state)) == len(flat(state)) > 0
    assert all(a is not b for a, b in zip(flat(new_state), flat(state), strict=True))


@pytest.mark.parametrize("name", MIXERS.names())
def test_init_state_is_the_empty_start(name):
    block = make_block(name)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    state = block.init_state(2, device="cpu", dtype=torch.float64)
    torch.testing.assert_close(block(x, state)[0], block(x)[0], atol=TOL, rtol=TOL)
    assert flat(state) and all(t.dtype == torch.float64 and t.device.type == "cpu" for t in flat(state))


@pytest.mark.parametrize("name", MIXERS.names())
def test_bad_inputs_are_named(name):
    block = make_block(name, layer_idx=3)
    with pytest.raises(ValueError, match=rf"{name} block \(layer 3\): expected x of shape \[B, T, {D_MODEL}\], got \[2, 5, 7\]"):
        block(torch.randn(2, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected x of shape"):
        block(torch.randn(5, D_MODEL, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        block(torch.ones(2, 5, D_MODEL, dtype=torch.long))
    _, state = block(torch.randn(2, 5, D_MODEL, dtype=torch.float64))
    with pytest.raises(ValueError, match="state batch 2 != input batch 3"):
        block(torch.randn(3, 1, D_MODEL, dtype=torch.float64), state)
