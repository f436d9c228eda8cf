"""The Triton selective-scan step kernel (Mamba-1 decode) against the torch step and the naive reference: odd sizes,
strided inputs, fp32/bf16/fp16, each optional input on and off, the state updated in place token by token, and the
triton backend decoding through it. On CPU it runs in the Triton interpreter (tests/conftest.py)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from zoo.kernels.selective_scan import selective_scan, selective_scan_naive, selective_scan_step  # noqa: E402
from zoo.kernels.selective_scan.triton_step import (  # noqa: E402
    _selective_scan_step_kernel,
    selective_scan_step_triton,
    step_tiles,
)
from triton_testing import DEVICE, assert_relative_error, require_interpreter  # noqa: E402

require_interpreter(_selective_scan_step_kernel)

# max |error| / max |reference|: y is rounded to the input dtype, the state is fp32
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def step_inputs(batch, T, dim, n, strided=False, dtype=torch.float32, seed=0):
    """u, delta, z ``[B, T, D]``, B, C ``[B, T, N]`` in ``dtype`` (with ``strided``: column slices of one projection,
    as the Mamba block's, and a transposed A), A ``[D, N]`` negative, D, delta_bias ``[D]``, initial_state
    ``[B, D, N]`` fp32."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if strided:
        proj = r(batch, T, 3 * dim + 2 * n + 3).to(dtype)  # [B, T, u | delta | z | B | C | pad]
        u, delta, z, B, C, _ = proj.split([dim, dim, dim, n, n, 3], dim=-1)
        A = -torch.exp(r(n, dim) * 0.5).t()  # [D, N] with strides (1, D)
    else:
        u, delta, z, B, C = (r(batch, T, k).to(dtype) for k in (dim, dim, dim, n, n))
        A = -torch.exp(r(dim, n) * 0.5)
    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": r(dim),
              "z": z, "delta_bias": r(dim) * 0.3, "initial_state": r(batch, dim, n)}
    return {k: v.to(DEVICE) for k, v in inputs.items()}


LOW = ("u", "delta", "B", "C", "z")  # the per-token activations (in the tested dtype); parameters and state are fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dim,n", [(37, 5), (19, 48)], ids=["D37-N5", "D19-N48"])
def test_step_kernel_matches_the_torch_step_and_naive(dim, n, strided, dtype):
    """Batch 3; D 37 at N 5 (pads to 8): 16 channels a program, the last block partial; N 48 (pads to 64): 2 channels a
    program, 10 blocks. Every optional input on."""
    cast = step_inputs(3, 1, dim, n, strided, dtype)
    if strided:
        assert not cast["u"].is_contiguous() and not cast["A"].is_contiguous()
    y, state = selective_scan_step_triton(**cast)
    ref = {k: v.double() for k, v in cast.items()}
    for y_ref, state_ref in (selective_scan_step(**ref), selective_scan_naive(**ref)):
        assert y.dtype == dtype and state.dtype == torch.float32 and state.shape == state_ref.shape
        assert_relative_error(y, y_ref, TOLERANCE[dtype], f"y ({dtype})")
        assert_relative_error(state, state_ref, TOLERANCE[torch.float32], "state")


