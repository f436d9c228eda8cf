"""Packed documents (``cu_seqlens``) in the chunk-parallel Triton kernels of the generalized delta rule
(``dplr_delta_rule``'s ``triton_chunk`` backend, and Gated DeltaNet's and KDA's, which run the same kernels on their
parametrised inputs): one launch sequence over all documents, each document's chunks from its own first token, a state
pass per document x head from that document's start state (issue 28; retention's and RWKV-6's are in
``tests/test_packed_ops.py``).

Documents of 5, 1, 19 and 12 tokens in chunks of BT = 16 (three shorter than a chunk, one of a single token, one of
two chunks, the second partly masked; the boundaries 5, 6 and 25 inside the packed row's chunks), odd head dims K = 24
(padded to BK = 32), V = 20 (one block of BV = 32, partly masked; two pass blocks of BVP = 16), H = 2. On CPU the
kernels run in the Triton interpreter (``tests/conftest.py``)."""
import pytest
import torch

pytest.importorskip("triton")

from test_packed_ops import NoReadBack  # noqa: E402
from triton_testing import INTERPRETER_ONLY, recording_launches  # noqa: E402
from zoo.kernels.backends import CuSeqlens  # noqa: E402
from zoo.kernels.registry import OPS  # noqa: E402
from zoo.kernels.triton_common import forced_segment  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason=INTERPRETER_ONLY)

LENGTHS = (5, 1, 19, 12)
DIMS = {"H": 2, "K": 24, "V": 20}
BT = 16  # the chunk-parallel kernels' chunk whatever chunk_size
NT = 5  # chunks of LENGTHS in chunks of 16, each document from its own start: 1 + 1 + 2 + 1
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # fp32: abs and rel vs fp64; bf16: max |error| / max |reference|
SAME = 1e-6  # the same kernels per document: the same fp32 sums per chunk (bit for bit in the interpreter)
OPS_ = ("dplr_delta_rule", "gated_delta_rule", "kda")


