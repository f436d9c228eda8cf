"""Triton selective scan (Mamba-1) and SSD (Mamba-2) kernels against the fp64 naive references, forward and backward.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported), so the shapes are tiny; the GPU tests at the end use real shapes.
"""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from zoo.kernels.selective_scan import selective_scan_chunked, selective_scan_naive, selective_scan_triton  # noqa: E402
from zoo.kernels.selective_scan.triton_scan import _selective_scan_fwd_kernel  # noqa: E402
from zoo.kernels.ssd import ssd_chunked, ssd_naive, ssd_scan, ssd_step, ssd_triton  # noqa: E402
from zoo.kernels.ssd.triton_step import ssd_step_triton  # noqa: E402
from triton_testing import DEVICE, assert_relative_error, require_interpreter, run_with_grads  # noqa: E402

require_interpreter(_selective_scan_fwd_kernel)

# max |error| / max |reference| per input dtype (outputs and gradients are rounded to the input dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# The -m gpu tests at real shapes and long sequences: bf16 as the retention and RWKV GPU tests; fp32 with room for
# T = 4097 of fp32 atomics. Not yet measured on a GPU: a failure prints the measured error.
GPU_TOLERANCE = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# (dtype, T) of the GPU comparisons; fp16 (issue 26: no GPU test ran it) at T = 1000 only
GPU_CASES = [(torch.float32, 1000), (torch.float32, 4097), (torch.bfloat16, 1000), (torch.bfloat16, 4097), (torch.float16, 1000)]


def assert_close(actual, expected, dtype, what, tolerance=TOLERANCE):
    assert_relative_error(actual, expected, tolerance[dtype], f"{what} ({dtype})")


def check_against_reference(fn, ref_fn, inputs, dtype, tolerance=TOLERANCE):
    """Kernel on ``inputs`` in ``dtype`` vs the reference in fp64 on the same (rounded) values."""
    low = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ref_inputs = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    y, h, grads = run_with_grads(fn, low)
    y_ref, h_ref, grads_ref = run_with_grads(ref_fn, ref_inputs)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert_close(y, y_ref, dtype, "y", tolerance)
    assert_close(h, h_ref, dtype, "final state", tolerance)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert_close(grad, grads_ref[name], dtype, f"d{name}", tolerance)


# ---------------------------------------------------------------- Mamba-1 selective scan


def mamba_inputs(batch, T, dim, n, device=DEVICE, full=True):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = {
        "u": r(batch, T, dim),
        "delta": r(batch, T, dim) * 0.5 - 1.0,
        "A": -torch.exp(r(dim, n) * 0.5),
        "B": r(batch, T, n),
        "C": r(batch, T, n),
    }
    if full:
        inputs |= {"D": r(dim), "z": r(batch, T, dim), "delta_bias": r(dim) * 0.3, "initial_state": r(batch, dim, n)}
    return {k: v.to(device) for k, v in inputs.items()}


def mamba_reference(chunk_size=None, **kw):
    return selective_scan_naive(**kw)


@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_selective_scan_triton_matches_naive_fp32(T):
    """d_inner 24 and N 12 are not powers of two; checkpoints every 16 steps leave a partial tail chunk."""
    inputs = mamba_inputs(1, T, 24, 12) | {"chunk_size": 16}
    check_against_reference(selective_scan_triton, mamba_reference, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_scan_triton_low_precision(dtype):
    inputs = mamba_inputs(1, 33, 24, 12) | {"chunk_size": 8}
    check_against_reference(selective_scan_triton, mamba_reference, inputs, dtype)


def test_selective_scan_triton_non_contiguous_without_options():
    """Strided views, no D / z / bias / initial state, no softplus; N 16 splits d_inner 80 into 40 blocks of 2."""
    base = mamba_inputs(2, 10, 80, 16, full=False)
    inputs = {
        "u": base["u"].transpose(0, 1).contiguous().transpose(0, 1),
        "delta": F.softplus(base["delta"]).transpose(1, 2).contiguous().transpose(1, 2),
        "A": base["A"].t().contiguous().t(),
        "B": base["B"].transpose(1, 2).contiguous().transpose(1, 2),
        "C": base["C"],
        "delta_softplus": False,
    }
    assert not inputs["u"].is_contiguous() and not inputs["A"].is_contiguous() and not inputs["B"].is_contiguous()
    check_against_reference(selective_scan_triton, mamba_reference, inputs, torch.float32)


def test_selective_scan_triton_state_carries_across_calls():
    full = mamba_inputs(1, 20, 8, 4)
    y_full, h_full = selective_scan_triton(**full)
    first = {k: (v[:, :12] if v.dim() == 3 and v.shape[1] == 20 else v) for k, v in full.items()}
    second = {k: (v[:, 12:] if v.dim() == 3 and v.shape[1] == 20 else v) for k, v in full.items()}
    y1, h1 = selective_scan_triton(**first)
    y2, h2 = selective_scan_triton(**{**second, "initial_state": h1})
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h_full, rtol=1e-5, atol=1e-5)


