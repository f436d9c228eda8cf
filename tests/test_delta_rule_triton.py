"""Gated DeltaNet and KDA on zoo's Triton kernels (the parametrisation built inside the scan,
kernels/dplr_delta_rule/triton_delta_rule.py): every gradient (q, k, v, the log decay g, beta and the initial state) against
fp64 autograd through the torch backend, odd sizes, decays near 0 and 1, non-contiguous inputs; the same in segments."""
import pytest
import torch

pytest.importorskip("triton")

from test_gated_deltanet import rule_inputs  # noqa: E402
from zoo.kernels.dplr_delta_rule import gated_delta_rule, kda_rule  # noqa: E402
from zoo.kernels.triton_common import forced_segment  # noqa: E402

RULES = {"gated_delta_rule": (gated_delta_rule, ()), "kda": (kda_rule, (24,))}


def _run(rule, backend, inputs, dtype, segment=None):
    leaves = [t.to(dtype).detach().requires_grad_() for t in inputs]
    q, k, v, g, beta, s0 = leaves
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous [B, T, H, K]: strides of [B, H, T, K]
    with forced_segment(segment):
        o, s = rule(q, k, v, g, beta, s0, chunk_size=16, backend=backend)
    w_o = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)
    ((o.double() * w_o).sum() + s.double().square().sum()).backward()
    return o, s, [t.grad for t in leaves]


@pytest.mark.parametrize("segment", [None, 16])
@pytest.mark.parametrize("backend", ["triton_recurrent", "triton_chunk"])
@pytest.mark.parametrize("name", RULES)
def test_triton_gradients_equal_fp64_torch(name, backend, segment):
    rule, g_extra = RULES[name]
    inputs = rule_inputs(37, 3, 24, 20, g_extra)
    o_ref, s_ref, g_ref = _run(rule, "torch", inputs, torch.float64)
    o, s, grads = _run(rule, backend, inputs, torch.float32, segment)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)
    for what, grad, ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, g_ref, strict=True):
        assert grad.dtype == torch.float32
        scale = ref.abs().max().item()
        assert (grad.double() - ref).abs().max().item() <= 1e-4 * max(scale, 1.0), f"d{what}"
