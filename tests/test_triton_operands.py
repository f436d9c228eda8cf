"""bf16 / fp16 operands of the ``tl.dot`` products of 16-bit inputs alone (issue 26, finding 7), checked in the Triton
interpreter.

On a GPU target the kernels feed the dots whose operands are both loaded from bf16 / fp16 tensors (``q k^T``,
``do v^T``, ``C B^T``) in that dtype (:func:`zoo.kernels.triton_common.operand_dtype`): the same exact products as
fp32 operands, so the results must not change by a single bit, while every other dot keeps fp32 operands. Each
Triton call of the registry runs here twice on the same inputs and tiles, once as on CPU (fp32 operands) and once with
the launchers choosing the GPU operands (ROCm's target: the default tiles; tensor-core dots emulated exactly); a cast
of a value that is not a 16-bit input (a decayed, scaled or accumulated tile) changes the results and fails.
"""
import importlib
import inspect
import pkgutil
import sys

import pytest
import torch

pytest.importorskip("triton")

from triton_testing import gpu_operands  # noqa: E402
from zoo.kernels.registry import TRITON_CALLS  # noqa: E402
from zoo.kernels.triton_common import ROCM_TARGET  # noqa: E402

# The kernels with a dot of 16-bit inputs alone; every other kernel's dots take fp32 operands.
SIXTEEN_BIT_DOTS = {
    "_retention_chunk_fwd_kernel", "_retention_chunk_bwd_kernel",
    "_retention_cp_output_kernel", "_retention_cp_grad_kernel",
    "_ssd_chunk_scan_kernel", "_ssd_chunk_bwd_kernel",
}
T = 21  # odd: a partial last chunk


def kernel_sources() -> dict[str, str]:
    """Every ``@triton.jit`` kernel of zoo.kernels by name: its source."""
    import zoo.kernels

    for module in pkgutil.walk_packages(zoo.kernels.__path__, "zoo.kernels."):
        if module.name.rsplit(".", 1)[-1].startswith("triton_"):
            importlib.import_module(module.name)
    return {name: inspect.getsource(getattr(obj, "fn", obj)) for module_name, module in list(sys.modules.items())
            if module_name.startswith("zoo.kernels.") for name, obj in vars(module).items()
            if name.endswith("_kernel") and hasattr(obj, "fn")}


def with_dots(call) -> bool:
    return any("tl.dot(" in kernel_sources().get(k.name, "") for k in call.launches)


def run(call, inputs):
    """The call's outputs and every input's gradient (backward from fixed cotangents), as fp32."""
    run, leaves = call.prepare(inputs)
    if call.step:
        with torch.no_grad():
            return [o.float() for o in run() if o is not None]
    out = run()
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o.dtype) for o in out]
    torch.autograd.backward(list(out), cotangents)
    return [o.detach().float() for o in out] + [leaf.grad.float() for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# the packed-document calls (batch 1, T > 1001) run the same kernels' IS_VARLEN variants: tests/test_packed_ops.py
@pytest.mark.parametrize("call", [c for c in TRITON_CALLS if with_dots(c) and not c.documents], ids=lambda c: c.name)
def test_16bit_operands_change_nothing(call, dtype):
    """The calls with a ``tl.dot`` (the chunked kernels); K = 24 and V = 40 are padded to the dot tiles."""
    dims = {**call.op.smoke, **({"K": 24, "V": 40} if "K" in call.op.smoke else {})}
    inputs = call.op.example(dims, 1, 1 if call.step else T, "cpu", dtype)
    expected = run(call, inputs)
    with gpu_operands(ROCM_TARGET) as seen:
        actual = run(call, inputs)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"{call.name} {dtype}: result {i} differs by {(a - e).abs().max().item():.3g}"
    sixteen = {kernel for kernel, dtypes in seen.items() if dtypes & {"bf16", "fp16"}}
    assert sixteen == {k.name for k in call.launches} & set(SIXTEEN_BIT_DOTS), seen
