"""Kimi Delta Attention: the rule as a parametrisation of the generalized delta rule (every backend, against the rule
written out with matrices), and the block against transformers' ``KimiLinearDeltaAttention`` (torch path, fp32)."""
import pytest
import torch
from transformers import DynamicCache, KimiLinearConfig
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

from test_gated_deltanet import B, H, K, T, V, rule_inputs
from zoo.kernels.dplr_delta_rule import KDA_BACKENDS, kda_rule
from zoo.layers.kda import KDA, KDAConfig, weights_from_kimi_linear


def kda_matrices(q, k, v, g, beta, S):
    """``S_t = (I - beta_t k_t^T k_t) Diag(alpha_t) S_{t-1} + beta_t k_t^T v_t``, ``o_t = q_t S_t``, in fp64 with
    explicit matrices."""
    q, k, v, g, beta, S = (t.double() for t in (q, k, v, g, beta, S))
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(q.shape[1]):
        kt, bt = k[:, t, :, :, None], beta[:, t, :, None, None]  # k_t^T: [B, H, K, 1]
        S = (eye - bt * kt @ kt.transpose(-1, -2)) @ torch.diag_embed(g[:, t].exp()) @ S + bt * kt @ v[:, t, :, None, :]
        outs.append((q[:, t, :, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=1), S


@pytest.mark.parametrize("backend", [b for b in KDA_BACKENDS.names() if b not in ("auto", "fla")])
def test_rule_equals_the_matrix_recurrence(backend):
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    q, k, v, g, beta, S0 = rule_inputs(T, H, K, V, (K,))
    o, S = kda_rule(q, k, v, g, beta, S0, chunk_size=16, backend=backend)
    o_ref, S_ref = kda_matrices(q, k, v, g, beta, S0)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-4, rtol=1e-4)


def test_fla_backend_runs_fla_chunk_kda():
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    from triton_testing import fla_on_cpu

    q, k, v, g, beta, S0 = rule_inputs(T, 2, 32, 16, (32,))  # fla's tl.dot wants K, V >= 16
    with fla_on_cpu():
        o, S = kda_rule(q, k, v, g, beta, S0, backend="fla")
    o_ref, S_ref = kda_matrices(q, k, v, g, beta, S0)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-4, rtol=1e-4)


def kimi_linear_pair(n_heads=3, head_dim=16, d_model=48):
    """A tiny ``KimiLinearDeltaAttention`` with random weights and the zoo block loaded from it."""
    hf_config = KimiLinearConfig(
        hidden_size=d_model, linear_num_heads=n_heads, linear_head_dim=head_dim, linear_conv_kernel_dim=4,
        num_hidden_layers=1, layer_types=["linear_attention"], vocab_size=32,
    )
    torch.manual_seed(0)
    hf = KimiLinearDeltaAttention(hf_config, 0).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    config = KDAConfig(n_heads=n_heads, head_dim=head_dim, decay_rank=head_dim, gate_rank=head_dim, d_conv=4,
                       norm_eps=hf_config.rms_norm_eps)
    block = KDA(config, d_model, 0).eval()
    block.load_state_dict(weights_from_kimi_linear(hf.state_dict()))
    return hf_config, hf, block


def test_block_equals_kimi_linear_full_and_token_by_token():
    hf_config, hf, block = kimi_linear_pair()
    x = torch.randn(2, 29, 48)
    with torch.no_grad():
        ref = hf(x)
        y, _ = block(x)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        cache, prefix = DynamicCache(config=hf_config), 11
        hf_steps = [hf(x[:, :prefix], cache=cache)]
        y_prefix, state = block(x[:, :prefix])
        zoo_steps = [y_prefix]
        for t in range(prefix, x.shape[1]):
            hf_steps.append(hf(x[:, t : t + 1], cache=cache))
            y_t, state = block(x[:, t : t + 1], state)
            zoo_steps.append(y_t)
        torch.testing.assert_close(torch.cat(zoo_steps, 1), torch.cat(hf_steps, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(zoo_steps, 1), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.ssm, cache.get_recurrent_state(0), atol=1e-5, rtol=1e-5)
