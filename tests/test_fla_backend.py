"""``backend="fla"`` (flash-linear-attention 0.6.0) for rwkv6, dplr_delta_rule (RWKV-7's op) and retention: fla's own Triton kernels, run in
the Triton interpreter on CPU, against zoo's sequential fp32 references (outputs, final state and every gradient,
from a non-zero initial state, at odd lengths that cross fla's chunk boundaries), and through the blocks.

On CPU, fla's kernels need interpreter shims (``triton_testing.fla_on_cpu``, installed by the ``fla_interpreter``
fixture).
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fla")
pytest.importorskip("triton")

from triton_testing import fla_on_cpu  # noqa: E402

from zoo.kernels import retention as retention_pkg  # noqa: E402
from zoo.kernels import rwkv6 as rwkv6_pkg  # noqa: E402
from zoo.kernels import dplr_delta_rule as dplr_pkg  # noqa: E402
from zoo.layers.registry import MIXERS  # noqa: E402
from zoo.config import ModelConfig  # noqa: E402

B, H, K = 2, 2, 16  # tl.dot needs dims >= 16
ATOL = RTOL = 1e-4  # fp32 in the interpreter; measured errors are below 6e-5


@pytest.fixture(scope="module", autouse=True)
def fla_interpreter():
    """fla's kernels imported, with the interpreter shims of the module docstring on CPU."""
    with fla_on_cpu():
        yield


def _decay(T):
    return -torch.exp(torch.randn(B, T, H, K) - 1.0)  # log decay <= 0


def rwkv6_inputs(T):
    return {"r": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K) * K**-0.5, "v": torch.randn(B, T, H, K),
            "w_log": _decay(T), "u": torch.randn(H, K) * 0.5, "initial_state": torch.randn(B, H, K, K)}


def rwkv7_inputs(T):
    kk = F.normalize(torch.randn(B, T, H, K), dim=-1)
    return {"r": torch.randn(B, T, H, K), "w_log": _decay(T), "k": torch.randn(B, T, H, K) * K**-0.5,
            "v": torch.randn(B, T, H, K), "a": -kk, "b": kk * torch.rand(B, T, H, K), "initial_state": torch.randn(B, H, K, K)}


def retention_inputs(T):
    return {"q": torch.randn(B, T, H, K) * K**-0.5, "k": torch.randn(B, T, H, K) * K**-0.5, "v": torch.randn(B, T, H, 2 * K),
            "log_decay": torch.log1p(-torch.exp2(-5.0 - torch.arange(H, dtype=torch.float32))),
            "initial_state": torch.randn(B, H, K, 2 * K)}


# op: (zoo function, zoo's sequential reference, inputs, T: odd and past fla's chunk length, inputs without gradients)
OPS = {
    "rwkv6": (rwkv6_pkg.rwkv6, rwkv6_pkg.rwkv6_naive, rwkv6_inputs, 67, ()),  # fla chunks of 64
    "dplr_delta_rule": (dplr_pkg.dplr_delta_rule, dplr_pkg.dplr_delta_rule_naive, rwkv7_inputs, 37, ()),  # fla chunks of 16
    "retention": (retention_pkg.retention, retention_pkg.retention_recurrent, retention_inputs, 67, ("log_decay",)),
}


@pytest.mark.parametrize("op", OPS)
def test_fla_matches_the_reference_forward_state_and_gradients(op):
    fn, reference, make, T, constant = OPS[op]
    inputs = make(T)
    results = {}
    for name, run in (("fla", lambda **x: fn(**x, backend="fla")), ("reference", reference)):
        leaves = {n: t.clone().requires_grad_(n not in constant) for n, t in inputs.items()}
        o, state = run(**leaves)
        assert o.dtype == state.dtype == torch.float32 and o.shape == inputs["v"].shape
        torch.manual_seed(1)
        torch.autograd.backward([o, state], [torch.randn_like(o), torch.randn_like(state)])
        results[name] = (o, state, {n: t.grad for n, t in leaves.items() if n not in constant})
    (o, state, grads), (o_ref, state_ref, grads_ref) = results["fla"], results["reference"]
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state, state_ref, atol=ATOL, rtol=RTOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"d{name}: {m}")


def test_fla_retention_refuses_a_learnable_decay_and_fp64():
    inputs = retention_inputs(3)
    with pytest.raises(ValueError, match="no gradient to log_decay"):
        retention_pkg.retention(**{**inputs, "log_decay": inputs["log_decay"].requires_grad_()}, backend="fla")
    with pytest.raises(ValueError, match="fla backend takes float32, bfloat16 or float16 inputs, got torch.float64"):
        rwkv6_pkg.rwkv6(**{n: t.double() for n, t in rwkv6_inputs(3).items()}, backend="fla")


BLOCKS = {"rwkv6": {"head_dim": 16}, "rwkv7": {"head_dim": 16}, "retnet": {"n_heads": 2},
          "gated_deltanet": {"n_k_heads": 1, "n_v_heads": 2, "head_k_dim": 16, "head_v_dim": 16},
          "kda": {"n_heads": 2, "head_dim": 16, "decay_rank": 8, "gate_rank": 8}}


def build(block, backend):
    spec = ModelConfig.from_dict({"d_model": 32, "n_layers": 1, "blocks": [block], block: {**BLOCKS[block], "backend": backend}})
    return MIXERS.get(block).cls(spec.args_for(block), 32, 0)


@pytest.mark.parametrize("block", BLOCKS)
def test_block_with_fla_backend_equals_torch(block):
    """Prefill (odd length), parameter gradients, then one decoding step from the returned state."""
    torch.manual_seed(0)
    reference = build(block, "torch")
    fast = build(block, "fla")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 19, 32)
    (y_ref, state_ref), (y, state) = reference(x), fast(x)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for field, value in state._asdict().items():
        torch.testing.assert_close(value, getattr(state_ref, field), atol=ATOL, rtol=RTOL, msg=lambda m: f"{field}: {m}")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    step = torch.randn(2, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(step, state)[0], reference(step, state_ref)[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("block", BLOCKS)
def test_block_with_fla_backend_packs_documents_through_fla_cu_seqlens(block):
    """Packed documents reach fla's kernels as its ``cu_seqlens`` (one call, boundaries inside fla's chunks): each
    document's outputs and the last one's state as if run alone."""
    from zoo.layers.base import Documents

    torch.manual_seed(0)
    fast = build(block, "fla")
    x = torch.randn(1, 37, 32)
    bounds = [0, 5, 6, 22, 37]
    packed, state = fast(x, documents=Documents.from_bounds(bounds, x.device))
    alone = [fast(x[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(packed, torch.cat([y for y, _ in alone], dim=1), atol=ATOL, rtol=RTOL)
    for field, value in state._asdict().items():
        torch.testing.assert_close(value, getattr(alone[-1][1], field), atol=ATOL, rtol=RTOL, msg=lambda m: f"{field}: {m}")
