"""Chunk-parallel Triton RWKV-7 (kernels/rwkv7/triton_chunk_parallel.py: WY/UT forward, fused-recurrent backward)
against the fp64 naive reference: outputs, final state and every gradient (w_log's, a's, b's and the initial
state's included).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small;
odd T ends inside a chunk, K = 24 / 72 and V = 40 are not powers of two (V spans two 32-wide blocks, the second
partial). The GPU tests at the end use real shapes.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_rwkv import check_against_reference, rwkv7_inputs  # noqa: E402
from zoo.kernels.rwkv7 import BACKENDS, rwkv7, rwkv7_chunked, rwkv7_naive  # noqa: E402
from zoo.kernels.rwkv7.triton_chunk_parallel import (  # noqa: E402
    _rwkv7_cp_output_kernel,
    rwkv7_chunk_parallel,
    rwkv7_chunk_parallel_tiles,
)
from zoo.kernels.triton_checks import DEFAULT_TARGET, Launch, Target  # noqa: E402
from triton_testing import require_interpreter  # noqa: E402

require_interpreter(_rwkv7_cp_output_kernel)


def kernel(chunk_size):
    return lambda **kw: rwkv7_chunk_parallel(**kw, chunk_size=chunk_size)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 41])
def test_fp32_matches_naive(T):
    """Chunks of 16: T = 15 / 16 / 17 end inside, on and past the first chunk; T = 41 has three chunks."""
    check_against_reference(kernel(16), rwkv7_naive, rwkv7_inputs(T=T, V=40), torch.float32)


def test_fp32_head_dim_over_64():
    """K = 72 (BK = 128); chunk_size 32 still runs chunks of 16."""
    check_against_reference(kernel(32), rwkv7_naive, rwkv7_inputs(T=21, K=72, V=24), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_naive(dtype):
    check_against_reference(kernel(16), rwkv7_naive, rwkv7_inputs(T=37, V=40), dtype)


def test_batch_two_with_initial_state_many_chunks():
    """B = 2 with an initial state, 3 heads, T = 150: ten chunks of 16 through the state pass."""
    check_against_reference(kernel(16), rwkv7_naive, rwkv7_inputs(B=2, T=150, H=3, K=16, V=24), torch.float32)


def test_non_contiguous_batch_two_no_initial_state():
    """Transposed (non-contiguous) inputs, B = 2, no initial state, K = 8 (< 16, padded to 16)."""
    inputs = rwkv7_inputs(B=2, T=23, K=8, V=40, initial_state=False)
    for name in ("r", "w_log", "k", "v", "a", "b"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    check_against_reference(kernel(16), rwkv7_naive, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decays_near_zero_and_one(dtype):
    """w_log from -e^4 (decay ~1e-24) to -e^-6 (decay ~0.998): no exp(-A) is formed, so nothing overflows and every
    gradient still matches."""
    check_against_reference(kernel(16), rwkv7_naive, rwkv7_inputs(T=35, V=24, decay_range=(-6.0, 4.0)), dtype)


def test_backend_name_runs_these_kernels():
    """``rwkv7(..., backend="triton_chunk")`` runs them; ``auto`` still runs torch."""
    inputs = rwkv7_inputs(T=19)
    expected = rwkv7_chunk_parallel(**inputs, chunk_size=16)
    torch.testing.assert_close(rwkv7(**inputs, chunk_size=16, backend="triton_chunk"), expected, rtol=0, atol=0)
    assert BACKENDS.resolve("auto") == "torch"


def test_tiles_and_parallelism():
    """BT = 16 whatever chunk_size, BV <= 32, BVP = 16, the same on every target; at B = 1, T = 16k, H = 16,
    K = V = 64 the per-chunk launches have >= 4 programs per SM of an H100 (528); the state pass has 64 (the
    docstring says why)."""
    t = rwkv7_chunk_parallel_tiles(64, 64, 16, torch.bfloat16, Target(90))
    assert t[:4] == (16, 64, 32, 16) and (t.launch, t.pass_launch) == (Launch(4, 1), Launch(4, 1))
    assert t == rwkv7_chunk_parallel_tiles(64, 64, 16, torch.float32, DEFAULT_TARGET)
    assert rwkv7_chunk_parallel_tiles(64, 64, 64, torch.bfloat16, Target(90)) == t
    T, H = 16384, 16
    assert triton.cdiv(T, t.BT) * triton.cdiv(64, t.BV) * H >= 4 * 132
    assert triton.cdiv(64, t.BVP) * H == 64


def test_input_checks():
    inputs = rwkv7_inputs(T=4)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        rwkv7_chunk_parallel(**{n: t.double() if torch.is_tensor(t) else t for n, t in inputs.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_chunked(dtype):
    """Real shapes (16 heads x 64) on the GPU against the chunked torch form in fp64."""
    inputs = rwkv7_inputs(B=2, T=1000, H=16, K=64, V=64, device="cuda")
    check_against_reference(kernel(16), rwkv7_chunked, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_long_sequence_is_finite():
    """T = 65536 in bf16 with decays from ~1e-24 to ~0.998: outputs, final state and all gradients stay finite."""
    inputs = rwkv7_inputs(T=65536, H=4, K=64, V=64, device="cuda", decay_range=(-6.0, 4.0))
    leaves = {n: t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    o, s = rwkv7_chunk_parallel(**leaves, chunk_size=16)
    (o.float().square().mean() + s.float().square().mean()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
