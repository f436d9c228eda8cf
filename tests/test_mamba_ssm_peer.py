"""zoo's ``mamba_ssm`` backends through mamba-ssm's real Triton kernels (its Python and Triton parts, installed without
its CUDA extensions: ``.ci/run`` puts them in ``.peers/mamba_ssm``), run in the Triton interpreter on CPU, against zoo's
torch forms in fp64: the SSD scan from a start state (``mamba_chunk_scan_combined``, every gradient), packed documents
in one call with mamba-ssm's ``seq_idx`` (each document's outputs, final state and gradients as that document run
alone), and Mamba-1's one-token decode step (``selective_state_update``). mamba-ssm's ``selective_scan_fn`` is a CUDA
extension: not run here."""
import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from triton.runtime.autotuner import Autotuner

from zoo.errors import BackendUnavailableError
from zoo.kernels import selective_scan as ss_pkg
from zoo.kernels.selective_scan import mamba_ssm_backend as ss_adapter
from zoo.kernels.ssd import BACKENDS, mamba_ssm_backend, ssd_scan
from zoo.layers.registry import MIXERS

PEERS = Path(__file__).resolve().parents[1] / ".peers" / "mamba_ssm"
BOUNDS = [0, 5, 6, 18, 37]  # documents of 5, 1, 12 and 19 tokens: shorter than a chunk of 16, boundaries inside chunks
CHUNK = 16


@pytest.fixture
def mamba_ssm_kernels(monkeypatch):
    """mamba-ssm importable; on CPU its kernels run in the interpreter: its CUDA extension ``selective_scan_cuda``
    (imported by ``mamba_ssm/__init__`` only) is an empty module, ``torch.cuda.device`` a no-op, the SM count a
    constant (it sizes a grid), the autotuner keeps its first config (nothing to time on), and zoo's adapter takes CPU
    tensors. The mamba_ssm modules are dropped afterwards, so no later test finds the package."""
    if importlib.util.find_spec("mamba_ssm") is None:
        if not PEERS.is_dir():
            pytest.skip(f"mamba-ssm is not installed and {PEERS} is missing (.ci/run installs its Python and Triton parts there)")
        monkeypatch.syspath_prepend(str(PEERS))
    before = set(sys.modules)
    if not torch.cuda.is_available():
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=132))
        monkeypatch.setattr(Autotuner, "_bench", lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0])
        monkeypatch.setattr(mamba_ssm_backend, "on_cuda", lambda tensor: True)
        monkeypatch.setattr(ss_adapter, "on_cuda", lambda tensor: True)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("mamba_ssm"):
            del sys.modules[name]


def _inputs(T: int = BOUNDS[-1], H: int = 4, P: int = 8, G: int = 2, N: int = 8) -> list[torch.Tensor]:
    """x [1, T, H, P], dt [1, T, H], A [H], B and C [1, T, G, N], D [H], dt_bias [H] (fp64, leaves)."""
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(1, T, H, P, generator=g), torch.randn(1, T, H, generator=g)
    A = -torch.rand(H, generator=g) - 0.5
    B, C = torch.randn(1, T, G, N, generator=g), torch.randn(1, T, G, N, generator=g)
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    return [t.double().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


def _scan(args, backend, initial_state=None):
    x, dt, A, B, C, D, dt_bias = args
    return ssd_scan(x, dt, A, B, C, D, dt_bias, True, (0.0, float("inf")), initial_state, CHUNK, backend=backend,
                    cu_seqlens=torch.tensor(BOUNDS))


def _fp32(args):
    return [t.detach().float().requires_grad_() for t in args]


def test_the_ssd_scan_from_a_start_state_equals_the_torch_form(mamba_ssm_kernels):
    """One row of two sequences from start states (no documents), T not a multiple of the chunk: outputs, final states
    and every gradient, the start state's included."""
    x, dt, A, B, C, D, dt_bias = reference = _inputs(T=29)
    x2, dt2, B2, C2 = (torch.cat([t.detach(), t.detach().flip(1)]).requires_grad_() for t in (x, dt, B, C))  # batch 2
    reference = [x2, dt2, A, B2, C2, D, dt_bias]
    start = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y_ref, state_ref = ssd_scan(*reference[:5], D, dt_bias, True, (0.0, float("inf")), start, CHUNK, backend="torch")
    dy, dstate = torch.randn_like(y_ref), torch.randn_like(state_ref)
    ((y_ref * dy).sum() + (state_ref * dstate).sum()).backward()
    args, start32 = _fp32(reference), start.detach().float().requires_grad_()
    y, state = ssd_scan(*args[:5], args[5], args[6], True, (0.0, float("inf")), start32, CHUNK, backend="mamba_ssm")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), state_ref, rtol=1e-4, atol=1e-4)
    ((y * dy.float()).sum() + (state * dstate.float()).sum()).backward()
    for name, got, want in zip(("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"), [*args, start32], [*reference, start]):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4 * want.grad.abs().max().item(), msg=name)


