"""Packed documents in the op contract (``cu_seqlens``, fla's convention): for every op of the registry, the two
delta-rule parametrisations and every backend that runs here, a packed call gives each document's outputs, final
state and gradients as that document run alone (issue 28). Documents shorter than a chunk, of one token, and
boundaries inside a chunk; a start state per document. fla's kernels take ``cu_seqlens`` themselves (one launch over
the packed tokens: a real check of fla's varlen path in the interpreter), and so do zoo's fused-recurrent Triton
kernels (``triton_recurrent`` of RWKV-6, RWKV-7 and retention: one launch, a program per document and head) and the
chunk-parallel ones (``triton_chunk`` of retention, RWKV-6, SSD and the generalized delta rule: their one-launch checks
are here and in tests/test_packed_ssd_chunk.py, tests/test_packed_dplr_chunk.py); the other backends run once per
document (mamba_ssm's ``seq_idx`` path: tests/test_mamba_ssm_peer.py)."""
import importlib
import inspect

import pytest
import torch

from triton_testing import interpreter_only, recording_launches
from zoo.kernels.backends import AUTO, CuSeqlens
from zoo.kernels.registry import OPS
from zoo.kernels.dplr_delta_rule import GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_rule, kda_rule

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
    interpreter_only(backend)
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
                                        if b in ("torch", "fla")])  # the other Triton backends share torch's per-document loop
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


# ---------------------------------------------------------------- the fused-recurrent Triton kernels, varlen-native

RECURRENT = ("rwkv6", "dplr_delta_rule", "retention")
ODD = {"H": 3, "K": 24, "V": 40}  # K padded to 32 (BK), V in two blocks of 32 (the second partly masked)
TRITON_TOL = {torch.float32: TOL["native"], torch.bfloat16: 3e-2}  # bf16: max |error| / max |reference|, as in test_triton_rwkv.py


def _odd_example(op: str, dtype) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The op's arguments at :data:`ODD` over the packed :data:`LENGTHS` (activations in ``dtype``, decays and ``u``
    fp32 as the layers pass them), a start state per document and ``cu_seqlens``."""
    _, _, build, _ = CASES[op]
    torch.manual_seed(1)
    args = build(ODD, 1, sum(LENGTHS), torch.device("cpu"), dtype)
    args.pop("initial_state", None)
    s0 = torch.randn(len(LENGTHS), ODD["H"], ODD["K"], ODD["V"])
    return args, s0, torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])


def _packed_with_grads(op: str, backend: str, args: dict, s0, cu, w_o, w_s, to=None):
    """``(o, final, grads)`` of the packed call (``to``: each tensor cast first, e.g. fp64 for the reference), the loss
    ``sum(o * w_o) + sum(final * w_s)``; ``grads`` by name, ``initial_state`` included, in the inputs' dtypes."""
    leaves = {n: (t.to(to) if to is not None else t).detach().clone().requires_grad_() for n, t in args.items()}
    state = None if s0 is None else (s0.to(to) if to is not None else s0).detach().clone().requires_grad_()
    o, final = _run(op, backend, leaves, state, cu)
    ((o.float() * w_o).sum() + (final.float() * w_s).sum()).backward()
    return o, final, {**{n: t.grad for n, t in leaves.items()}, **({} if state is None else {"initial_state": state.grad})}


def _alone_with_grads(op: str, backend: str, args: dict, s0, cu, w_o, w_s, to=None):
    """The same as :func:`_packed_with_grads`, each document run alone (its own call, its own start state)."""
    tokens = _token_names(op)
    leaves = {n: (t.to(to) if to is not None else t).detach().clone().requires_grad_() for n, t in args.items()}
    state = None if s0 is None else (s0.to(to) if to is not None else s0).detach().clone().requires_grad_()
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, f_i = _run(op, backend, {n: t[:, s:e] if n in tokens else t for n, t in leaves.items()},
                        None if state is None else state[i:i + 1])
        outs.append(o_i)
        finals.append(f_i)
    o, final = torch.cat(outs, 1), torch.cat(finals, 0)
    ((o.float() * w_o).sum() + (final.float() * w_s).sum()).backward()
    return o, final, {**{n: t.grad for n, t in leaves.items()}, **({} if state is None else {"initial_state": state.grad})}


