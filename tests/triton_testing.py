"""Shared by the Triton kernel tests: the interpreter check, gradients through fixed cotangents, relative errors."""
import torch
from triton.runtime.interpreter import InterpretedFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def require_interpreter(kernel) -> None:
    """On CPU the kernels run only in the Triton interpreter, chosen before triton is imported (tests/conftest.py)."""
    if DEVICE == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 (tests/conftest.py sets it): the CPU kernel tests cannot run")


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