def _example(op: str, dtype, seed: int = 1) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The op's arguments at :data:`DIMS` over the packed :data:`LENGTHS` (activations in ``dtype``, decays fp32 as
    the layers pass them), a start state per document and ``cu_seqlens``."""
    torch.manual_seed(seed)
    args = OPS[op].inputs(DIMS, 1, sum(LENGTHS), torch.device("cpu"), dtype)
    args.pop("initial_state", None)
    s0 = torch.randn(len(LENGTHS), DIMS["H"], DIMS["K"], DIMS["V"])
    return args, s0, torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])


def _loss_grads(op: str, backend: str, args: dict, s0, cu, w_o, w_s, to=None, packed: bool = True):
    """``(o, final, grads)`` of the loss ``sum(o * w_o) + sum(final * w_s)``: one packed call, or (``packed=False``)
    each document alone, its own call and start state; ``to``: every tensor cast first (fp64 for the reference).
    ``grads`` by name, ``initial_state`` included when given."""
    fn = OPS[op].fn
    leaves = {n: (t.to(to) if to is not None else t).detach().clone().requires_grad_() for n, t in args.items()}
    state = None if s0 is None else (s0.to(to) if to is not None else s0).detach().clone().requires_grad_()
    if packed:
        o, final = fn(**leaves, initial_state=state, backend=backend, cu_seqlens=cu)
    else:
        bounds = cu.bounds if isinstance(cu, CuSeqlens) else cu.tolist()
        outs, finals = [], []
        for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
            o_i, f_i = fn(**{n: t[:, s:e] for n, t in leaves.items()}, backend=backend,
                          initial_state=None if state is None else state[i:i + 1])
            outs.append(o_i)
            finals.append(f_i)
        o, final = torch.cat(outs, 1), torch.cat(finals, 0)
    ((o.to(w_o.dtype) * w_o).sum() + (final.to(w_s.dtype) * w_s).sum()).backward()
    return o, final, {**{n: t.grad for n, t in leaves.items()}, **({} if state is None else {"initial_state": state.grad})}


def _weights(seed: int = 2):
    torch.manual_seed(seed)
    return (torch.randn(1, sum(LENGTHS), DIMS["H"], DIMS["V"]),
            torch.randn(len(LENGTHS), DIMS["H"], DIMS["K"], DIMS["V"]))


def _assert_close(got, want, tol, what):
    """fp32 inputs: ``assert_close`` at ``tol``; bf16: max |error| <= tol x max |reference|."""
    assert got is not None and want is not None, what
    if tol == TOL[torch.bfloat16]:
        err = (got.double() - want.double()).abs().max().item()
        scale = max(want.double().abs().max().item(), 1e-30)
        assert err <= tol * scale, f"{what}: max |error| {err:.3g} > {tol} x max |reference| {scale:.3g}"
    else:
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _launches(chunks: int, docs: int) -> list[tuple[str, tuple]]:
    """The seven launches of a forward and backward over ``chunks`` chunks and ``docs`` documents (or rows): per-chunk
    grids ``(chunks, cdiv(V, BV), H)`` (V = 20: one block of 32), state passes ``(cdiv(V, BVP), docs * H)`` (BVP = 16:
    two blocks)."""
    per_chunk, passes = (chunks, 1, DIMS["H"]), (2, docs * DIMS["H"])
    return [("_dplr_cp_chunk_state_kernel", per_chunk), ("_dplr_cp_pass_kernel", passes),
            ("_dplr_cp_output_kernel", per_chunk), ("_dplr_cpb_dstate_kernel", per_chunk),
            ("_dplr_cpb_pass_kernel", passes), ("_dplr_cpb_du_kernel", per_chunk), ("_dplr_cpb_grad_kernel", per_chunk)]


@pytest.mark.parametrize("op,dtype", [("dplr_delta_rule", torch.float32), ("dplr_delta_rule", torch.bfloat16),
                                      ("gated_delta_rule", torch.float32), ("kda", torch.float32)],
                         ids=["dplr-fp32", "dplr-bf16", "gated_delta_rule-fp32", "kda-fp32"])
def test_triton_chunk_packed_matches_each_document_in_torch(op, dtype):
    """One packed launch sequence of the chunk-parallel kernels, a start state per document: outputs, final states and
    the gradient of every input (the decays and the start states included) equal each document run alone by the
    torch backend in fp64 on the same values. fp32: within 1e-4; bf16 (gradients rounded to bf16): within 3e-2 of the
    largest reference value. Gradients come back in the inputs' dtypes."""
    args, s0, cu = _example(op, dtype)
    w_o, w_s = _weights()
    o, final, grads = _loss_grads(op, "triton_chunk", args, s0, cu, w_o, w_s)
    o_ref, final_ref, grads_ref = _loss_grads(op, "torch", args, s0, cu, w_o.double(), w_s.double(), to=torch.float64,
                                              packed=False)
    assert o.shape == (1, sum(LENGTHS), DIMS["H"], DIMS["V"]) and final.shape == s0.shape
    assert set(grads) == set(args) | {"initial_state"}
    tol = TOL[dtype]
    _assert_close(o, o_ref, tol, f"{op} o")
    _assert_close(final, final_ref, tol, f"{op} final state")
    for n, g in grads.items():
        _assert_close(g, grads_ref[n], tol, f"{op} d{n}")
        assert g.dtype == (s0 if n == "initial_state" else args[n]).dtype, n


@pytest.mark.parametrize("op,with_state", [("dplr_delta_rule", True), ("gated_delta_rule", False), ("kda", True)],
                         ids=["dplr-start-states", "gated_delta_rule-zero-states", "kda-start-states"])
