"""Chunk-parallel Triton retention (kernels/retention/triton_chunk_parallel.py) against the fp64 recurrent reference
(``naive.py``): outputs, final state and every gradient (log_decay's and the initial state's included).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small;
odd T ends inside a chunk, K = 24 / 72 and V = 40 are not powers of two (V spans two 32-wide blocks, the second
partial). The GPU tests at the end use real shapes.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_retention import make_inputs  # noqa: E402
from triton_testing import assert_relative_error, require_interpreter, run_with_grads  # noqa: E402
from zoo.kernels.retention import retention, retention_chunked, retention_recurrent  # noqa: E402
from zoo.kernels.retention import triton_chunk_parallel  # noqa: E402
from zoo.kernels.retention.triton_chunk_parallel import (  # noqa: E402
    _retention_cp_output_kernel,
    chunk_parallel_tiles,
    retention_chunk_parallel,
)
from zoo.kernels.triton_checks import DEFAULT_TARGET, Launch, Target  # noqa: E402

require_interpreter(_retention_cp_output_kernel)

# max |error| / max |reference| per input dtype (outputs and gradients are rounded to the input dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check(inputs, dtype, chunk_size, reference=retention_recurrent):
    """Kernels on ``inputs`` in ``dtype`` vs ``reference`` in fp64 on the same (rounded) values."""
    low = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ref_inputs = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    o, s, grads = run_with_grads(lambda **kw: retention_chunk_parallel(**kw, chunk_size=chunk_size), low)
    o_ref, s_ref, grads_ref = run_with_grads(reference, ref_inputs)
    tol = TOLERANCE[dtype]
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_relative_error(o, o_ref, tol, f"o ({dtype})")
    assert_relative_error(s, s_ref, tol, f"final state ({dtype})")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert_relative_error(grad, grads_ref[name], tol, f"d{name} ({dtype})")


@pytest.mark.parametrize("T", [1, 15, 16, 17, 50])
def test_fp32_matches_recurrent(T):
    """Chunks of 16: T = 15 / 16 / 17 end inside, on and past the first chunk; T = 50 has four chunks."""
    check(make_inputs(T=T, V=40), torch.float32, 16)


def test_fp32_chunk_64_and_head_dim_over_64():
    """chunk_size 64 (BT = 32 at K = 24; T = 130: five chunks, the last of 2 tokens) and K = 72 (BK = 128, BT = 16)."""
    check(make_inputs(T=130, K=24, V=40), torch.float32, 64)
    check(make_inputs(T=45, K=72, V=24), torch.float32, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_recurrent(dtype):
    check(make_inputs(T=37, V=40), dtype, 16)


def test_h100_tiles_match_the_reference(monkeypatch):
    """The H100 tiles of bf16 inputs (BT = 64, which the interpreter's own tiles never use) run in the interpreter:
    T = 70 is a full chunk and a 6-token one."""
    monkeypatch.setattr(triton_chunk_parallel, "launch_target", lambda device: Target(90))
    used = []

    def spy(*args):
        used.append(chunk_parallel_tiles(*args))
        return used[-1]

    monkeypatch.setattr(triton_chunk_parallel, "chunk_parallel_tiles", spy)
    check(make_inputs(T=70, V=40), torch.bfloat16, 64)
    assert [t.BT for t in used] == [64, 64]  # forward and backward


def test_batch_two_with_initial_state_many_chunks():
    """B = 2 with an initial state, 3 heads, T = 150: ten chunks of 16 through the state passes."""
    check(make_inputs(B=2, T=150, H=3, K=16, V=24, gammas=(0.9, 0.5, 0.99)), torch.float32, 16)


def test_non_contiguous_batch_two_no_initial_state():
    """Transposed (non-contiguous) inputs, B = 2, no initial state, K = 8 (< 16, padded to 16)."""
    inputs = make_inputs(B=2, T=23, K=8, V=40, initial_state=False)
    for name in ("q", "k", "v"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    check(inputs, torch.float32, 16)


def test_strong_and_no_decay_are_exact():
    """gamma ~ 1e-9 (log -20) and gamma = 1: every decay is exp of a non-positive number, gradients still match."""
    check(make_inputs(T=41, gammas=(math.exp(-20.0), 1.0)), torch.float32, 16)


def test_backend_name_runs_these_kernels():
    """``retention(..., backend="triton_chunk")`` runs them for any ``form``; ``auto`` still runs torch."""
    inputs = make_inputs(T=19)
    expected = retention_chunk_parallel(**inputs, chunk_size=16)
    for form in ("chunk", "recurrent"):
        got = retention(**inputs, form=form, chunk_size=16, backend="triton_chunk")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    from zoo.kernels.retention import BACKENDS

    assert BACKENDS.resolve("auto") == "torch"


def test_tiles_and_parallelism():
    """BT follows chunk_size up to the spill-free maximum of the target (64 only for bf16 / fp16 on sm_90 at K <= 64),
    BV <= 32, BLOCK = 64; at B = 1, T = 16k, H = 16, K = V = 64 every launch has >= 4 programs per SM of an H100."""
    t = chunk_parallel_tiles(64, 64, 64, torch.bfloat16, Target(90))
    assert t[:4] == (64, 64, 32, 64) and t.launch == Launch(8, 1) and t.pass_launch == Launch(2, 1)
    assert chunk_parallel_tiles(64, 64, 64, torch.float16, Target(90)) == t
    assert chunk_parallel_tiles(64, 128, 64, torch.float32, Target(90))[:3] == (32, 64, 32)
    assert chunk_parallel_tiles(64, 128, 64, torch.bfloat16, Target(80))[:3] == (16, 64, 32)
    assert chunk_parallel_tiles(64, 128, 64, torch.float32, Target(86))[:3] == (32, 64, 32)
    assert chunk_parallel_tiles(128, 256, 64, torch.bfloat16, Target(90))[:3] == (16, 128, 32)
    assert chunk_parallel_tiles(64, 64, 64, torch.bfloat16, DEFAULT_TARGET) == chunk_parallel_tiles(64, 64, 64, torch.bfloat16, Target(89))
    assert chunk_parallel_tiles(64, 64, 16, torch.bfloat16, Target(90)).BT == 16  # a smaller chunk_size is kept
    assert chunk_parallel_tiles(8, 8, 5, torch.float32, DEFAULT_TARGET)[:3] == (16, 16, 16)
    T, H = 16384, 16
    per_chunk = triton.cdiv(T, t.BT) * triton.cdiv(64, t.BV) * H
    passes = triton.cdiv(64 * 64, t.BLOCK) * H
    assert min(per_chunk, passes) >= 4 * 132, (per_chunk, passes)


def test_input_checks():
    inputs = make_inputs(T=4)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        retention_chunk_parallel(**{n: t.double() for n, t in inputs.items()})
    with pytest.raises(ValueError, match="retention_chunk_parallel: log_decay"):
        retention_chunk_parallel(**{**inputs, "log_decay": inputs["log_decay"][:1]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_chunked(dtype):
    """Real shapes (16 heads x 64, V = 128 as RetNet's) on the GPU against the chunked torch form in fp64."""
    inputs = make_inputs(B=2, T=1000, H=16, K=64, V=128, device="cuda")
    check(inputs, dtype, 64, reference=retention_chunked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_long_sequence_is_finite():
    """T = 65536 in bf16 with gammas from ~1e-9 to 1 - 1e-4: outputs, final state and all gradients stay finite."""
    gammas = (math.exp(-20.0), 0.5, 0.97, 1 - 1e-4)
    inputs = make_inputs(T=65536, H=4, K=64, V=64, device="cuda", gammas=gammas)
    leaves = {n: t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    o, s = retention_chunk_parallel(**leaves, chunk_size=64)
    (o.float().square().mean() + s.float().square().mean()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
