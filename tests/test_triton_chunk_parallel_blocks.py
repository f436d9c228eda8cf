"""The RetNet, RWKV-6, RWKV-7, Gated DeltaNet and KDA blocks with ``backend: triton_chunk`` (zoo's chunk-parallel Triton
kernels; the interpreter on CPU), the two delta-rule blocks also with ``triton_recurrent``, against the same blocks with
``backend: torch``: outputs, states and every parameter's gradient, fp32, a
sequence of 21 tokens (two chunks of 16, the second partial), then one more call continuing from the state."""
import pytest
import torch

pytest.importorskip("triton")

from test_backends import build  # noqa: E402
from triton_testing import DEVICE, assert_relative_error  # noqa: E402


@pytest.mark.parametrize("block,backend", [(b, "triton_chunk") for b in ("retnet", "rwkv6", "rwkv7", "gated_deltanet", "kda")]
                         + [(b, "triton_recurrent") for b in ("gated_deltanet", "kda")])
def test_block_with_triton_matches_torch(block, backend):
    torch.manual_seed(0)
    reference = build(block, backend="torch").to(DEVICE)  # the GPU when there is one, else the interpreter
    fast = build(block, backend=backend).to(DEVICE)
    assert fast.backend == backend
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 21, 48).to(DEVICE)
    step = torch.randn(2, 3, 48).to(DEVICE)
    runs = []
    for module in (reference, fast):
        y, state = module(x)
        y2, state2 = module(step, state)
        ((y * torch.linspace(-1, 1, 48, device=DEVICE)).sum() + y2.square().sum()).backward()
        runs.append((y, y2, [*state, *state2], {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (y_ref, y2_ref, states_ref, grads_ref), (y, y2, states, grads) = runs
    assert_relative_error(y, y_ref, 1e-5, "y")
    assert_relative_error(y2, y2_ref, 1e-5, "y after the state")
    for s, s_ref in zip(states, states_ref, strict=True):
        assert_relative_error(s, s_ref, 1e-5, "state")
    assert grads.keys() == grads_ref.keys() and grads
    for name, grad in grads.items():
        assert_relative_error(grad, grads_ref[name], 1e-4, f"d{name}")
