import pytest
import torch

from zoo.errors import BackendUnavailableError, ConfigError
from zoo.layers import Attention, AttentionConfig
from zoo.layers.attention import flash_attn_available


def make(backend, **kw):
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, backend=backend, **kw)
    cfg.validate(32)
    torch.manual_seed(0)
    return Attention(cfg, 32, 0).double()


@pytest.mark.parametrize("T", [1, 17])
def test_sdpa_matches_eager_reference(T):
    x = torch.randn(2, T, 32, dtype=torch.float64)
    torch.testing.assert_close(make("sdpa")(x)[0], make("eager")(x)[0])
    # With a cache: the mask must align the last T queries with the last T keys.
    sdpa, eager = make("sdpa"), make("eager")
    _, s1 = sdpa(x)
    _, s2 = eager(x)
    x2 = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x2, s1)[0], eager(x2, s2)[0])


def test_attention_is_causal():
    block = make("sdpa")
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    y = block(x)[0]
    x2 = x.clone()
    x2[:, 6:] += 1.0
    y2 = block(x2)[0]
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_kv_cache_grows_with_tokens():
    block = make("sdpa")
    _, state = block(torch.randn(2, 7, 32, dtype=torch.float64))
    assert state.k.shape == (2, 2, 7, 8)
    _, state = block(torch.randn(2, 1, 32, dtype=torch.float64), state)
    assert state.k.shape == (2, 2, 8, 8)
    assert block.state_size_per_token() == 2 * 2 * 8


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_attn_backend_without_package_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="flash-attn package is not installed"):
        make("flash_attn")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown attention backend 'xformers'"):
        AttentionConfig(backend="xformers").validate(32)
