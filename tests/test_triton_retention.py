"""Triton retention kernels (fused recurrent and chunked) against the fp64 recurrent reference, forward and backward.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported), so shapes are tiny (B <= 2, H = 2); the GPU tests at the end use real shapes.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_testing import DEVICE, assert_relative_error, require_interpreter, run_with_grads  # noqa: E402
from zoo.kernels.retention import retention_chunked, retention_recurrent, retention_triton  # noqa: E402
from zoo.kernels.retention.triton_retention import _retention_fwd_kernel  # noqa: E402

require_interpreter(_retention_fwd_kernel)

# max |error| / max |reference| per input dtype (outputs and gradients are rounded to the input dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FORMS = ("recurrent", "chunk")


def assert_close(actual, expected, dtype, what, tol=None):
    assert_relative_error(actual, expected, TOLERANCE[dtype] if tol is None else tol, f"{what} ({dtype})")


def make_inputs(B=1, T=16, H=2, K=24, V=16, initial_state=True, device=DEVICE, gammas=(0.97, 0.4)):
    """Built on CPU (the same values everywhere), then moved to ``device``: the GPU when there is one (issue 26)."""
    inputs = dict(
        q=torch.randn(B, T, H, K),
        k=torch.randn(B, T, H, K) * K**-0.5,
        v=torch.randn(B, T, H, V),
        log_decay=torch.tensor([math.log(g) for g in (gammas * H)[:H]]),
        initial_state=torch.randn(B, H, K, V) if initial_state else None,
    )
    return {n: t.to(device) if torch.is_tensor(t) else t for n, t in inputs.items()}


def check_against_reference(inputs, dtype, form, chunk_size, reference=retention_recurrent, tol=None):
    """Kernel on ``inputs`` in ``dtype`` vs the reference in fp64 on the same (rounded) values."""
    low = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ref_inputs = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    o, s, grads = run_with_grads(lambda **kw: retention_triton(**kw, form=form, chunk_size=chunk_size), low)
    o_ref, s_ref, grads_ref = run_with_grads(reference, ref_inputs)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o, o_ref, dtype, "o", tol)
    assert_close(s, s_ref, dtype, "final state", tol)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert_close(grad, grads_ref[name], dtype, f"d{name}", tol)


@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_chunked_fp32_matches_recurrent(T):
    """Head dim 24 (padded to 32), chunks of 64: T = 63 / 64 / 65 end inside, on and past a chunk."""
    check_against_reference(make_inputs(T=T), torch.float32, "chunk", 64)


@pytest.mark.parametrize("T", [1, 15, 16, 17])
def test_fused_recurrent_fp32_matches_recurrent(T):
    """Checkpoints every 16 tokens, so T = 15 / 16 / 17 end inside, on and past one (the interpreter runs one
    program step per token: the T = 63 / 64 / 65 cases of this kernel design are in test_triton_rwkv.py)."""
    check_against_reference(make_inputs(T=T), torch.float32, "recurrent", 16)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_recurrent(form, dtype):
    check_against_reference(make_inputs(T=20), dtype, form, 16)


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_split_v_no_initial_state(form):
    """Transposed (non-contiguous) inputs, B = 2, no initial state, K = 8 (< 16), V = 72 over 3 x 32 (recurrent) or
    2 x 64 (chunked) blocks."""
    inputs = make_inputs(B=2, T=11, K=8, V=72, initial_state=False)
    for name in ("q", "k", "v"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    check_against_reference(inputs, torch.float32, form, 8)


def test_strong_decay_is_exact():
    """gamma ~ 1e-9 (log -20) and gamma = 1: no overflow in the chunked decay masks, gradients still match."""
    check_against_reference(make_inputs(T=21, gammas=(math.exp(-20.0), 1.0)), torch.float32, "chunk", 16)


def test_input_checks():
    inputs = make_inputs(T=4)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        retention_triton(**{n: t.double() for n, t in inputs.items()})
    with pytest.raises(ValueError, match="log_decay"):
        retention_triton(**{**inputs, "log_decay": inputs["log_decay"][:1]})
    with pytest.raises(ValueError, match="unknown form"):
        retention_triton(**inputs, form="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_chunked(form, dtype):
    """Real shapes (16 heads x 64) on the GPU against the chunked torch form in fp64."""
    inputs = make_inputs(B=2, T=1000, H=16, K=64, V=64, device="cuda")
    check_against_reference(inputs, dtype, form, 64, reference=retention_chunked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("form", FORMS)
def test_gpu_bf16_long_sequence_is_finite(form):
    """T = 65536 in bf16 with gammas from ~1e-9 to 1 - 1e-4: outputs, final state and all gradients stay finite."""
    gammas = (math.exp(-20.0), 0.5, 0.97, 1 - 1e-4)
    inputs = make_inputs(T=65536, H=4, K=64, V=64, device="cuda", gammas=gammas)
    leaves = {n: t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    o, s = retention_triton(**leaves, form=form, chunk_size=64)
    (o.float().square().mean() + s.float().square().mean()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
