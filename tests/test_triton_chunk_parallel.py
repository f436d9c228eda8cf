"""The chunk-parallel Triton kernels (``kernels/<op>/triton_chunk_parallel.py``: retention, RWKV-6, and RWKV-7's WY/UT
forward and backward) against the fp64 naive references: outputs, final state and every
gradient (decays', bonus', the initial state's included).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small;
odd T ends inside a chunk, K = 24 / 72 and V = 40 are not powers of two (V spans two 32-wide blocks, the second
partial). The GPU tests at the end use real shapes.
"""
import importlib
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_retention import make_inputs as retention_inputs  # noqa: E402
from test_triton_rwkv import rwkv6_inputs, rwkv7_inputs  # noqa: E402
from triton_testing import assert_relative_error, gpu_operands, require_interpreter, run_with_grads  # noqa: E402
from zoo.kernels import dplr_delta_rule as dplr, retention, rwkv6  # noqa: E402
from zoo.kernels.retention import triton_chunk_parallel as retention_cp  # noqa: E402
from zoo.kernels.rwkv6 import triton_chunk_parallel as rwkv6_cp  # noqa: E402
from zoo.kernels.dplr_delta_rule import triton_chunk_parallel as dplr_cp  # noqa: E402
from zoo.kernels.triton_common import DEFAULT_TARGET, Launch, Target  # noqa: E402

require_interpreter(rwkv6_cp._rwkv6_cp_output_kernel)

# max |error| / max |reference| per input dtype (outputs and gradients are rounded to the input dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Op:
    kernel: Callable  # the chunk-parallel entry point
    naive: Callable  # the fp64 reference on CPU
    chunked: Callable  # the reference of the GPU tests
    inputs: Callable  # (B, T, H, K, V, initial_state, device, **decays) -> the kernel's keyword arguments
    dispatcher: Callable  # the op's public function, with ``backend``
    out_in_input_dtype: bool  # o in the inputs' dtype (retention) or fp32 (RWKV)
    extreme: dict  # decays near 0 and 1
    tiles: Callable


OPS = {
    "retention": Op(retention_cp.retention_chunk_parallel, retention.retention_recurrent, retention.retention_chunked,
                    retention_inputs, retention.retention, True, {"gammas": (math.exp(-20.0), 1.0)}, retention_cp.chunk_parallel_tiles),
    "rwkv6": Op(rwkv6_cp.rwkv6_chunk_parallel, rwkv6.rwkv6_naive, rwkv6.rwkv6_chunked, rwkv6_inputs, rwkv6.rwkv6, False,
                {"decay_range": (-6.0, 4.0)}, rwkv6_cp.chunk_parallel_tiles),
    "dplr_delta_rule": Op(dplr_cp.dplr_delta_rule_chunk_parallel, dplr.dplr_delta_rule_naive, dplr.dplr_delta_rule_chunked, rwkv7_inputs, dplr.dplr_delta_rule, False,
                {"decay_range": (-6.0, 4.0)}, dplr_cp.dplr_chunk_parallel_tiles),
}


