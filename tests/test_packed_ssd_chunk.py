"""Packed documents in SSD's chunk-parallel Triton kernels (``ssd_scan(backend="triton_chunk", cu_seqlens=...)``,
issue 28): one launch sequence over all documents, each document's chunks from its own first token (``IS_VARLEN``),
the state passing one program per document x head from each document's start state. Documents of 5, 1, 19 and 12
tokens in chunks of 16 (three shorter than a chunk, one of a single token, one of two chunks; the boundaries 5, 6
and 25 inside the packed row's chunks), grouped B / C (G = 2 < H = 4), odd head and state dims (P = 20, N = 24)."""
import pytest
import torch

from test_packed_ops import NoReadBack
from triton_testing import INTERPRETER_ONLY, recording_launches
from zoo.kernels.backends import CuSeqlens
from zoo.kernels.ssd import BACKENDS, ssd_scan

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason=INTERPRETER_ONLY)

LENGTHS = (5, 1, 19, 12)
CHUNK = 16  # the kernels' smallest chunk: 5 chunks over the 4 documents
CHUNKS = ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0))  # (document, chunk in it)
DIMS = {"H": 4, "G": 2, "P": 20, "N": 24}
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # fp32: assert_close's atol = rtol; bf16: max |error| / max |ref|
TOKEN_ARGS = ("x", "dt", "B", "C")


