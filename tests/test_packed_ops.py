"""Packed documents in the op contract (``cu_seqlens``, fla's convention): for every op of the registry, the two
delta-rule parametrisations and every backend that runs here, a packed call gives each document's outputs, final
state and gradients as that document run alone (issue 28). Documents shorter than a chunk, of one token, and
boundaries inside a chunk; a start state per document. fla's kernels take ``cu_seqlens`` themselves (one launch over
the packed tokens: a real check of fla's varlen path in the interpreter); the other backends run once per document."""
import inspect

import pytest
import torch

from zoo.kernels.backends import AUTO
from zoo.kernels.registry import OPS
from zoo.kernels.rwkv7 import GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_rule, kda_rule

LENGTHS = (5, 1, 19, 12)  # T = 37: one token, shorter than a chunk of 8, a boundary inside the chunks 0-7, 16-23, 24-31
CHUNK = 8
TOL = {"native": 1e-4, "per_document": 1e-6}  # fla in the interpreter (its own chunking); else the same calls


def _delta_inputs(per_channel: bool):
    def inputs(dims, batch, T, device, dtype):
        H, K, V = dims["H"], dims["K"], dims["V"]
        g = -torch.exp(torch.randn(batch, T, H, *((K,) if per_channel else ())) - 1.0)
        return {"q": torch.randn(batch, T, H, K, dtype=dtype), "k": torch.nn.functional.normalize(torch.randn(batch, T, H, K), dim=-1).to(dtype),
                "v": torch.randn(batch, T, H, V, dtype=dtype), "g": g, "beta": torch.rand(batch, T, H)}
    return inputs


# name -> (public function, backend table, input builder, small dims)
CASES = {name: (op.fn, op.backends, op.inputs, op.smoke) for name, op in OPS.items()}
CASES["gated_delta_rule"] = (gated_delta_rule, GATED_DELTA_BACKENDS, _delta_inputs(False), {"H": 2, "K": 8, "V": 6})
CASES["kda"] = (kda_rule, KDA_BACKENDS, _delta_inputs(True), {"H": 2, "K": 8, "V": 6})


def _runnable(table) -> list[str]:
    return [name for name in table.names() if name != AUTO and table.backends[name].available() and name != "mamba_ssm"]


# From given start states every backend; from zero states torch's and fla's (native).
PARAMS = [pytest.param(op, backend, with_state, id=f"{op}-{backend}-{'start-states' if with_state else 'zero-states'}")
          for op, (_, table, _, _) in CASES.items() for backend in _runnable(table)
          for with_state in (True, False) if with_state or backend in ("torch", "fla")]


def _example(op: str) -> dict:
    fn, table, build, dims = CASES[op]
    torch.manual_seed(0)
    args = build(dims, 1, sum(LENGTHS), torch.device("cpu"), torch.float32)
    args.pop("initial_state", None)
    return args


def _token_names(op: str) -> set[str]:
    """The per-token arguments, read from the table's layout and the function's signature (in the same order)."""
    fn, table, _, _ = CASES[op]
    names = list(inspect.signature(fn).parameters)[:len(table.layout)]
    return {n for n, kind in zip(names, table.layout) if kind == "t"}


def _run(op: str, backend: str, args: dict, state, cu_seqlens=None):
    fn = CASES[op][0]
    options = {"chunk_size": CHUNK} if "chunk_size" in inspect.signature(fn).parameters else {}
    return fn(**args, initial_state=state, backend=backend, cu_seqlens=cu_seqlens, **options)


@pytest.fixture
def shims(request):
    """On CPU fla's kernels run in the interpreter with the shims of ``triton_testing.fla_on_cpu`` (forward and
    backward); other backends need none."""
    if request.node.callspec.params.get("backend") != "fla":
        yield
        return
    from triton_testing import fla_on_cpu

    with fla_on_cpu():
        yield


def _with_grad(args: dict, frozen: set[str]) -> dict:
    return {n: t.detach().clone().requires_grad_(n not in frozen) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for n, t in args.items()}