def _assert_relative(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max |error| {err:.3g} > {tol} x max |reference| {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", RECURRENT)
def test_triton_recurrent_packed_matches_each_document_in_torch(op, dtype):
    """One varlen launch over documents of 5, 1, 19 and 12 tokens (checkpoints every 8: a document shorter than a
    chunk, one of a single token, boundaries inside chunks), head dims K = 24, V = 40, H = 3, a start state each:
    outputs, final states and the gradients of every input (``u`` / ``log_decay`` and the start states included)
    equal each document run alone by the torch backend in fp64 on the same values. fp32: within :data:`TOL`'s native
    tolerance; bf16 (gradients rounded to bf16): within 3e-2 of the largest reference value."""
    args, s0, cu = _odd_example(op, dtype)
    torch.manual_seed(2)
    o_shape = (1, sum(LENGTHS), ODD["H"], ODD["V"])
    w_o, w_s = torch.randn(o_shape), torch.randn(s0.shape)
    o, final, grads = _packed_with_grads(op, "triton_recurrent", args, s0, cu, w_o, w_s)
    o_ref, final_ref, grads_ref = _alone_with_grads(op, "torch", args, s0, cu, w_o.double(), w_s.double(), to=torch.float64)
    assert final.shape == s0.shape and o.shape == o_shape
    tol = TRITON_TOL[dtype]
    checks = {"o": (o, o_ref), "final state": (final, final_ref),
              **{f"d{n}": (g, grads_ref[n]) for n, g in grads.items()}}
    for what, (got, want) in checks.items():
        assert got is not None and want is not None, what
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m: f"{op} {what}: {m}")
        else:
            _assert_relative(got, want, tol, f"{op} {what}")
    for n, g in grads.items():
        assert g.dtype == (s0 if n == "initial_state" else args[n]).dtype, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", RECURRENT)
def test_triton_recurrent_packed_equals_its_own_per_document_calls(op, dtype):
    """The varlen launch against the same kernels run once per document (the path before varlen): the same fp32 sums
    per document, so equal within :data:`TOL`'s per-document tolerance (bit for bit in the interpreter), but for the
    gradients of ``u`` / ``log_decay``, summed over the documents in another order: :data:`TOL`'s native tolerance."""
    args, s0, cu = _odd_example(op, dtype)
    torch.manual_seed(3)
    w_o, w_s = torch.randn(1, sum(LENGTHS), ODD["H"], ODD["V"]), torch.randn(s0.shape)
    o, final, grads = _packed_with_grads(op, "triton_recurrent", args, s0, cu, w_o, w_s)
    o_ref, final_ref, grads_ref = _alone_with_grads(op, "triton_recurrent", args, s0, cu, w_o, w_s)
    tol = TOL["per_document"]
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(final, final_ref, atol=tol, rtol=tol)
    for n, g in grads.items():
        t = TOL["native"] if n in ("u", "log_decay") else tol
        torch.testing.assert_close(g, grads_ref[n], atol=t, rtol=t, msg=lambda m: f"d{n}: {m}")


# op -> the module of its fused-recurrent kernels and their name prefix
_TRITON_MODULES = {"rwkv6": ("zoo.kernels.rwkv6.triton_rwkv6", "_rwkv6"),
                   "dplr_delta_rule": ("zoo.kernels.dplr_delta_rule.triton_dplr_delta_rule", "_dplr"),
                   "retention": ("zoo.kernels.retention.triton_retention", "_retention")}


def _recording_launches(monkeypatch, op: str) -> list[tuple[str, tuple]]:
    """Each launch of the op's fused-recurrent kernels, as ``(kernel, grid)``, recorded on the way to the kernel."""
    module = importlib.import_module(_TRITON_MODULES[op][0])
    seen = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            seen.append((self.name, tuple(grid)))
            return self.kernel[grid]

    for launcher in ("recurrent_fwd", "recurrent_bwd"):  # the launchers the op's module calls with its kernels
        real = getattr(module, launcher)
        monkeypatch.setattr(module, launcher,
                            lambda kernel, *a, _real=real, **kw: _real(Recorder(kernel.fn.__name__, kernel), *a, **kw))
    return seen


@pytest.mark.parametrize("op", RECURRENT)
def test_triton_recurrent_packed_call_is_one_launch_over_all_documents(op, monkeypatch):
    """``varlen=True`` in the table: the packed call reaches the Triton backend with ``cu_seqlens`` (no per-document
    loop) and runs one forward and one backward launch, grid ``(cdiv(V, BV), N * H)``."""
    _, table, _, _ = CASES[op]
    assert table.backends["triton_recurrent"].varlen
    monkeypatch.setattr(type(table), "per_document", lambda *a, **kw: pytest.fail("per-document loop taken"))
    seen = _recording_launches(monkeypatch, op)
    args, s0, cu = _odd_example(op, torch.float32)
    w = torch.randn(1, sum(LENGTHS), ODD["H"], ODD["V"])
    _packed_with_grads(op, "triton_recurrent", args, s0, cu, w, torch.zeros(s0.shape))
    grid = (2, len(LENGTHS) * ODD["H"])  # V = 40 in blocks of 32
    prefix = _TRITON_MODULES[op][1]
    assert seen == [(f"{prefix}_fwd_kernel", grid), (f"{prefix}_bwd_kernel", grid)]


@pytest.mark.parametrize("op", RECURRENT)
def test_triton_recurrent_packed_call_copies_host_bounds_to_the_device_once(op, monkeypatch):
    """Boundaries given as host ints (what the blocks pass) become a device tensor once per call: the forward and the
    backward launch read the same one."""
    builds = []
    real = CuSeqlens.on

    def on(self, device):
        if self.tensor is None or self.tensor.device != device:
            builds.append(device)
        return real(self, device)

    monkeypatch.setattr(CuSeqlens, "on", on)
    args, s0, cu = _odd_example(op, torch.float32)
    w = torch.randn(1, sum(LENGTHS), ODD["H"], ODD["V"])
    o, final, grads = _packed_with_grads(op, "triton_recurrent", args, s0, cu.tolist(), w, torch.zeros(s0.shape))
    assert len(builds) == 1 and all(g is not None for g in grads.values())


@pytest.mark.parametrize("op", RECURRENT)
def test_triton_recurrent_packed_over_a_segment_runs_each_document_alone(op, monkeypatch):
    """Packed documents whose padded checkpoints (N x the longest, in chunks) exceed a segment of the scan (here
    forced to 16 tokens) run once per document, each in its own segments: the memory of before, the same results."""
    from zoo.kernels.triton_common import forced_segment

    args, s0, cu = _odd_example(op, torch.float32)
    w_o, w_s = torch.randn(1, sum(LENGTHS), ODD["H"], ODD["V"]), torch.randn(s0.shape)
    native = _packed_with_grads(op, "triton_recurrent", args, s0, cu, w_o, w_s)
    seen = _recording_launches(monkeypatch, op)
    with forced_segment(16):
        split = _packed_with_grads(op, "triton_recurrent", args, s0, cu, w_o, w_s)
    # forward: 1 + 1 + 2 + 1 segments (the 19 tokens: two); backward: one per segment, the two of the segmented
    # document each after its forward's recompute
    kernels, prefix = [k for k, _ in seen], _TRITON_MODULES[op][1]
    assert (kernels.count(f"{prefix}_fwd_kernel"), kernels.count(f"{prefix}_bwd_kernel")) == (5 + 2, 5)
    assert all(grid == (2, ODD["H"]) for _, grid in seen)
    for a, b in zip(native[:2], split[:2]):
        torch.testing.assert_close(a, b, atol=TOL["native"], rtol=TOL["native"])
    for n, g in native[2].items():
        torch.testing.assert_close(g, split[2][n], atol=TOL["native"], rtol=TOL["native"], msg=lambda m: f"d{n}: {m}")


# ---------------------------------------------------------------- the chunk-parallel Triton kernels, varlen-native

CHUNK_PARALLEL = ("rwkv6", "retention")  # triton_chunk: chunks of BT = 16 here (CHUNK = 8 rounds up to retention's smallest)
CP_BT = 16
CP_CHUNKS = ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0))  # (document, chunk in it) of LENGTHS in chunks of 16: 5 chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", CHUNK_PARALLEL)
def test_triton_chunk_packed_matches_each_document_in_torch(op, dtype):
    """One launch sequence of the chunk-parallel kernels over documents of 5, 1, 19 and 12 tokens in chunks of 16
    (each document's chunks from its own start: three documents shorter than a chunk, one of a single token, one of
    two chunks, the last partly masked; the boundaries 5, 6 and 25 inside the packed row's chunks), head dims K = 24,
    V = 40, H = 3, a start state each: outputs, final states and every gradient (``u`` / ``log_decay``, the decays and
    the start states included) equal each document run alone by the torch backend in fp64. fp32: within
    :data:`TOL`'s native tolerance; bf16: within 3e-2 of the largest reference value."""
    args, s0, cu = _odd_example(op, dtype)
    torch.manual_seed(2)
    o_shape = (1, sum(LENGTHS), ODD["H"], ODD["V"])
    w_o, w_s = torch.randn(o_shape), torch.randn(s0.shape)
    o, final, grads = _packed_with_grads(op, "triton_chunk", args, s0, cu, w_o, w_s)
    o_ref, final_ref, grads_ref = _alone_with_grads(op, "torch", args, s0, cu, w_o.double(), w_s.double(), to=torch.float64)
    assert final.shape == s0.shape and o.shape == o_shape
    assert set(grads) == set(args) | {"initial_state"}
    tol = TRITON_TOL[dtype]
    checks = {"o": (o, o_ref), "final state": (final, final_ref),
              **{f"d{n}": (g, grads_ref[n]) for n, g in grads.items()}}
    for what, (got, want) in checks.items():
        assert got is not None and want is not None, what
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m: f"{op} {what}: {m}")
        else:
            _assert_relative(got, want, tol, f"{op} {what}")
    for n, g in grads.items():
        assert g.dtype == (s0 if n == "initial_state" else args[n]).dtype, n


