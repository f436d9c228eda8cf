"""Packed documents on a CUDA GPU (no interpreter): every backend that takes ``cu_seqlens`` itself (``varlen`` in its
op's table: zoo's fused-recurrent and chunk-parallel Triton kernels, and fla's / mamba-ssm's when installed) gives
each document's outputs, final state and every gradient (start states' included) as the torch form run on each
document alone in fp64: the ~125M models' heads in bf16 (what training runs) and odd ones in fp32 (head dims 20 / 24
/ 40, three heads), documents of 1000, 1, 37, 2000 and 63 tokens (a one-token document, partial chunks, boundaries
inside chunks). Named to run after the other GPU tests of ``pytest -m gpu`` (benchmarks/gpu_check.py gives that step
a share of its time; these compile every packed kernel variant). On CPU the same kernels are checked in the
interpreter at small sizes (tests/test_packed_ops.py, test_packed_ssd_chunk.py, test_packed_dplr_chunk.py,
test_mamba_ssm_peer.py)."""
import pytest
import torch

from zoo.kernels.backends import AUTO
from zoo.kernels.registry import CALLS_BY_NAME, OPS

LENGTHS = (1000, 1, 37, 2000, 63)
DEVICE = "cuda"
ODD = {"ssd": {"H": 3, "P": 20, "N": 24, "G": 1}}
ODD_HEADS = {"H": 3, "K": 24, "V": 40}
# max |error| / max |reference| per input dtype, as tests/test_triton_chunk_parallel.py's GPU tests (fp32 looser:
# 3,101 tokens and the start states' gradients)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
CASES = [(op, backend) for op, spec in OPS.items() for backend, entry in spec.backends.backends.items()
         if backend not in ("torch", AUTO) and entry.varlen]


def _relative(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max |error| {err:.3g} > {tol} x max |reference| {scale:.3g}"


def _call(op: str, backend: str, inputs: dict, start: torch.Tensor, cu: torch.Tensor, w_o, w_s):
    """``(o, final, grads)`` of one packed call; the loss ``sum(o * w_o) + sum(final * w_s)``; the inputs a peer gives
    no gradient (the registry call's ``frozen``, start states aside) get none."""
    spec = OPS[op]
    call = CALLS_BY_NAME.get(f"{op}/{backend}")
    frozen = set(call.frozen if call is not None else ()) - {"initial_state"}
    leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point() and n not in frozen) for n, t in inputs.items()}
    state = start.detach().clone().requires_grad_()
    o, final = spec.fn(**leaves, initial_state=state, backend=backend, cu_seqlens=cu, **spec.options)
    ((o.double() * w_o).sum() + (final.double() * w_s).sum()).backward()
    return o, final, {**{n: t.grad for n, t in leaves.items() if t.requires_grad}, "initial_state": state.grad}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (on CPU: the interpreter tests named above)")
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, "model"), (torch.float32, "odd")], ids=["bf16-model", "fp32-odd"])
@pytest.mark.parametrize("op,backend", CASES)
def test_gpu_packed_call_equals_each_document_alone(op, backend, dtype, shape):
    spec = OPS[op]
    if not spec.backends.backends[backend].available():
        pytest.skip(f"{spec.backends.backends[backend].package} is not installed")
    dims = spec.models[0] if shape == "model" else ODD.get(op, ODD_HEADS)
    inputs = spec.example(dims, 1, sum(LENGTHS), DEVICE, dtype)
    inputs.pop("initial_state", None)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=DEVICE)
    reference = {n: t.double() for n, t in inputs.items()}  # the same (rounded) values in fp64
    with torch.no_grad():
        o0, final0 = spec.fn(**reference, backend="torch", cu_seqlens=cu, **spec.options)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    start, w_o, w_s = (torch.randn(t.shape, device=DEVICE, generator=gen, dtype=torch.float64) for t in (final0, o0, final0))
    o_ref, final_ref, grads_ref = _call(op, "torch", reference, start * 0.5, cu, w_o, w_s)
    o, final, grads = _call(op, backend, inputs, (start * 0.5).float(), cu, w_o, w_s)
    tol = TOLERANCE[dtype]
    _relative(o, o_ref, tol, "output")
    _relative(final, final_ref, tol, "final states")
    assert grads.keys() <= grads_ref.keys() and "initial_state" in grads
    for name, grad in grads.items():
        _relative(grad, grads_ref[name], tol, f"gradient of {name}")