@pytest.mark.parametrize("op,backend,with_state", PARAMS)
def test_packed_call_equals_each_document_alone(op, backend, with_state, shims):
    fn, table, _, _ = CASES[op]
    frozen = {"log_decay"} if (op, backend) == ("retention", "fla") else set()  # fla gives it no gradient (refused)
    base = _example(op)
    tokens = _token_names(op)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    state_shape = _run(op, "torch", base, None)[1].shape[1:]
    s0 = torch.randn(len(LENGTHS), *state_shape)

    packed_args = _with_grad(base, frozen)
    packed_s0 = s0.clone().requires_grad_(True) if with_state else None
    o, final = _run(op, backend, packed_args, packed_s0, cu)
    w_o, w_s = torch.randn_like(o), torch.randn_like(final)
    ((o * w_o).sum() + (final * w_s).sum()).backward()

    alone_args = _with_grad(base, frozen)
    alone_s0 = s0.clone().requires_grad_(True) if with_state else None
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc = {n: t[:, s:e] if n in tokens else t for n, t in alone_args.items()}
        o_i, f_i = _run(op, backend, doc, None if alone_s0 is None else alone_s0[i:i + 1])
        outs.append(o_i)
        finals.append(f_i)
    o_ref, final_ref = torch.cat(outs, 1), torch.cat(finals, 0)
    ((o_ref * w_o).sum() + (final_ref * w_s).sum()).backward()

    tol = TOL["native" if table.backends[table.resolve(backend)].varlen and backend == "fla" else "per_document"]
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(final, final_ref, atol=tol, rtol=tol)
    for name, t in packed_args.items():
        if isinstance(t, torch.Tensor) and t.grad is not None:
            torch.testing.assert_close(t.grad, alone_args[name].grad, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")
    if with_state:
        torch.testing.assert_close(packed_s0.grad, alone_s0.grad, atol=tol, rtol=tol, msg=lambda m: f"d initial_state: {m}")


@pytest.mark.parametrize("op", list(CASES))
def test_packed_documents_do_not_see_each_other(op):
    """The torch backend's packed call differs from one unpacked call over the same tokens (the leak it prevents)."""
    base = _example(op)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    o_packed = _run(op, "torch", base, None, cu)[0]
    o_joined = _run(op, "torch", base, None)[0]
    first = LENGTHS[0]
    torch.testing.assert_close(o_packed[:, :first], o_joined[:, :first])
    assert (o_packed[:, first:] - o_joined[:, first:]).abs().max() > 1e-3


@pytest.mark.parametrize("cu,message", [
    (torch.tensor([0, 5, 30]), r"rise strictly from 0 to T = 37"),
    (torch.tensor([0, 5, 5, 37]), r"no empty document"),
    (torch.tensor([1, 37]), r"rise strictly from 0"),
    (torch.tensor([0.0, 37.0]), r"1-D int32/int64 tensor"),
    (torch.tensor([[0, 37]]), r"1-D int32/int64 tensor"),
])
def test_bad_cu_seqlens_are_refused_by_name(cu, message):
    with pytest.raises(ValueError, match=message):
        _run("rwkv6", "torch", _example("rwkv6"), None, cu)


def test_packed_call_needs_a_batch_of_one_and_a_state_per_document():
    fn, table, build, dims = CASES["rwkv6"]
    two = build(dims, 2, 10, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"rwkv6: packed documents \(cu_seqlens\) take a batch of one"):
        _run("rwkv6", "torch", two, None, torch.tensor([0, 4, 10]))
    one = _example("rwkv6")
    state = torch.zeros(1, dims["H"], dims["K"], dims["V"])
    with pytest.raises(ValueError, match=r"rwkv6: initial_state must hold one state per document \(\[N = 2"):
        _run("rwkv6", "torch", one, state, torch.tensor([0, 4, 37]))


def test_every_table_layout_matches_its_functions_signature():
    """The layout letters line up with the public function's leading parameters: ``t`` on tensors with a time axis,
    ``s`` on ``initial_state``."""
    for op, (fn, table, _, _) in CASES.items():
        names = list(inspect.signature(fn).parameters)[:len(table.layout)]
        assert names[table.layout.index("s")] == "initial_state", op
        example = _example(op)
        for name, kind in zip(names, table.layout):
            if kind == "t":
                assert example[name].shape[:2] == (1, sum(LENGTHS)), (op, name)


class NoReadBack:
    """Any tensor read back to the host (``tolist``, ``item``, ``bool``, ``int``) fails inside this context."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(self, *args, **kwargs):
            raise AssertionError("a tensor was read back to the host (a device sync on a GPU)")

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("op,backend", [(op, b) for op, (_, table, _, _) in CASES.items() for b in _runnable(table)
                                        if b in ("torch", "fla")])  # the Triton backends share torch's per-document loop
def test_host_bounds_give_the_same_call_without_reading_the_tensor(op, backend, shims):
    """``cu_seqlens`` as a tensor (read once), as ints or as a ``CuSeqlens`` (host bounds beside the tensor, what the
    blocks pass): the same outputs and states; with host bounds no tensor is read back during the per-document
    calls (fla gets ``cu_seqlens_cpu`` built from them)."""
    from zoo.kernels.backends import CuSeqlens

    bounds = (0, *torch.tensor(LENGTHS).cumsum(0).tolist())
    args = _example(op)
    if (op, backend) == ("retention", "fla"):
        args["log_decay"] = args["log_decay"].detach()
    with torch.no_grad():
        expected = _run(op, backend, args, None, torch.tensor(bounds))
        for cu in (list(bounds), CuSeqlens(bounds, torch.tensor(bounds))):
            if backend == "torch":
                with NoReadBack():
                    got = _run(op, backend, args, None, cu)
            else:
                got = _run(op, backend, args, None, cu)
            for a, e in zip(got, expected, strict=True):
                torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_one_document_reads_the_tensor_once(monkeypatch):
    """A tensor ``cu_seqlens`` is read to the host once per op call (shape checks and the per-document loop share it)."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    cu = torch.tensor(bounds)
    reads.clear()
    _run("rwkv6", "torch", _example("rwkv6"), None, cu)
    assert reads == [cu.shape]