def test_the_mamba1_decode_step_equals_the_torch_step(mamba_ssm_kernels):
    """Mamba-1's one-token step from a state through ``selective_state_update`` (z gate, D, delta bias, softplus)."""
    g = torch.Generator().manual_seed(1)
    batch, channels, n = 3, 12, 6
    u, delta, z = (torch.randn(batch, 1, channels, generator=g) for _ in range(3))
    A = -torch.rand(channels, n, generator=g) - 0.1
    B, C = torch.randn(batch, 1, n, generator=g), torch.randn(batch, 1, n, generator=g)
    D, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    state = torch.randn(batch, channels, n, generator=g)
    want = ss_pkg.selective_scan(u, delta, A, B, C, D, z, bias, True, state.clone(), backend="torch")
    got = ss_pkg.selective_scan(u, delta, A, B, C, D, z, bias, True, state.clone(), backend="mamba_ssm")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_documents_run_in_one_call_with_seq_idx(mamba_ssm_kernels, monkeypatch):
    """Outputs, every document's final state and every gradient (a cotangent on the outputs and on the last
    document's final state) equal zoo's torch form in fp64 document by document; the per-document loop never runs."""
    reference = _inputs()
    y_ref, states_ref = _scan(reference, "torch")
    dy, dstate = torch.randn_like(y_ref), torch.randn_like(states_ref[-1])
    ((y_ref * dy).sum() + (states_ref[-1] * dstate).sum()).backward()
    monkeypatch.setattr(BACKENDS, "per_document", lambda *a: pytest.fail("mamba_ssm ran one call per document"))
    args = _fp32(reference)
    y, states = _scan(args, "mamba_ssm")
    assert states.shape == (len(BOUNDS) - 1, 4, 8, 8) and states.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states.double(), states_ref, rtol=1e-4, atol=1e-4)
    ((y * dy.float()).sum() + (states[-1] * dstate.float()).sum()).backward()
    for name, got, want in zip(("x", "dt", "A", "B", "C", "D", "dt_bias"), args, reference):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4 * want.grad.abs().max().item(), msg=name)


def test_a_gradient_through_an_earlier_documents_state_is_refused(mamba_ssm_kernels):
    """mamba-ssm's ``seq_idx`` backward has one ``dfinal_states`` per row (the last document's): a gradient through
    another document's final state is an error naming the backends that take it, never a silently dropped term."""
    args = _fp32(_inputs())
    y, states = _scan(args, "mamba_ssm")
    with pytest.raises(BackendUnavailableError, match="last document's final state only"):
        (y.sum() + states[0].sum()).backward()


def test_packed_documents_with_start_states_run_one_call_each(mamba_ssm_kernels, monkeypatch):
    """Start states: mamba-ssm's ``seq_idx`` path starts only the row's first document from a state, so each document
    runs alone (equal to the torch form)."""
    reference = _inputs()
    start = torch.randn(len(BOUNDS) - 1, 4, 8, 8, dtype=torch.float64)
    y_ref, states_ref = _scan(reference, "torch", start)
    calls = []
    per_document = BACKENDS.per_document
    monkeypatch.setattr(BACKENDS, "per_document", lambda *a: calls.append(1) or per_document(*a))
    y, states = _scan(_fp32(reference), "mamba_ssm", start.float())
    assert calls == [1]
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states.double(), states_ref.detach(), rtol=1e-4, atol=1e-4)


def test_the_mamba2_block_packs_documents_through_mamba_ssm(mamba_ssm_kernels):
    """The Mamba-2 block with ``backend: mamba_ssm``: a packed call equals the torch backend's (which equals each
    document run alone: tests/test_packing.py), outputs, the last document's state and the weights' gradients."""
    from test_backends import build
    from zoo.layers.base import Documents

    torch.manual_seed(0)
    reference = build("mamba2", backend="torch")
    fast = build("mamba2", backend="mamba_ssm")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(1, BOUNDS[-1], 48)
    documents = Documents.from_bounds(BOUNDS, x.device)
    y_ref, state_ref = reference(x, None, {}, documents)
    y, state = fast(x, None, {}, documents)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.ssm, state_ref.ssm, rtol=1e-4, atol=1e-4)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3 * q.grad.abs().max().item(), msg=name)