def _example(dtype, seed: int = 1) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Mamba-2's inputs over the packed documents (x, dt, B, C in ``dtype``; A, D, dt_bias fp32, as the layer passes
    them), a start state per document ``[N_docs, H, P, N]`` and ``cu_seqlens``."""
    torch.manual_seed(seed)
    T, (H, G, P, N) = sum(LENGTHS), DIMS.values()
    args = {"x": torch.randn(1, T, H, P).to(dtype), "dt": (torch.randn(1, T, H) * 0.5 - 1.0).to(dtype),
            "A": -torch.rand(H).add(0.5), "B": torch.randn(1, T, G, N).to(dtype), "C": torch.randn(1, T, G, N).to(dtype),
            "D": torch.randn(H), "dt_bias": torch.randn(H) * 0.5}
    s0 = torch.randn(len(LENGTHS), H, P, N)
    return args, s0, torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])


def _leaves(args: dict, s0, to=None):
    leaves = {n: (t.to(to) if to is not None else t).detach().clone().requires_grad_() for n, t in args.items()}
    state = None if s0 is None else (s0.to(to) if to is not None else s0).detach().clone().requires_grad_()
    return leaves, state


def _grads(leaves: dict, state) -> dict:
    return {**{n: t.grad for n, t in leaves.items()}, **({} if state is None else {"initial_state": state.grad})}


def _packed(backend: str, args: dict, s0, cu, w_y, w_s, to=None):
    """``(y, final, grads)`` of the packed call, the loss ``sum(y * w_y) + sum(final * w_s)``; ``to``: every tensor
    cast first (fp64 for the reference)."""
    leaves, state = _leaves(args, s0, to)
    y, final = ssd_scan(**leaves, initial_state=state, chunk_size=CHUNK, backend=backend, cu_seqlens=cu)
    ((y.to(w_y.dtype) * w_y).sum() + (final.to(w_s.dtype) * w_s).sum()).backward()
    return y, final, _grads(leaves, state)


def _alone(backend: str, args: dict, s0, cu, w_y, w_s, to=None):
    """The same as :func:`_packed`, each document run alone (its own call, its own start state)."""
    leaves, state = _leaves(args, s0, to)
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc = {n: t[:, s:e] if n in TOKEN_ARGS else t for n, t in leaves.items()}
        y_i, f_i = ssd_scan(**doc, initial_state=None if state is None else state[i:i + 1], chunk_size=CHUNK,
                            backend=backend)
        ys.append(y_i)
        finals.append(f_i)
    y, final = torch.cat(ys, 1), torch.cat(finals, 0)
    ((y.to(w_y.dtype) * w_y).sum() + (final.to(w_s.dtype) * w_s).sum()).backward()
    return y, final, _grads(leaves, state)


def _assert_relative(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max |error| {err:.3g} > {tol} x max |reference| {scale:.3g}"


def _weights(s0_shape, seed: int):
    torch.manual_seed(seed)
    T, (H, _, P, _) = sum(LENGTHS), DIMS.values()
    return torch.randn(1, T, H, P), torch.randn(s0_shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_triton_chunk_packed_matches_each_document_in_torch(dtype):
    """One launch sequence over the packed documents, a start state each: outputs, final states and every gradient
    (x, dt, A, B, C, D, dt_bias and the start states) equal each document run alone by the torch backend in fp64.
    fp32: within 1e-4 (atol and rtol); bf16: within 3e-2 of the largest reference value."""
    args, s0, cu = _example(dtype)
    w_y, w_s = _weights(s0.shape, 2)
    y, final, grads = _packed("triton_chunk", args, s0, cu, w_y, w_s)
    y_ref, final_ref, grads_ref = _alone("torch", args, s0, cu, w_y.double(), w_s.double(), to=torch.float64)
    assert y.shape == args["x"].shape and y.dtype == dtype and final.shape == s0.shape
    assert set(grads) == set(args) | {"initial_state"}
    tol = TOL[dtype]
    checks = {"y": (y, y_ref), "final state": (final, final_ref), **{f"d{n}": (g, grads_ref[n]) for n, g in grads.items()}}
    for what, (got, want) in checks.items():
        assert got is not None and want is not None, what
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
        else:
            _assert_relative(got, want, tol, what)
    for n, g in grads.items():
        assert g.dtype == (s0 if n == "initial_state" else args[n]).dtype, n


def test_ssd_triton_chunk_packed_is_one_launch_of_each_kernel_and_equals_its_own_per_document_calls(monkeypatch):
    """``varlen=True`` in the table: the packed call (zero start states, ``cu_seqlens`` as host bounds beside the
    tensor) reaches the kernels with ``cu_seqlens`` (no per-document loop), reads no tensor back to the host, and
    launches each kernel once per pass: the per-chunk ones over all documents' 5 chunks, grid ``(5, H, cdiv(P, 16))``
    (the backward ``(5, H)``), the state passing ``(cdiv(P * N, 64), N_docs * H)``. Outputs, final states and
    gradients equal the same kernels run once per document: bit for bit for the per-token ones but dB / dC (atomic
    sums over a group's heads in another order), within 1e-5 for A, D and dt_bias (summed over the chunks)."""
    assert BACKENDS.backends["triton_chunk"].varlen
    args, _, cu = _example(torch.float32, seed=3)
    w_y, w_s = _weights((len(LENGTHS), DIMS["H"], DIMS["P"], DIMS["N"]), 4)
    seen = recording_launches(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(type(BACKENDS), "per_document", lambda *a, **kw: pytest.fail("per-document loop taken"))
        host = CuSeqlens(tuple(cu.tolist()), cu)
        with torch.no_grad(), NoReadBack():
            ssd_scan(**args, chunk_size=CHUNK, backend="triton_chunk", cu_seqlens=host)  # forward alone, no read-back
        assert [k for k, _ in seen] == ["_ssd_chunk_state_kernel", "_ssd_state_passing_kernel", "_ssd_chunk_scan_kernel"]
        del seen[:]
        y, final, grads = _packed("triton_chunk", args, None, host, w_y, w_s)
    H, P, N = DIMS["H"], DIMS["P"], DIMS["N"]
    chunks, passes = (len(CHUNKS), H, 2), (-(-P * N // 64), len(LENGTHS) * H)  # fp32: BLOCK_P 16; 480 entries: 8 x 64
    assert seen == [("_ssd_chunk_state_kernel", chunks), ("_ssd_state_passing_kernel", passes),
                    ("_ssd_chunk_scan_kernel", chunks), ("_ssd_chunk_state_kernel", chunks),
                    ("_ssd_state_passing_kernel", passes), ("_ssd_chunk_bwd_kernel", chunks[:2])]
    y_ref, final_ref, grads_ref = _alone("triton_chunk", args, None, cu, w_y, w_s)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=0, rtol=0)
    assert set(grads) == set(args)
    for n, g in grads.items():
        t = 0 if n in ("x", "dt") else 1e-5
        torch.testing.assert_close(g, grads_ref[n], atol=t, rtol=t, msg=lambda m: f"d{n}: {m}")


def test_chunk_index_of_the_ssd_kernels():
    """The host-built chunk table the kernels read: (document, chunk) of each of the 5 chunks of 16 tokens, and the
    chunks before each document (where the state passing starts each document's walk)."""
    from zoo.kernels.chunk_pass import chunk_index

    bounds = (0, *torch.tensor(LENGTHS).cumsum(0).tolist())
    index = chunk_index(CuSeqlens(bounds), CHUNK, DIMS["H"], torch.device("cpu"))
    assert index.NT == len(CHUNKS) and index.table.dtype == torch.int32
    assert index.indices.view(-1, 2).tolist() == [list(c) for c in CHUNKS]
    assert index.offsets.tolist() == [0, 1, 2, 4, 5]


def test_ssd_triton_chunk_packed_beyond_a_segment_runs_each_document_alone(monkeypatch):
    """When all documents' chunks do not fit one segment (``chunk_varlen_in_one_launch`` false: here a segment
    forced to 16 tokens), the call runs each document alone (its own launches, state passing grid ``(.., H)``), with
    the same outputs, final states and gradients as the one-launch path."""
    from zoo.kernels.triton_common import forced_segment

    args, s0, cu = _example(torch.float32, seed=5)
    w_y, w_s = _weights(s0.shape, 6)
    native = _packed("triton_chunk", args, s0, cu, w_y, w_s)
    seen = recording_launches(monkeypatch)
    with forced_segment(16):
        split = _packed("triton_chunk", args, s0, cu, w_y, w_s)
    passes = [grid for k, grid in seen if k == "_ssd_state_passing_kernel"]
    # the documents of 5, 1 and 12 tokens: a forward and a backward pass each; the 19 tokens two segments of 16: two
    # forward passes, then in the backward each segment's recompute and its backward pass
    assert len(passes) == 3 * 2 + 2 + 2 * 2 and all(g[1] == DIMS["H"] for g in passes)
    for a, b in zip(native[:2], split[:2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n, g in native[2].items():
        torch.testing.assert_close(g, split[2][n], atol=1e-5, rtol=1e-5, msg=lambda m: f"d{n}: {m}")
