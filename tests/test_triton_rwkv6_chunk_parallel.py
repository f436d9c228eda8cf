"""Chunk-parallel Triton RWKV-6 (kernels/rwkv6/triton_chunk_parallel.py) against the fp64 naive reference: outputs,
final state and every gradient (w_log's, u's and the initial state's included).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small;
odd T ends inside a chunk, K = 24 / 72 and V = 40 are not powers of two (V spans two 32-wide blocks, the second
partial). The GPU tests at the end use real shapes.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_rwkv import check_against_reference, rwkv6_inputs  # noqa: E402
from zoo.kernels.rwkv6 import BACKENDS, rwkv6, rwkv6_chunked, rwkv6_naive  # noqa: E402
from zoo.kernels.rwkv6.triton_chunk_parallel import (  # noqa: E402
    _rwkv6_cp_output_kernel,
    chunk_parallel_tiles,
    rwkv6_chunk_parallel,
)
from zoo.kernels.triton_checks import DEFAULT_TARGET, Launch, Target  # noqa: E402
from triton_testing import require_interpreter  # noqa: E402

require_interpreter(_rwkv6_cp_output_kernel)


def kernel(chunk_size):
    return lambda **kw: rwkv6_chunk_parallel(**kw, chunk_size=chunk_size)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 41])
def test_fp32_matches_naive(T):
    """Chunks of 16: T = 15 / 16 / 17 end inside, on and past the first chunk; T = 41 has three chunks."""
    check_against_reference(kernel(16), rwkv6_naive, rwkv6_inputs(T=T, V=40), torch.float32)


def test_fp32_head_dim_over_64():
    """K = 72 (BK = 128, the gradient kernel's 8 warps); chunk_size 32 still runs chunks of 16."""
    check_against_reference(kernel(32), rwkv6_naive, rwkv6_inputs(T=21, K=72, V=24), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_naive(dtype):
    check_against_reference(kernel(16), rwkv6_naive, rwkv6_inputs(T=37, V=40), dtype)


def test_batch_two_with_initial_state_many_chunks():
    """B = 2 with an initial state, 3 heads, T = 150: ten chunks of 16 through the state passes."""
    check_against_reference(kernel(16), rwkv6_naive, rwkv6_inputs(B=2, T=150, H=3, K=16, V=24), torch.float32)


def test_non_contiguous_batch_two_no_initial_state():
    """Transposed (non-contiguous) inputs, B = 2, no initial state, K = 8 (< 16, padded to 16)."""
    inputs = rwkv6_inputs(B=2, T=23, K=8, V=40, initial_state=False)
    for name in ("r", "k", "v", "w_log"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    check_against_reference(kernel(16), rwkv6_naive, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decays_near_zero_and_one(dtype):
    """w_log from -e^4 (decay ~1e-24) to -e^-6 (decay ~0.998): no exp(-A) is formed, so nothing overflows and every
    gradient still matches."""
    check_against_reference(kernel(16), rwkv6_naive, rwkv6_inputs(T=35, V=24, decay_range=(-6.0, 4.0)), dtype)


def test_backend_name_runs_these_kernels():
    """``rwkv6(..., backend="triton_chunk")`` runs them; ``auto`` still runs torch."""
    inputs = rwkv6_inputs(T=19)
    expected = rwkv6_chunk_parallel(**inputs, chunk_size=16)
    torch.testing.assert_close(rwkv6(**inputs, chunk_size=16, backend="triton_chunk"), expected, rtol=0, atol=0)
    assert BACKENDS.resolve("auto") == "torch"


def test_tiles_and_parallelism():
    """BT = 16 whatever chunk_size, BV <= 32, BLOCK = 64, the same on every target; at B = 1, T = 16k, H = 16,
    K = V = 64 every launch has >= 4 programs per SM of an H100 (528)."""
    t = chunk_parallel_tiles(64, 64, 16, torch.bfloat16, Target(90))
    assert t[:4] == (16, 64, 32, 64) and (t.launch, t.grad_launch, t.pass_launch) == (Launch(4, 1), Launch(8, 1), Launch(2, 1))
    assert t == chunk_parallel_tiles(64, 64, 16, torch.float32, DEFAULT_TARGET)
    assert chunk_parallel_tiles(64, 64, 64, torch.bfloat16, Target(90)) == t
    assert chunk_parallel_tiles(128, 128, 32, torch.bfloat16, Target(80))[:3] == (16, 128, 32)
    T, H = 16384, 16
    per_chunk = triton.cdiv(T, t.BT) * triton.cdiv(64, t.BV) * H
    passes = triton.cdiv(64 * 64, t.BLOCK) * H
    assert min(per_chunk, passes) >= 4 * 132, (per_chunk, passes)


def test_input_checks():
    inputs = rwkv6_inputs(T=4)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        rwkv6_chunk_parallel(**{n: t.double() for n, t in inputs.items()})
    with pytest.raises(ValueError, match="rwkv6_chunk_parallel: u must be"):
        rwkv6_chunk_parallel(**{**inputs, "u": inputs["u"][:1]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_chunked(dtype):
    """Real shapes (16 heads x 64) on the GPU against the chunked torch form in fp64."""
    inputs = rwkv6_inputs(B=2, T=1000, H=16, K=64, V=64, device="cuda")
    check_against_reference(kernel(16), rwkv6_chunked, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_long_sequence_is_finite():
    """T = 65536 in bf16 with decays from ~1e-24 to ~0.998: outputs, final state and all gradients stay finite."""
    inputs = rwkv6_inputs(T=65536, H=4, K=64, V=64, device="cuda", decay_range=(-6.0, 4.0))
    leaves = {n: t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    o, s = rwkv6_chunk_parallel(**leaves, chunk_size=16)
    (o.float().square().mean() + s.float().square().mean()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