def test_selective_scan_triton_checks_inputs():
    inputs = mamba_inputs(1, 4, 8, 4)
    with pytest.raises(ValueError, match=r"selective_scan_triton: B must be \[B, T, N\] = \[1, 4, 4\], got \[1, 4, 3\]"):
        selective_scan_triton(**{**inputs, "B": inputs["B"][..., :3]})
    with pytest.raises(ValueError, match="selective_scan_triton: inputs must be float32, bfloat16 or float16"):
        selective_scan_triton(**{k: v.double() for k, v in inputs.items()})


# ---------------------------------------------------------------- Mamba-2 SSD


def ssd_inputs(batch, T, heads, groups, p, n, device=DEVICE, full=True):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = {
        "x": r(batch, T, heads, p),
        "dt": r(batch, T, heads) - 1.0,
        "A": -torch.exp(r(heads) * 0.5),
        "B": r(batch, T, groups, n),
        "C": r(batch, T, groups, n),
    }
    if full:
        inputs |= {"D": r(heads), "dt_bias": r(heads) * 0.3, "initial_state": r(batch, heads, p, n)}
    return {k: v.to(device) for k, v in inputs.items()}


def ssd_reference(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")), initial_state=None, chunk_size=64):
    """``ssd_scan``'s dt preprocessing, then the naive recurrence."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    return ssd_naive(x, dt.clamp(*dt_limit), A, B, C, D, initial_state)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_ssd_triton_matches_naive_fp32(T):
    """Chunks of 16 (partial tail chunk); head dim 24 and N 12 are not powers of two; dt_limit clamps some steps."""
    inputs = ssd_inputs(1, T, 1, 1, 24, 12) | {"chunk_size": 16, "dt_limit": (0.05, 0.6)}
    check_against_reference(ssd_triton, ssd_reference, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_triton_low_precision(dtype):
    inputs = ssd_inputs(1, 33, 1, 1, 24, 12) | {"chunk_size": 8}
    check_against_reference(ssd_triton, ssd_reference, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ssd_triton_chunk_parallel_batches_groups_and_blocks(dtype):
    """Batch 2, 4 heads in 2 groups, initial state in / final state out, T 45 = one full chunk of 32 and a tail,
    d_state 20 in blocks of 16 + 4: fp32 splits head dim 24 into channel blocks 16 + 8 (exact products), bf16 / fp16
    take it in one block of 32; every gradient (dB, dC, ddt summed atomically over heads and blocks) against the
    naive recurrence."""
    inputs = ssd_inputs(2, 45, 4, 2, 24, 20) | {"chunk_size": 32}
    check_against_reference(ssd_triton, ssd_reference, inputs, dtype)


def test_ssd_triton_non_contiguous_groups_and_channel_blocks():
    """Strided views, 4 heads in 2 groups, no D / bias / initial state, no softplus; N 128 in 8 blocks of 16, head dim
    24 in fp32 blocks of 16 + 8."""
    base = ssd_inputs(1, 6, 4, 2, 24, 128, full=False)
    inputs = {
        "x": base["x"].transpose(2, 3).contiguous().transpose(2, 3),
        "dt": F.softplus(base["dt"]).transpose(1, 2).contiguous().transpose(1, 2),
        "A": base["A"],
        "B": base["B"].transpose(0, 1).contiguous().transpose(0, 1),
        "C": base["C"],
        "dt_softplus": False,
        "chunk_size": 4,
    }
    assert not inputs["x"].is_contiguous() and not inputs["dt"].is_contiguous()
    check_against_reference(ssd_triton, ssd_reference, inputs, torch.float32)


def test_ssd_triton_output_gradient_only_and_state_carries_across_calls():
    """Backward from y alone (no final-state gradient); two calls chained through the state equal one call."""
    inputs = ssd_inputs(1, 40, 2, 1, 24, 12) | {"chunk_size": 16}
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if torch.is_tensor(v)}
    ref_leaves = {k: v.double().clone().requires_grad_() for k, v in inputs.items() if torch.is_tensor(v)}
    ssd_triton(**{**inputs, **leaves})[0].sum().backward()
    ssd_reference(**{**inputs, **ref_leaves})[0].sum().backward()
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref_leaves[name].grad, torch.float32, f"d{name}")
    y_full, h_full = ssd_triton(**inputs)
    first = {k: (v[:, :23] if torch.is_tensor(v) and v.dim() >= 3 and v.shape[1] == 40 else v) for k, v in inputs.items()}
    second = {k: (v[:, 23:] if torch.is_tensor(v) and v.dim() >= 3 and v.shape[1] == 40 else v) for k, v in inputs.items()}
    y1, h1 = ssd_triton(**first)
    y2, h2 = ssd_triton(**{**second, "initial_state": h1})
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h_full, rtol=1e-5, atol=1e-5)


def ssd_step_reference(inputs):
    """The torch step (fp64) on the dt that ``ssd_scan`` computes."""
    dt = F.softplus(inputs["dt"].double() + inputs["dt_bias"].double()).clamp(*inputs["dt_limit"])
    state = inputs.get("initial_state")
    return ssd_step(inputs["x"].double(), dt, inputs["A"].double(), inputs["B"].double(), inputs["C"].double(),
                    inputs["D"].double(), None if state is None else state.double())


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [12, 200], ids=["N12-one-channel-block", "N200-two-channel-blocks"])
def test_ssd_step_kernel_matches_the_torch_step(n, dtype, with_state):
    """Batch 3, 6 heads in 3 groups, head dim 24 (N 200 pads to 256: blocks of 16 + 8 head channels), dt_limit clamps."""
    inputs = ssd_inputs(3, 1, 6, 3, 24, n) | {"dt_limit": (0.05, 0.6)}
    if not with_state:
        inputs["initial_state"] = None
    cast = {k: v.to(dtype) if k in ("x", "B", "C") else v for k, v in inputs.items()}
    y, state = ssd_step_triton(**cast)
    y_ref, state_ref = ssd_step_reference({k: v.to(dtype).float() if k in ("x", "B", "C") else v for k, v in inputs.items()})
    assert y.dtype == dtype and state.dtype == torch.float32 and state.shape == state_ref.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(state, state_ref, torch.float32, "state")


def test_ssd_step_kernel_updates_the_state_in_place_token_by_token():
    inputs = ssd_inputs(2, 5, 4, 2, 24, 12) | {"dt_limit": (0.0, float("inf"))}
    state = inputs["initial_state"].clone()
    ys = []
    for t in range(5):
        token = {k: v[:, t : t + 1] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}
        y, out = ssd_step_triton(**{**token, "initial_state": state, "out_state": state})
        assert out is state
        ys.append(y)
    y_ref, state_ref = ssd_reference(**{k: v.double() for k, v in inputs.items() if torch.is_tensor(v)})
    assert_close(torch.cat(ys, 1), y_ref, torch.float32, "y")
    assert_close(state, state_ref, torch.float32, "state")
    with pytest.raises(ValueError, match="ssd_step_triton: one token at a time, got T=5"):
        ssd_step_triton(**inputs)


def test_ssd_triton_backend_decodes_through_the_step_kernel(monkeypatch):
    """One token without gradients: the step kernel (one launch); with gradients: the chunk kernels."""
    import zoo.kernels.ssd.triton_step as triton_step

    calls = []
    monkeypatch.setattr(triton_step, "ssd_step_triton", lambda *a: calls.append(1) or ssd_step_triton(*a))
    inputs = ssd_inputs(2, 1, 4, 2, 24, 12)
    with torch.no_grad():
        y, state = ssd_scan(**inputs, backend="triton_chunk")
    assert calls == [1]
    y_ref, state_ref = ssd_reference(**{k: v.double() for k, v in inputs.items()})
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(state, state_ref, torch.float32, "state")
    ssd_scan(**{**inputs, "x": inputs["x"].clone().requires_grad_()}, backend="triton_chunk")[0].sum().backward()
    assert calls == [1]


def test_ssd_triton_checks_inputs():
    inputs = ssd_inputs(1, 4, 4, 2, 8, 4)
    with pytest.raises(ValueError, match=r"ssd_triton: B must be \[B, T, G, N\] with G dividing H=4"):
        ssd_triton(**{**inputs, "B": inputs["B"][:, :, :1].expand(1, 4, 3, 4)})
    with pytest.raises(ValueError, match="ssd_triton: inputs must be float32, bfloat16 or float16"):
        ssd_triton(**{k: v.double() for k, v in inputs.items()})


# ---------------------------------------------------------------- GPU: real shapes, long sequences

@pytest.mark.parametrize("dtype,T", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels at real shapes need a CUDA GPU")
def test_selective_scan_triton_gpu_matches_chunked(T, dtype):
    inputs = mamba_inputs(2, T, 512, 16, device="cuda")
    check_against_reference(selective_scan_triton, lambda chunk_size=None, **kw: selective_scan_chunked(**kw), inputs, dtype, tolerance=GPU_TOLERANCE)


@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("dtype,T", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels at real shapes need a CUDA GPU")
def test_ssd_triton_gpu_matches_chunked(T, dtype, n):
    """Chunks of 64, d_state in 4 or 8 blocks of 16; bf16 runs tf32 tensor-core products, fp32 exact ones."""
    inputs = ssd_inputs(2, T, 8, 2, 64, n, device="cuda") | {"dt_limit": (0.0, 2.0)}

    def chunked(x, dt, A, B, C, D=None, dt_bias=None, dt_limit=(0.0, float("inf")), initial_state=None):
        return ssd_chunked(x, F.softplus(dt + dt_bias).clamp(*dt_limit), A, B, C, D, initial_state)

    check_against_reference(ssd_triton, chunked, inputs, dtype, tolerance=GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels at real shapes need a CUDA GPU")
def test_ssd_triton_gpu_long_context_batch_1():
    """The long-context shape of issue 16 (B = 1, T = 16k, 16 heads of 64, d_state 128, bf16): 256 chunks of 64
    passed through the state-passing kernels; outputs, final state and every gradient against the chunked form."""
    inputs = ssd_inputs(1, 16384, 16, 1, 64, 128, device="cuda") | {"chunk_size": 64}

    def chunked(x, dt, A, B, C, D=None, dt_bias=None, initial_state=None, chunk_size=64):
        return ssd_chunked(x, F.softplus(dt + dt_bias), A, B, C, D, initial_state, chunk_size)

    check_against_reference(ssd_triton, chunked, inputs, torch.bfloat16, tolerance=GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels at real shapes need a CUDA GPU")
def test_triton_scans_bf16_long_sequence_finite():
    """T = 65536 in bf16 with decays near 0 (large dt) and near 1 (tiny dt): outputs, states and grads finite."""
    T = 65536
    m = mamba_inputs(1, T, 64, 16, device="cuda")
    m["delta"] = torch.where(torch.rand_like(m["delta"]) < 0.5, torch.full_like(m["delta"], 8.0), torch.full_like(m["delta"], -12.0))
    y, h, grads = run_with_grads(selective_scan_triton, {k: v.bfloat16() for k, v in m.items()})
    s = ssd_inputs(1, T, 4, 1, 64, 128, device="cuda")
    s["dt"] = torch.where(torch.rand_like(s["dt"]) < 0.5, torch.full_like(s["dt"], 8.0), torch.full_like(s["dt"], -12.0))
    y2, h2, grads2 = run_with_grads(ssd_triton, {k: v.bfloat16() for k, v in s.items()})
    for name, t in {"y": y, "h": h, "y_ssd": y2, "h_ssd": h2, **grads, **{f"ssd_{k}": v for k, v in grads2.items()}}.items():
        assert torch.isfinite(t.float()).all(), f"{name} has non-finite values"


# ---------------------------------------------------------------- benchmark script


def test_kernel_benchmark_refuses_the_gpu_shapes_on_cpu(tmp_path, capsys):
    """The full benchmark sizes need a GPU; on CPU only --smoke runs (tests/test_benchmarks.py times it)."""
    from benchmarks import kernels

    if DEVICE != "cpu":
        pytest.skip("a CUDA device runs the full sizes")
    with pytest.raises(SystemExit) as exit_info:
        kernels.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "kernels: error: the benchmark shapes need a CUDA GPU" in capsys.readouterr().err
