"""The chunk-parallel Triton kernels do not depend on the order their programs run in, over packed documents and over
a batch whose rows end inside a chunk. The interpreter runs a launch's programs first to last, so a program that
stored past its document's (or row's) end, into the next chunk's rows, would be overwritten by the right values
afterwards and pass every other CPU test, while a GPU runs programs in any order. Here every launch runs last to
first (``triton_testing.programs_in_reverse``): outputs, final states and every gradient must equal the first-to-last
run's. One op per kernel family (Gated DeltaNet and KDA run the generalized delta rule's kernels); documents of 5, 1,
19 and 12 tokens (partial chunks, a one-token document, boundaries inside chunks) with a start state each, or two
rows of 37 tokens."""
import pytest
import torch

pytest.importorskip("triton")

from triton_testing import INTERPRETER_ONLY, programs_in_reverse  # noqa: E402
from zoo.kernels.registry import DELTA_RULE_OPS, OPS  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason=INTERPRETER_ONLY)

LENGTHS = (5, 1, 19, 12)
DIMS = {"ssd": {"H": 3, "P": 20, "N": 24, "G": 1}}
HEADS = {"H": 2, "K": 24, "V": 20}
FAMILIES = [name for name, op in OPS.items() if name not in DELTA_RULE_OPS
            and "triton_chunk" in op.backends.backends and op.backends.backends["triton_chunk"].varlen]


def _run(op: str, reverse: bool, packed: bool) -> list[torch.Tensor]:
    """Outputs, final states and every gradient (start states' included) of one ``triton_chunk`` call: over the packed
    documents, or (``packed`` False) over a batch of two rows of T = 37 (a partial last chunk ahead of the next row's)."""
    spec = OPS[op]
    dims = DIMS.get(op, HEADS)
    batch, rows = (1, len(LENGTHS)) if packed else (2, 2)
    args = spec.example(dims, batch, sum(LENGTHS), "cpu", torch.float32, seed=3)
    args.pop("initial_state", None)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    gen = torch.Generator().manual_seed(4)
    state_shape = (dims["H"], dims["P"], dims["N"]) if op == "ssd" else (dims["H"], dims["K"], dims["V"])
    state = torch.randn(rows, *state_shape, generator=gen).requires_grad_()
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()] if packed else None
    with pytest.MonkeyPatch.context() as mp:
        if reverse:
            programs_in_reverse(mp)
        o, final = spec.fn(**leaves, initial_state=state, backend="triton_chunk", cu_seqlens=cu, **spec.options)
        w_o, w_s = torch.randn(o.shape, generator=gen), torch.randn(final.shape, generator=gen)
        ((o.float() * w_o).sum() + (final * w_s).sum()).backward()
    return [o.detach(), final.detach(), *(t.grad for t in leaves.values()), state.grad]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "batch-2"])
@pytest.mark.parametrize("op", FAMILIES)
def test_chunk_kernels_do_not_depend_on_the_program_order(op, packed):
    assert set(FAMILIES) == {"ssd", "rwkv6", "dplr_delta_rule", "retention"}
    first_to_last, last_to_first = _run(op, False, packed), _run(op, True, packed)
    for i, (a, b) in enumerate(zip(first_to_last, last_to_first, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{op}, result {i}: {m}")  # dB, dC: atomic sums
