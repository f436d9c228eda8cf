"""Gated DeltaNet: the rule as a parametrisation of the generalized delta rule (every backend, against the rule written
out with matrices), and the block against transformers' ``Qwen3NextGatedDeltaNet`` (torch path, fp32)."""
import pytest
import torch
from transformers import DynamicCache, Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from zoo.kernels.dplr_delta_rule import GATED_DELTA_BACKENDS, gated_delta_rule
from zoo.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, weights_from_qwen3_next

B, T, H, K, V = 2, 37, 3, 24, 20  # odd T, K and V not powers of two


def rule_inputs(T, H, K, V, g_shape_extra=(), seed=0):
    """Unit-norm keys, decays spanning ~0 (log -14) to ~1 (log -1e-6), beta in (0, 1), a non-zero start state."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.exp(torch.empty(B, T, H, *g_shape_extra).uniform_(-13.8, 2.6, generator=gen))  # log alpha in [-14, -1e-6]
    beta = torch.rand(B, T, H, generator=gen)
    return q, k, v, g, beta, torch.randn(B, H, K, V, generator=gen)


def gated_delta_matrices(q, k, v, g, beta, S):
    """``S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``, ``o_t = q_t S_t``, in fp64 with explicit matrices."""
    q, k, v, g, beta, S = (t.double() for t in (q, k, v, g, beta, S))
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(q.shape[1]):
        kt, bt, at = k[:, t, :, :, None], beta[:, t, :, None, None], g[:, t].exp()[..., None, None]  # k_t^T: [B, H, K, 1]
        S = at * (eye - bt * kt @ kt.transpose(-1, -2)) @ S + bt * kt @ v[:, t, :, None, :]
        outs.append((q[:, t, :, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=1), S


@pytest.mark.parametrize("backend", [b for b in GATED_DELTA_BACKENDS.names() if b not in ("auto", "fla")])
def test_rule_equals_the_matrix_recurrence(backend):
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    q, k, v, g, beta, S0 = rule_inputs(T, H, K, V)
    o, S = gated_delta_rule(q, k, v, g, beta, S0, chunk_size=16, backend=backend)
    o_ref, S_ref = gated_delta_matrices(q, k, v, g, beta, S0)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-4, rtol=1e-4)


def test_fla_backend_runs_fla_chunk_gated_delta_rule():
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    from triton_testing import fla_on_cpu

    q, k, v, g, beta, S0 = rule_inputs(T, 2, 32, 16)  # fla's tl.dot wants K, V >= 16
    with fla_on_cpu():
        o, S = gated_delta_rule(q, k, v, g, beta, S0, backend="fla")
    o_ref, S_ref = gated_delta_matrices(q, k, v, g, beta, S0)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-4, rtol=1e-4)


def qwen3_next_pair(n_k_heads=2, n_v_heads=4, d_model=48):
    """A tiny ``Qwen3NextGatedDeltaNet`` with random weights and the zoo block loaded from it."""
    hf_config = Qwen3NextConfig(
        hidden_size=d_model, linear_num_key_heads=n_k_heads, linear_num_value_heads=n_v_heads, linear_key_head_dim=16,
        linear_value_head_dim=12, linear_conv_kernel_dim=4, num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=32,
    )
    torch.manual_seed(0)
    hf = Qwen3NextGatedDeltaNet(hf_config, 0).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    config = GatedDeltaNetConfig(n_k_heads=n_k_heads, n_v_heads=n_v_heads, head_k_dim=16, head_v_dim=12, d_conv=4,
                                 norm_eps=hf_config.rms_norm_eps)
    block = GatedDeltaNet(config, d_model, 0).eval()
    block.load_state_dict(weights_from_qwen3_next(hf.state_dict(), config))
    return hf_config, hf, block


@pytest.mark.parametrize("heads", [(2, 4), (3, 3)])
def test_block_equals_qwen3_next_full_and_token_by_token(heads):
    hf_config, hf, block = qwen3_next_pair(*heads)
    x = torch.randn(2, 29, 48)
    with torch.no_grad():
        ref = hf(x)
        y, _ = block(x)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        cache, state, prefix = DynamicCache(config=hf_config), None, 11
        hf_steps, zoo_steps = [hf(x[:, :prefix], cache=cache)], []
        y_prefix, state = block(x[:, :prefix])
        zoo_steps.append(y_prefix)
        for t in range(prefix, x.shape[1]):
            hf_steps.append(hf(x[:, t : t + 1], cache=cache))
            y_t, state = block(x[:, t : t + 1], state)
            zoo_steps.append(y_t)
        torch.testing.assert_close(torch.cat(zoo_steps, 1), torch.cat(hf_steps, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(zoo_steps, 1), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.ssm, cache.get_recurrent_state(0), atol=1e-5, rtol=1e-5)


def test_value_heads_must_be_a_multiple_of_key_heads():
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="n_v_heads"):
        GatedDeltaNetConfig(n_k_heads=3, n_v_heads=4).validate(48)


@pytest.mark.parametrize("name", ["gated_deltanet", "kda"])
def test_bidirectional_form_sees_the_whole_sequence(name):
    """For diffusion denoisers: the first position's output changes with the last token's input."""
    from zoo.layers import MIXERS

    entry = MIXERS.get(name)
    block = entry.cls.bidirectional(entry.config_cls(), 48, 0).double().eval()
    x = torch.randn(1, 9, 48, dtype=torch.float64)
    y, _ = block(x)
    x[:, -1] += 1.0
    assert not torch.allclose(block(x)[0][:, 0], y[:, 0])