def check(op: str, inputs: dict, dtype: torch.dtype, chunk_size: int, reference: Callable | None = None):
    """The kernel on ``inputs`` in ``dtype`` vs the reference (the naive form) in fp64 on the same (rounded) values."""
    spec = OPS[op]
    low = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ref_inputs = {k: v.to(dtype).double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    o, s, grads = run_with_grads(lambda **kw: spec.kernel(**kw, chunk_size=chunk_size), low)
    o_ref, s_ref, grads_ref = run_with_grads(reference or spec.naive, ref_inputs)
    tol = TOLERANCE[dtype]
    assert o.dtype == (dtype if spec.out_in_input_dtype else torch.float32) and s.dtype == torch.float32
    assert_relative_error(o, o_ref, tol, f"o ({dtype})")
    assert_relative_error(s, s_ref, tol, f"final state ({dtype})")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert_relative_error(grad, grads_ref[name], tol, f"d{name} ({dtype})")


@pytest.mark.parametrize("op,T", [(op, T) for op in OPS for T in (1, 15, 16, 17)] + [("retention", 50), ("rwkv6", 41), ("dplr_delta_rule", 41)])
def test_fp32_matches_naive(op, T):
    """Chunks of 16: T = 15 / 16 / 17 end inside, on and past the first chunk; T = 41 / 50 have three / four chunks."""
    check(op, OPS[op].inputs(T=T, V=40), torch.float32, 16)


# (op, T, K, V, chunk_size): chunk_size 64 (retention: BT = 32 at K = 24; T = 130: five chunks, the last of 2 tokens);
# K = 72 (BK = 128; RWKV-6: the gradient kernel's 8 warps); RWKV's chunk_size 32 still runs chunks of 16.
WIDE = [("retention", 130, 24, 40, 64), ("retention", 45, 72, 24, 64), ("rwkv6", 21, 72, 24, 32), ("dplr_delta_rule", 21, 72, 24, 32)]


@pytest.mark.parametrize("op,T,K,V,chunk_size", WIDE)
def test_fp32_long_chunks_and_head_dim_over_64(op, T, K, V, chunk_size):
    check(op, OPS[op].inputs(T=T, K=K, V=V), torch.float32, chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_half_precision_matches_naive(op, dtype):
    check(op, OPS[op].inputs(T=37, V=40), dtype, 16)


def test_retention_h100_tiles_match_the_reference(monkeypatch):
    """The H100 tiles of bf16 inputs (BT = 32, BV = 16, which the interpreter's own tiles never use) and its bf16
    operands of the products of inputs alone (emulated exactly) run in the interpreter: T = 70 is two full chunks and
    a 6-token one."""
    used = []

    def spy(*args):
        used.append(OPS["retention"].tiles(*args))
        return used[-1]

    monkeypatch.setattr(retention_cp, "chunk_parallel_tiles", spy)
    with gpu_operands(Target(90)) as seen:
        check("retention", retention_inputs(T=70, V=40), torch.bfloat16, 64)
    assert [t[:3:2] for t in used] == [(32, 16), (32, 16)]  # forward and backward
    assert "bf16" in seen["_retention_cp_output_kernel"] and "bf16" in seen["_retention_cp_grad_kernel"]


@pytest.mark.parametrize("op", OPS)
def test_batch_two_with_initial_state_many_chunks(op):
    """B = 2 with an initial state, 3 heads, T = 150: ten chunks of 16 through the state passes."""
    decays = {"gammas": (0.9, 0.5, 0.99)} if op == "retention" else {}
    check(op, OPS[op].inputs(B=2, T=150, H=3, K=16, V=24, **decays), torch.float32, 16)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_batch_two_no_initial_state(op):
    """Transposed (non-contiguous) ``[B, T, H, *]`` inputs, B = 2, no initial state, K = 8 (< 16, padded to 16)."""
    inputs = OPS[op].inputs(B=2, T=23, K=8, V=40, initial_state=False)
    sequences = [name for name, t in inputs.items() if torch.is_tensor(t) and t.dim() == 4]
    assert len(sequences) == {"retention": 3, "rwkv6": 4, "dplr_delta_rule": 6}[op]
    for name in sequences:
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    check(op, inputs, torch.float32, 16)


@pytest.mark.parametrize("op,T,V,dtype", [("retention", 41, 16, torch.float32)]
                         + [(op, 35, 24, dtype) for op in ("rwkv6", "dplr_delta_rule") for dtype in (torch.float32, torch.bfloat16)])
def test_decays_near_zero_and_one(op, T, V, dtype):
    """Decays ~1e-9 and exactly 1 (retention), from ~1e-24 to ~0.998 (RWKV): every decay is exp of a non-positive
    number and no exp(-A) is formed, so nothing overflows and every gradient still matches."""
    check(op, OPS[op].inputs(T=T, V=V, **OPS[op].extreme), dtype, 16)


@pytest.mark.parametrize("op", OPS)
def test_backend_name_runs_these_kernels(op):
    """``backend="triton_chunk"`` runs them (retention: for any ``form``); ``auto`` still runs torch."""
    spec = OPS[op]
    inputs = spec.inputs(T=19)
    expected = spec.kernel(**inputs, chunk_size=16)
    forms = [{"form": "chunk"}, {"form": "recurrent"}] if op == "retention" else [{}]
    for form in forms:
        torch.testing.assert_close(spec.dispatcher(**inputs, **form, chunk_size=16, backend="triton_chunk"), expected, rtol=0, atol=0)
    assert importlib.import_module(spec.dispatcher.__module__).BACKENDS.resolve("auto") == "torch"


def test_retention_tiles():
    """BT follows chunk_size up to the spill-free maximum of the target (32 at K <= 64 for fp32 inputs, and for bf16 /
    fp16 ones on sm_90 with BV = 16), BV <= 32, BLOCK = 64."""
    tiles = OPS["retention"].tiles
    t = tiles(64, 64, 64, torch.bfloat16, Target(90))
    assert t[:4] == (32, 64, 16, 64) and t.launch == t.grad_launch == Launch(8, 1) and t.pass_launch == Launch(2, 1)
    assert tiles(64, 64, 64, torch.float16, Target(90)) == t
    assert tiles(64, 128, 64, torch.float32, Target(90))[:3] == (32, 64, 32)
    assert tiles(64, 128, 64, torch.bfloat16, Target(80))[:3] == (16, 64, 32)
    assert tiles(64, 128, 64, torch.float32, Target(86))[:3] == (32, 64, 32)
    assert tiles(128, 256, 64, torch.bfloat16, Target(90))[:3] == (16, 128, 32)
    assert tiles(64, 64, 64, torch.bfloat16, DEFAULT_TARGET) == tiles(64, 64, 64, torch.bfloat16, Target(89))
    assert tiles(64, 64, 16, torch.bfloat16, Target(90)).BT == 16  # a smaller chunk_size is kept
    assert tiles(8, 8, 5, torch.float32, DEFAULT_TARGET)[:3] == (16, 16, 16)


def test_rwkv_tiles():
    """BT = 16 whatever chunk_size, BV <= 32, the same on every target; RWKV-6: BLOCK = 64, RWKV-7: BVP = 16."""
    t = OPS["rwkv6"].tiles(64, 64, 16, torch.bfloat16, Target(90))
    assert t[:4] == (16, 64, 32, 64) and (t.launch, t.grad_launch, t.pass_launch) == (Launch(4, 1), Launch(8, 1), Launch(2, 1))
    assert t == OPS["rwkv6"].tiles(64, 64, 16, torch.float32, DEFAULT_TARGET)
    assert OPS["rwkv6"].tiles(64, 64, 64, torch.bfloat16, Target(90)) == t
    assert OPS["rwkv6"].tiles(128, 128, 32, torch.bfloat16, Target(80))[:3] == (16, 128, 32)
    t = OPS["dplr_delta_rule"].tiles(64, 64, 16, torch.bfloat16, Target(90))
    assert t[:4] == (16, 64, 32, 16) and (t.launch, t.pass_launch) == (Launch(4, 1), Launch(4, 1))
    assert t == OPS["dplr_delta_rule"].tiles(64, 64, 16, torch.float32, DEFAULT_TARGET)
    assert OPS["dplr_delta_rule"].tiles(64, 64, 64, torch.bfloat16, Target(90)) == t


# A wrong shape of the op's own extra input, and the error naming it.
BAD_SHAPE = {"retention": ("log_decay", "retention_chunk_parallel: log_decay"), "rwkv6": ("u", "rwkv6_chunk_parallel: u must be")}


@pytest.mark.parametrize("op", OPS)
def test_input_checks(op):
    inputs = OPS[op].inputs(T=4)
    with pytest.raises(ValueError, match="inputs must be float32, bfloat16 or float16"):
        OPS[op].kernel(**{n: t.double() if torch.is_tensor(t) else t for n, t in inputs.items()})
    if op in BAD_SHAPE:
        name, message = BAD_SHAPE[op]
        with pytest.raises(ValueError, match=message):
            OPS[op].kernel(**{**inputs, name: inputs[name][:1]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_gpu_matches_chunked(op, dtype):
    """Real shapes (16 heads x 64; retention V = 128 as RetNet's) on the GPU against the chunked torch form in fp64."""
    inputs = OPS[op].inputs(B=2, T=1000, H=16, K=64, V=128 if op == "retention" else 64, device="cuda")
    check(op, inputs, dtype, 64 if op == "retention" else 16, reference=OPS[op].chunked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", OPS)
def test_gpu_bf16_long_sequence_is_finite(op):
    """T = 65536 in bf16 with decays from ~1e-9 (RWKV: ~1e-24) to nearly 1: outputs, final state and all gradients
    stay finite."""
    decays = {"gammas": (math.exp(-20.0), 0.5, 0.97, 1 - 1e-4)} if op == "retention" else OPS[op].extreme
    inputs = OPS[op].inputs(T=65536, H=4, K=64, V=64, device="cuda", **decays)
    leaves = {n: t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    o, s = OPS[op].kernel(**leaves, chunk_size=64 if op == "retention" else 16)
    (o.float().square().mean() + s.float().square().mean()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"


def test_interpreter_tests_run_on_the_gpu_when_there_is_one(monkeypatch):
    """Issue 26, finding 9: with ``torch.cuda.is_available()`` faked True (nothing is launched), conftest leaves the
    interpreter off, the test device is cuda, and the input builders of every interpreter test file (odd T, K = 24 /
    72, V = 40, non-contiguous and K < 16 cases included) send each tensor there, so a plain ``pytest`` on a GPU host
    runs them all on the GPU instead of failing with "CPU tensors need the Triton interpreter"."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    def load(name):  # a fresh copy of tests/<name>.py, imported under the faked answer
        spec = importlib.util.spec_from_file_location(f"_gpu_host_{name}", Path(__file__).parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    load("conftest")
    assert "TRITON_INTERPRET" not in os.environ
    testing = load("triton_testing")
    assert testing.DEVICE == "cuda"
    monkeypatch.setitem(sys.modules, "triton_testing", testing)
    files = {name: load(name) for name in ("test_triton_retention", "test_triton_rwkv", "test_triton_scan",
                                           "test_triton_chunk_parallel_blocks", "test_triton_memory")}
    assert {name: m.DEVICE for name, m in files.items()} == dict.fromkeys(files, "cuda")
    sent = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: sent.append(str(args[0] if args else kwargs["device"])) or self)
    builders = [lambda: files["test_triton_retention"].make_inputs(B=2, T=11, K=8, V=72),
                lambda: files["test_triton_rwkv"].rwkv6_inputs(B=2, T=9, V=40),
                lambda: files["test_triton_rwkv"].rwkv7_inputs(T=65, K=72),
                lambda: files["test_triton_scan"].mamba_inputs(2, 13, 24, 5),
                lambda: files["test_triton_scan"].ssd_inputs(2, 13, 3, 1, 8, 4)]
    for build in builders:
        sent.clear()
        tensors = [t for t in build().values() if torch.is_tensor(t)]
        assert tensors and sent == ["cuda"] * len(tensors)