def test_triton_chunk_packed_is_one_launch_of_each_kernel_and_equals_its_own_per_document_calls(op, with_state, monkeypatch):
    """``varlen=True`` in the op's table: the packed call (``cu_seqlens`` as host bounds beside the tensor) reaches the
    chunk-parallel backend with ``cu_seqlens`` (the per-document loop patched to fail), reads no tensor back to the
    host, and launches each of the seven kernels once: the per-chunk ones over all documents' 5 chunks, grid ``(5,
    1, H)``, the state passes ``(2, N * H)``. Outputs, final states and every gradient (``d initial_state`` included)
    equal the same kernels run once per document, bit for bit in the interpreter (:data:`SAME`)."""
    table = OPS[op].backends
    assert table.backends["triton_chunk"].varlen
    args, s0, cu = _example(op, torch.float32)
    s0 = s0 if with_state else None
    w_o, w_s = _weights(3)
    host = CuSeqlens(tuple(cu.tolist()), cu)
    seen = recording_launches(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(type(table), "per_document", lambda *a, **kw: pytest.fail("per-document loop taken"))
        with torch.no_grad(), NoReadBack():
            OPS[op].fn(**args, initial_state=s0, backend="triton_chunk", cu_seqlens=host)  # the forward alone
        assert seen == _launches(NT, len(LENGTHS))[:3]
        del seen[:]
        o, final, grads = _loss_grads(op, "triton_chunk", args, s0, host, w_o, w_s)
    assert seen == _launches(NT, len(LENGTHS))
    o_ref, final_ref, grads_ref = _loss_grads(op, "triton_chunk", args, s0, cu, w_o, w_s, packed=False)
    torch.testing.assert_close(o, o_ref, atol=SAME, rtol=SAME)
    torch.testing.assert_close(final, final_ref, atol=SAME, rtol=SAME)
    assert set(grads) == set(args) | ({"initial_state"} if with_state else set())
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_ref[n], atol=SAME, rtol=SAME, msg=lambda m: f"d{n}: {m}")


def test_triton_chunk_packed_beyond_a_segment_runs_each_document_alone(monkeypatch):
    """The one-launch condition (:func:`~zoo.kernels.chunk_pass.chunk_varlen_in_one_launch` at BT = 16): all
    documents' states, ``NT + N = 9`` per head, within a segment's ``cdiv(S, 16) + 1``, and ``N * H`` pass programs
    within grid axis y. A segment of 128 tokens holds them (one launch sequence); one of 112 does not: each document
    runs alone (the non-packed kernels, grids over its own chunks and one row), with the same results."""
    from zoo.kernels.dplr_delta_rule.triton_chunk_parallel import dplr_cp_varlen_in_one_launch

    args, s0, cu = _example("dplr_delta_rule", torch.float32)
    host = CuSeqlens(tuple(cu.tolist()))
    assert dplr_cp_varlen_in_one_launch(host, args["r"], args["v"], 16)
    with forced_segment(16 * 8):
        assert dplr_cp_varlen_in_one_launch(host, args["r"], args["v"], 16)
    with forced_segment(16 * 7):
        assert not dplr_cp_varlen_in_one_launch(host, args["r"], args["v"], 16)
    many = CuSeqlens(tuple(range(0, 16_385)))  # 16,384 one-token documents: 65,536 pass programs at H = 4
    r, v = torch.empty(1, 16_384, 4, 1), torch.empty(1, 16_384, 4, 1)
    assert dplr_cp_varlen_in_one_launch(many, r[:, :, :3], v[:, :, :3], 16)
    assert not dplr_cp_varlen_in_one_launch(many, r, v, 16)

    w_o, w_s = _weights(4)
    native = _loss_grads("dplr_delta_rule", "triton_chunk", args, s0, cu, w_o, w_s)
    seen = recording_launches(monkeypatch)
    with forced_segment(16 * 7):
        split = _loss_grads("dplr_delta_rule", "triton_chunk", args, s0, cu, w_o, w_s)
    fwd = [launch for n in (1, 1, 2, 1) for launch in _launches(n, 1)[:3]]
    bwd = [launch for n in (1, 2, 1, 1) for launch in _launches(n, 1)[3:]]  # autograd runs the documents in reverse
    assert seen == fwd + bwd
    for a, b in zip(native[:2], split[:2]):
        torch.testing.assert_close(a, b, atol=SAME, rtol=SAME)
    for n, g in native[2].items():
        torch.testing.assert_close(g, split[2][n], atol=SAME, rtol=SAME, msg=lambda m: f"d{n}: {m}")
