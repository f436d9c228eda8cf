"""Shared by the Triton kernel tests: the interpreter check, fla's interpreter shims, gradients through fixed
cotangents, relative errors."""
import builtins
import contextlib
import sys

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder, TensorHandle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


INTERPRETER_ONLY = ("this test runs Triton kernels on CPU tensors (interpreter-sized, or recording the interpreter's "
                    "launches): a GPU host has no interpreter; tests/test_varlen_gpu.py runs the packed kernels there")


def interpreter_only(backend: str = "triton") -> None:
    """Skip on a GPU host when ``backend`` launches Triton kernels (zoo's or fla's) on this test's CPU tensors."""
    if torch.cuda.is_available() and backend.startswith(("triton", "fla")):
        pytest.skip(INTERPRETER_ONLY)


def require_interpreter(kernel) -> None:
    """On CPU the kernels run only in the Triton interpreter, chosen before triton is imported (tests/conftest.py)."""
    if DEVICE == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 (tests/conftest.py sets it): the CPU kernel tests cannot run")


class _LoopInt(int):
    """A loop index that also answers ``.to(dtype)``, as a compiled kernel's loop variable does."""

    def to(self, dtype, **kwargs):
        return tl.cast(int(self), dtype)


def _range(*args):
    return (_LoopInt(i) for i in builtins.range(*args))


def _gather(src, index, axis):
    return tl.gather(src, index, axis)


@contextlib.contextmanager
def fla_on_cpu():
    """fla's kernels imported and, on CPU, runnable in the Triton interpreter: the autotuner keeps its first config
    (there is no device to time on); ``for i in range(n)`` indices inside fla's kernels are Python ints there, so fla
    modules get a ``range`` whose ints also have ``.to(dtype)``; fla's alias ``gather = tl.gather`` is re-pointed at
    the interpreter's ``tl.gather``."""
    import fla.ops.rwkv6  # noqa: F401
    import fla.ops.rwkv7  # noqa: F401
    import fla.ops.simple_gla  # noqa: F401

    if torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Autotuner, "_bench", lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0])
        for name, module in list(sys.modules.items()):
            if name.startswith("fla.") and module is not None:
                mp.setattr(module, "range", _range, raising=False)
                if getattr(module, "gather", None) is tl.gather:
                    mp.setattr(module, "gather", _gather)
        yield


def exact_float32(handle: TensorHandle) -> np.ndarray:
    """An interpreter tensor's values as fp32 (exact for bf16, stored by the interpreter as its uint16 bits, and fp16)."""
    if handle.dtype.scalar == tl.bfloat16:
        return (handle.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return handle.data.astype(np.float32)


@contextlib.contextmanager
def gpu_operands(target):
    """Launchers choosing their ``tl.dot`` operands for ``target`` (:func:`zoo.kernels.triton_common.operand_dtype`)
    while running in the interpreter, whose own bf16 dot multiplies the uint16 bit patterns (Triton 3.9): here a dot of
    16-bit operands multiplies their exact fp32 values, as tensor cores do (fp32 accumulation). Yields a dict
    ``kernel name -> set of dot operand dtypes`` it saw."""
    from zoo.kernels import triton_common

    seen: dict[str, set] = {}
    running = []
    create_dot = InterpreterBuilder.create_dot
    run = InterpretedFunction.run

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.setdefault(running[-1], set()).add(str(a.dtype.scalar))
        if a.dtype.scalar in (tl.bfloat16, tl.float16):
            product = np.matmul(exact_float32(a), exact_float32(b), dtype=np.float32)
            return TensorHandle(product + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def run_named(self, *args, **kwargs):
        running.append(self.fn.__name__)
        try:
            return run(self, *args, **kwargs)
        finally:
            running.pop()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", dot)
        mp.setattr(InterpretedFunction, "run", run_named)
        for module in [m for m in list(sys.modules.values()) if getattr(m, "launch_target", None) is triton_common.launch_target]:
            mp.setattr(module, "launch_target", lambda device: target)
        yield seen


def assert_relative_error(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected|."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().clamp_min(1e-6).item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def run_with_grads(fn, inputs: dict, seed: int = 1):
    """Call ``fn``, back-propagate fixed random cotangents through output and final state; return all of them."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if torch.is_tensor(v)}
    out, state = fn(**{**inputs, **leaves})
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen).to(out.device)
    g_state = torch.randn(state.shape, generator=gen).to(state.device)
    ((out.double() * g_out).sum() + (state.double() * g_state).sum()).backward()
    return out, state, {k: v.grad for k, v in leaves.items()}


def recording_launches(monkeypatch) -> list[tuple[str, tuple]]:
    """Every interpreted Triton launch from now on (the test's ``monkeypatch`` undoes it), as ``(kernel, grid)``."""
    seen = []
    real = InterpretedFunction.__getitem__

    def record(self, grid):
        seen.append((self.fn.__name__, tuple(grid)))
        return real(self, grid)

    monkeypatch.setattr(InterpretedFunction, "__getitem__", record)
    return seen


def programs_in_reverse(monkeypatch) -> None:
    """The interpreter runs a launch's programs last to first (it runs them one after another, first to last): a
    program that stores outside its own rows (past its document's end into the next chunk's) is then overwritten no
    longer by the right values, so results that depend on the program order show, as a GPU's free order would show
    them. Rewrites the grid loop of Triton's ``GridExecutor.__call__`` (fails if that loop is not the expected one)."""
    import inspect
    import textwrap

    from triton.runtime import interpreter

    source = textwrap.dedent(inspect.getsource(interpreter.GridExecutor.__call__))
    loops = [f"for {v} in range(grid[{i}]):" for i, v in enumerate("xyz")]
    if not all(loop in source for loop in loops):
        raise RuntimeError("Triton's interpreter no longer runs the grid as `for x in range(grid[0])`: update programs_in_reverse")
    for loop, v, i in zip(loops, "xyz", range(3)):
        source = source.replace(loop, f"for {v} in reversed(range(grid[{i}])):")
    namespace: dict = {}
    exec(compile(source, interpreter.__file__, "exec"), vars(interpreter), namespace)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", namespace["__call__"])
