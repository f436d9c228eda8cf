"""Triton RWKV-6 and generalized delta rule (``dplr_delta_rule``, RWKV-7's) kernels against the fp64 naive references:
outputs, final state and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported), so shapes are tiny (B <= 2, H = 2); the GPU tests at the end use real shapes.
"""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from triton_testing import DEVICE, assert_relative_error, require_interpreter, run_with_grads  # noqa: E402
from zoo.kernels.rwkv6 import rwkv6_chunked, rwkv6_naive, rwkv6_triton  # noqa: E402
from zoo.kernels.rwkv6.triton_rwkv6 import _rwkv6_fwd_kernel  # noqa: E402
from zoo.kernels.dplr_delta_rule import dplr_delta_rule_chunked, dplr_delta_rule_naive, dplr_delta_rule_triton  # noqa: E402

require_interpreter(_rwkv6_fwd_kernel)

# max |error| / max |reference| per input dtype (gradients are rounded to the input dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what):
    assert_relative_error(actual, expected, TOLERANCE[dtype], f"{what} ({dtype})")


def check_against_reference(fn, ref_fn, inputs, dtype):
    """Kernel on ``inputs`` in ``dtype`` vs the reference in fp64 on the same (rounded) values."""
    low = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ref_inputs = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    o, s, grads = run_with_grads(fn, low)
    o_ref, s_ref, grads_ref = run_with_grads(ref_fn, ref_inputs)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o, o_ref, dtype, "o")
    assert_close(s, s_ref, dtype, "final state")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert_close(grad, grads_ref[name], dtype, f"d{name}")


def rwkv6_inputs(B=1, T=16, H=2, K=24, V=16, initial_state=True, device=DEVICE, decay_range=(-3.0, 1.0)):
    lo, hi = decay_range
    inputs = dict(
        r=torch.randn(B, T, H, K),
        k=torch.randn(B, T, H, K) * K**-0.5,
        v=torch.randn(B, T, H, V),
        w_log=-torch.exp(torch.empty(B, T, H, K).uniform_(lo, hi)),  # decays from ~exp(-e) to ~1
        u=torch.randn(H, K) * 0.5,
        initial_state=torch.randn(B, H, K, V) if initial_state else None,
    )
    return {n: t.to(device) if torch.is_tensor(t) else t for n, t in inputs.items()}


def rwkv7_inputs(B=1, T=16, H=2, K=24, V=16, initial_state=True, device=DEVICE, decay_range=(-3.0, 1.0)):
    lo, hi = decay_range
    kk = F.normalize(torch.randn(B, T, H, K), dim=-1)
    alpha = torch.rand(B, T, H, K)
    inputs = dict(
        r=torch.randn(B, T, H, K),
        w_log=-torch.exp(torch.empty(B, T, H, K).uniform_(lo, hi)),
        k=torch.randn(B, T, H, K) * K**-0.5,
        v=torch.randn(B, T, H, V),
        a=-kk,
        b=kk * alpha,
        initial_state=torch.randn(B, H, K, V) if initial_state else None,
    )
    return {n: t.to(device) if torch.is_tensor(t) else t for n, t in inputs.items()}


OPS = {
    "rwkv6": (rwkv6_triton, rwkv6_naive, rwkv6_inputs),
    "dplr_delta_rule": (dplr_delta_rule_triton, dplr_delta_rule_naive, rwkv7_inputs),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_fp32_matches_naive(op, T):
    """Head dim 24 (padded to 32), checkpoints every 16 tokens: T = 63 / 64 / 65 end inside, on and past a chunk.

    One head (the interpreter runs one program step per token and head); the tests below use two.
    """
    fn, ref, make = OPS[op]
    inputs = make(T=T, H=1)
    inputs["chunk_size"] = 16
    ref_kwargs = {n: t for n, t in inputs.items() if n != "chunk_size"}
    check_against_reference(fn, lambda **kw: ref(**{n: kw[n] for n in ref_kwargs}), inputs, torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_naive(op, dtype):
    fn, ref, make = OPS[op]
    check_against_reference(fn, ref, make(T=17), dtype)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_split_v_no_initial_state(op):
    """Transposed (non-contiguous) inputs, V = 40 split over two 32-wide blocks, B = 2, no initial state."""
    fn, ref, make = OPS[op]
    inputs = make(B=2, T=9, V=40, initial_state=False)
    strided = {}
    for name, t in inputs.items():
        if torch.is_tensor(t) and t.dim() == 4:
            t = t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, T, H, *] strides of [B, H, T, *]
            assert not t.is_contiguous()
        strided[name] = t
    check_against_reference(fn, ref, strided, torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_output_only_loss_and_torch_backend_agree(op):
    """Backward with no gradient flowing into the final state; the Triton and chunked torch forms agree."""
    fn, _, make = OPS[op]
    chunked = rwkv6_chunked if op == "rwkv6" else dplr_delta_rule_chunked
    inputs = make(T=12)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, _ = fn(**leaves)
    o.square().sum().backward()
    o_ref, _ = chunked(**{n: t.detach() for n, t in leaves.items()})
    assert_close(o, o_ref, torch.float32, "o")
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.parametrize("op", OPS)
def test_input_checks(op):
    fn, _, make = OPS[op]
    inputs = make(T=4)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        fn(**{n: t.double() for n, t in inputs.items()})
    with pytest.raises(ValueError, match="initial_state"):
        fn(**{**inputs, "initial_state": inputs["initial_state"][:, :1]})
    with pytest.raises(ValueError, match="chunk_size"):
        fn(**inputs, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_chunked(op, dtype):
    """Real shapes (16 heads x 64) on the GPU against the chunked torch form in fp64."""
    fn, _, make = OPS[op]
    chunked = rwkv6_chunked if op == "rwkv6" else dplr_delta_rule_chunked
    inputs = make(B=2, T=1000, H=16, K=64, V=64, device="cuda")
    check_against_reference(fn, chunked, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", OPS)
def test_gpu_bf16_long_sequence_is_finite(op):
    """T = 65536 in bf16 with decays from ~exp(-20) to ~1: outputs, final state and all gradients stay finite."""
    fn, _, make = OPS[op]
    inputs = make(T=65536, H=4, K=64, V=64, device="cuda", decay_range=(-8.0, 3.0))
    leaves = {n: t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    o, s = fn(**leaves, chunk_size=64)
    (o.float().square().mean() + s.float().square().mean()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