@pytest.mark.parametrize("drop", ["D", "z", "delta_bias", "initial_state", "softplus", "all"])
def test_step_kernel_without_each_optional_input(drop):
    """Each of D, z, delta_bias, the initial state and the softplus off in turn, then all of them (positive delta)."""
    inputs = step_inputs(2, 1, 13, 7)
    inputs["delta"] = inputs["delta"].abs() * 0.5
    names = ("D", "z", "delta_bias", "initial_state") if drop == "all" else (drop,) if drop != "softplus" else ()
    inputs |= {k: None for k in names}
    inputs["delta_softplus"] = drop not in ("softplus", "all")
    y, state = selective_scan_step_triton(**inputs)
    y_ref, state_ref = selective_scan_naive(**{k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()})
    assert_relative_error(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_relative_error(state, state_ref, TOLERANCE[torch.float32], "state")


def test_step_kernel_updates_the_state_in_place_token_by_token():
    """Five tokens through one state buffer (``out_state=initial_state``) equal the naive scan over all five."""
    inputs = step_inputs(2, 5, 21, 16, strided=True)
    state = inputs["initial_state"].clone()
    pointer = state.data_ptr()
    ys = []
    for t in range(5):
        token = {k: v[:, t : t + 1] if k in LOW else v for k, v in inputs.items()}
        y, out = selective_scan_step_triton(**{**token, "initial_state": state, "out_state": state})
        assert out is state and state.data_ptr() == pointer
        ys.append(y)
    y_ref, state_ref = selective_scan_naive(**{k: v.double() for k, v in inputs.items()})
    assert_relative_error(torch.cat(ys, 1), y_ref, TOLERANCE[torch.float32], "y")
    assert_relative_error(state, state_ref, TOLERANCE[torch.float32], "state")


def test_step_kernel_checks_its_inputs():
    inputs = step_inputs(2, 3, 8, 4)
    with pytest.raises(ValueError, match="selective_scan_step_triton: one token at a time, got T=3"):
        selective_scan_step_triton(**inputs)
    token = {k: v[:, :1] if k in LOW else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"out_state must be contiguous float32 \[2, 8, 4\]"):
        selective_scan_step_triton(**token, out_state=torch.zeros(2, 8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        selective_scan_step_triton(**{**token, "u": token["u"].double()})


def test_step_tiles():
    """128 state entries a program at most, one warp per 128, at least one channel."""
    assert step_tiles(2048, 16)[:2] == (8, 16) and step_tiles(2048, 16).launch.num_warps == 1
    assert step_tiles(37, 5)[:2] == (16, 8)
    assert step_tiles(64, 256)[:2] == (1, 256) and step_tiles(64, 256).launch.num_warps == 2


def test_triton_backend_decodes_through_the_step_kernel(monkeypatch):
    """One token without gradients: the step kernel (one launch); with gradients: the recurrent kernels."""
    import zoo.kernels.selective_scan.triton_step as triton_step

    calls = []
    monkeypatch.setattr(triton_step, "selective_scan_step_triton",
                        lambda *a: calls.append(1) or selective_scan_step_triton(*a))
    inputs = {k: v[:, :1] if k in LOW else v for k, v in step_inputs(2, 1, 11, 6).items()}
    with torch.no_grad():
        y, state = selective_scan(**inputs, backend="triton")
    assert calls == [1]
    y_ref, state_ref = selective_scan_naive(**{k: v.double() for k, v in inputs.items()})
    assert_relative_error(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_relative_error(state, state_ref, TOLERANCE[torch.float32], "state")
    selective_scan(**{**inputs, "u": inputs["u"].clone().requires_grad_()}, backend="triton")[0].sum().backward()
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_kernel_replays_in_a_cuda_graph_at_real_shapes(dtype):
    """Mamba-130M's d_inner 1536, N 16, batch 4: one step captured (state in place), replayed for 8 tokens, equals
    the naive scan over them. Not yet run on a GPU: a failure prints the measured error."""
    inputs = step_inputs(4, 8, 1536, 16, strided=True, dtype=dtype)
    state = inputs["initial_state"].clone()
    token = {k: (v[:, :1].clone() if k in LOW else v) for k, v in inputs.items()}  # static input buffers
    selective_scan_step_triton(**{**token, "initial_state": state.clone(), "out_state": state.clone()})  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _ = selective_scan_step_triton(**{**token, "initial_state": state, "out_state": state})
    state.copy_(inputs["initial_state"])
    ys = []
    for t in range(8):
        for k in LOW:
            token[k].copy_(inputs[k][:, t : t + 1])
        graph.replay()
        ys.append(y.clone())
    y_ref, state_ref = selective_scan_naive(**{k: v.double() for k, v in inputs.items()})
    assert_relative_error(torch.cat(ys, 1), y_ref, TOLERANCE[dtype], f"y ({dtype})")
    assert_relative_error(state, state_ref, 2e-4, "state")