@pytest.mark.parametrize("op", CHUNK_PARALLEL)
def test_triton_chunk_packed_is_one_launch_of_each_kernel_and_equals_its_own_per_document_calls(op, monkeypatch):
    """``varlen=True`` in the table: the packed call (zero start states, ``cu_seqlens`` as host bounds beside the
    tensor) reaches the chunk-parallel backend with ``cu_seqlens`` (no per-document loop), reads no tensor back to the
    host, and launches each of its six kernels once: the per-chunk ones over all documents' 5 chunks, grid ``(5,
    cdiv(V, BV), H)``, the state passes ``(cdiv(K * V, 64), N * H)``. Its outputs, final states and gradients equal
    the same kernels run once per document: bit for bit in the interpreter (the same fp32 sums per chunk), but for
    ``u`` / ``log_decay``'s gradients, summed over the chunks in another order (:data:`TOL`'s native tolerance)."""
    from zoo.kernels.backends import CuSeqlens

    _, table, _, _ = CASES[op]
    assert table.backends["triton_chunk"].varlen
    args, _, cu = _odd_example(op, torch.float32)
    torch.manual_seed(3)
    w_o, w_s = torch.randn(1, sum(LENGTHS), ODD["H"], ODD["V"]), torch.randn(len(LENGTHS), ODD["H"], ODD["K"], ODD["V"])
    seen = recording_launches(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(type(table), "per_document", lambda *a, **kw: pytest.fail("per-document loop taken"))
        host = CuSeqlens(tuple(cu.tolist()), cu)
        with torch.no_grad(), NoReadBack():
            _run(op, "triton_chunk", args, None, host)  # the forward alone, without reading a tensor back
        del seen[:]
        o, final, grads = _packed_with_grads(op, "triton_chunk", args, None, host, w_o, w_s)
    prefix = f"_{op}_cp"
    chunks, passes = (len(CP_CHUNKS), 2, ODD["H"]), (15, len(LENGTHS) * ODD["H"])  # V = 40: 2 blocks of 32; 960 / 64
    assert seen == [(f"{prefix}_chunk_state_kernel", chunks), ("_chunk_pass_kernel", passes), (f"{prefix}_output_kernel", chunks),
                    (f"{prefix}_dstate_kernel", chunks), ("_chunk_pass_kernel", passes), (f"{prefix}_grad_kernel", chunks)]
    o_ref, final_ref, grads_ref = _alone_with_grads(op, "triton_chunk", args, None, cu, w_o, w_s)
    tol = TOL["per_document"]
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(final, final_ref, atol=tol, rtol=tol)
    assert set(grads) == set(args)
    for n, g in grads.items():
        t = TOL["native"] if n in ("u", "log_decay") else tol
        torch.testing.assert_close(g, grads_ref[n], atol=t, rtol=t, msg=lambda m: f"d{n}: {m}")


def test_chunk_index_cuts_each_document_from_its_own_start():
    """The host-built chunk table of :data:`LENGTHS` in chunks of 16 over 3 heads: (document, chunk) per chunk, the
    chunks before each document, the bounds, and each document x head's first / last state row (document n, head h:
    rows from ``H * (C_n + n) + h * (NT_n + 1)``)."""
    from zoo.kernels.backends import CuSeqlens
    from zoo.kernels.chunk_pass import chunk_index

    bounds = (0, *torch.tensor(LENGTHS).cumsum(0).tolist())
    index = chunk_index(CuSeqlens(bounds), CP_BT, 3, torch.device("cpu"))
    assert (index.N, index.H, index.NT, index.slots) == (4, 3, 5, 3 * (5 + 4))
    assert index.table.dtype == torch.int32
    assert index.indices.view(-1, 2).tolist() == [list(c) for c in CP_CHUNKS]
    assert index.offsets.tolist() == [0, 1, 2, 4, 5]
    assert index.cu.tolist() == list(bounds)
    nt, c = [1, 1, 2, 1], [0, 1, 2, 4]
    first = [3 * (c[n] + n) + h * (nt[n] + 1) for n in range(4) for h in range(3)]
    assert index.first.tolist() == first == [0, 2, 4, 6, 8, 10, 12, 15, 18, 21, 23, 25]
    assert index.last.tolist() == [f + nt[i // 3] for i, f in enumerate(first)]
    # every state row belongs to exactly one document x head
    rows = sorted(r for f, l in zip(index.first.tolist(), index.last.tolist()) for r in range(f, l + 1))
    assert rows == list(range(index.slots))


def test_chunk_parallel_packed_documents_beyond_a_segment_run_each_document_alone():
    """The one-launch condition of the chunk-parallel kernels: N * H state-pass programs within grid axis y, and all
    documents' states (``NT + N`` per head) within a segment's (``cdiv(S, BT) + 1``)."""
    from zoo.kernels.backends import CuSeqlens
    from zoo.kernels.chunk_pass import chunk_varlen_in_one_launch
    from zoo.kernels.triton_common import forced_segment

    cu = CuSeqlens((0, *torch.tensor(LENGTHS).cumsum(0).tolist()))
    assert chunk_varlen_in_one_launch(cu, 3 * 24 * 40, CP_BT, 3)
    with forced_segment(16 * 8):  # 9 states per head: the 5 chunks + 4 documents
        assert chunk_varlen_in_one_launch(cu, 1, CP_BT, 3)
    with forced_segment(16 * 7):
        assert not chunk_varlen_in_one_launch(cu, 1, CP_BT, 3)
    many = CuSeqlens(tuple(range(0, 16_385)))  # 16,384 one-token documents x 4 heads: 65,536 pass programs
    assert chunk_varlen_in_one_launch(many, 1, CP_BT, 3)
    assert not chunk_varlen_in_one_launch(many, 1, CP_BT, 4)
