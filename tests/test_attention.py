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


def _flash_attn_varlen_stand_in(calls):
    """flash-attn's ``flash_attn_varlen_func`` written with SDPA (its documented layout: ``q, k, v [total, H, Dh]``,
    int32 ``cu_seqlens``, causal aligned per sequence); records each call's arguments."""
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        calls.append((cu_seqlens_q.dtype, cu_seqlens_q.tolist(), max_seqlen_q, causal))
        assert q.dim() == 3 and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        bounds = cu_seqlens_q.tolist()
        out = [torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, enable_gqa=True,
        ).transpose(0, 1) for a, b in zip(bounds, bounds[1:])]
        return torch.cat(out)  # [total, H, Dh]
    return flash_attn_varlen_func


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_through_flash_attn_varlen_match_the_mask(causal, monkeypatch):
    """The flash-attn backend passes packed documents to ``flash_attn_varlen_func`` (checked on CPU against a
    stand-in with flash-attn's layout; the CUDA check patched out): the same outputs as SDPA's block-diagonal mask."""
    import sys
    import types

    from zoo.layers import attention
    from zoo.layers.base import Documents

    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_flash_attn_varlen_stand_in(calls)))
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    monkeypatch.setattr(attention, "check_flash_attn_inputs", lambda q: None)
    flash, sdpa = make("flash_attn", causal=causal), make("sdpa", causal=causal)
    x = torch.randn(1, 13, 32, dtype=torch.float64)
    documents = Documents.from_bounds([0, 5, 6, 13], x.device)
    (y, state), (y_ref, state_ref) = flash(x, documents=documents), sdpa(x, documents=documents)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state.k, state_ref.k)
    assert calls == [(torch.int32, [0, 5, 6, 13], 7, causal)]


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs a CUDA GPU with flash-attn installed")
def test_packed_documents_flash_attn_varlen_equals_sdpa_on_gpu():
    from zoo.layers.base import Documents

    flash, sdpa = (make(b).to("cuda", torch.bfloat16) for b in ("flash_attn", "sdpa"))
    x = torch.randn(1, 300, 32, device="cuda", dtype=torch.bfloat16)
    documents = Documents.from_bounds([0, 100, 101, 300], x.device)
    torch.testing.assert_close(flash(x, documents=documents)[0], sdpa(x, documents=documents)[0], atol=2e-2, rtol=2e-2)
