"""Ahead-of-time compile check: every Triton call of zoo.kernels.registry, forward and backward, compiles for sm_80,
sm_86, sm_89 and sm_90 at the ~125M models' shapes and head dim 256 (bf16 and fp32) with the launch parameters zoo's
launchers pick for that target, launches the kernels its registry entry declares with the grids its formulas give,
and fits the target's shared memory per block; and compiles for ROCm (gfx90a) at head dims <= 128. No GPU needed:
benchmarks/kernel_resources.py compiles in worker processes without the interpreter. The committed
benchmarks/results/kernels-resources.md must equal the table they give (deterministic: a difference is a change in the
kernels; nothing here writes it). Compiled kernels stay in Triton's cache, so a second run only re-reads them.
"""
import dataclasses

import pytest

pytest.importorskip("triton")

from benchmarks import kernel_resources as kr  # noqa: E402
from zoo.kernels.registry import CALLS_BY_NAME, TRITON_CALLS, shape_label, underfilled  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return kr.collect()


def test_committed_resource_table_is_what_the_kernels_compile_to(rows):
    """benchmarks/results/kernels-resources.md is the table these compiles give (``python -m
    benchmarks.kernel_resources`` rewrites it after a kernel change)."""
    assert kr.markdown(rows) == (kr.RESULTS / "kernels-resources.md").read_text()


def test_every_call_launches_its_declared_kernels_and_fits_shared_memory(rows):
    assert kr.problems(rows) == []
    for target in kr.TARGETS:
        for dtype in kr.DTYPES:
            for call in TRITON_CALLS:
                for dims in call.op.models:
                    key = (target, dtype, call.name, shape_label(dims))
                    launched = [r["kernel"] for r in rows if (r["target"], r["dtype"], r["op"], r["shape"]) == key]
                    assert launched == [k.name for k in call.launches], key


def test_no_spills_but_the_known_ones(rows):
    unexpected = [f"{r['kernel']} {r['shape']} {r['dtype']} {r['target']}: {r['stack']} B" for r in rows
                  if r["stack"] > 0 and kr.known_spill(r) is None]
    assert unexpected == []
    head_dim_64 = [r for r in rows if r["target"] == "sm_90" and r["dims"].get("K", r["dims"].get("P")) == 64]
    at_64 = [(c, d) for c in TRITON_CALLS for d in c.op.models if d.get("K", d.get("P")) == 64]
    assert len(head_dim_64) == sum(len(c.launches) for c, _ in at_64) * 2  # every launch, 2 dtypes
    # the only spills left are at head dim 256 and RWKV-6's packed gradient kernel at K = 64, fp32, sm_86 / 89, 8 B
    # (KNOWN_SPILLS): none else at 64 or 128, bf16 or fp32, on any target
    others = [r for r in rows if r["stack"] > 0 and r["dims"].get("K", r["dims"].get("P")) != 256]
    assert {(r["kernel"], r["target"], r["dtype"], r["stack"], bool(r.get("documents"))) for r in others} <= {
        ("_rwkv6_cp_grad_kernel", target, "float32", 8, True) for target in ("sm_86", "sm_89")}
    assert all(r["stack"] == 0 for r in head_dim_64)


def test_head_dim_256_fits_every_target(rows):
    """K = 256 (MAX_HEAD_DIM) of every head-dim op compiles within sm_86 / 89's 101,376 B of shared memory."""
    at_256 = [r for r in rows if r["dims"].get("K") == 256]
    assert {(r["target"], r["dtype"]) for r in at_256} == {(t, d) for t in kr.TARGETS for d in kr.DTYPES}
    assert {r["op"].split("/")[0] for r in at_256} == {"retention", "rwkv6", "dplr_delta_rule"}
    assert [r["kernel"] for r in at_256 if r["shared"] > r["limit"]] == []


@pytest.fixture(scope="module")
def hip_rows():
    return kr.collect(("gfx90a",))


def test_every_call_compiles_for_rocm(hip_rows):
    """MI250 (gfx90a; ``python -m benchmarks.kernel_resources --targets gfx942`` checks MI300 the same way): the
    dots of bf16 inputs take a precision ROCm's Triton accepts; every kernel fits 64 KiB of LDS."""
    assert kr.problems(hip_rows) == []
    for target in ("gfx90a",):
        for dtype in kr.DTYPES:
            for call in TRITON_CALLS:
                for dims in call.op.models:
                    if max(dims.get("K", 0), dims.get("P", 0)) > kr.HIP_MAX_HEAD_DIM:
                        continue
                    key = (target, dtype, call.name, shape_label(dims))
                    launched = [r["kernel"] for r in hip_rows if (r["target"], r["dtype"], r["op"], r["shape"]) == key]
                    assert launched == [k.name for k in call.launches], key


def test_launch_grids_follow_the_registry_formulas(rows):
    for r in rows:
        call = CALLS_BY_NAME[r["op"]]
        assert list(call.grid(r["kernel"], {**r["dims"], "B": 1, "T": 1 if call.step else kr.T}, r["tiles"])) == r["grid"], r


@pytest.mark.parametrize("name", [c.name for c in TRITON_CALLS])
def test_o_t_launches_fill_an_h100_at_batch_1(name):
    """Issue 16's bar at B = 1, T = 16k (16 heads of 64; SSD at N = 64 and 128; Mamba d_inner 2048): every launch an
    entry marks ``fills`` has >= 4 programs per H100 SM, with the launchers' own H100 tiles, and every grid is the
    entry's formula (recorded from the launchers on meta tensors, nothing compiled)."""
    assert underfilled(name) == []


def test_a_wrong_declaration_is_caught():
    """The bar's check fails on a grid formula that is off, a launch that does not fill, and a kernel list that differs."""
    call = CALLS_BY_NAME["rwkv6/triton_chunk"]
    off_by_one = tuple(k._replace(grid=lambda d, t, f=k.grid: (f(d, t)[0] + 1, *f(d, t)[1:])) for k in call.launches)
    assert len(underfilled(dataclasses.replace(call, launches=off_by_one))) == len(call.launches)
    recurrent = CALLS_BY_NAME["rwkv6/triton_recurrent"]
    (problem,) = underfilled(dataclasses.replace(recurrent, launches=(recurrent.launches[0]._replace(fills=True), recurrent.launches[1])))
    assert "_rwkv6_fwd_kernel: 32 programs < 528" in problem
    assert "declared" in underfilled(dataclasses.replace(call, launches=call.launches[:-1]))[0]


def test_the_registry_has_a_call_for_every_backend_and_kernels_for_every_triton_one():
    """A backend added to an op's BACKENDS without its registry entry (inputs, launches, grids) fails here."""
    from zoo.kernels.registry import CALLS, OPS

    for op in OPS.values():
        calls = [c for c in CALLS if c.op is op and not c.step and not c.documents]
        assert sorted(c.backend for c in calls) == sorted(op.backends.backends), op.name
        for c in calls:
            assert bool(c.launches) == (op.backends.backends[c.backend].package == "triton"), c.name
            assert c.peer == (op.backends.backends[c.backend].package not in (None, "triton")), c.name
    # packed documents (cu_seqlens, batch 1): the chunk-parallel calls that take them in one launch sequence, with the
    # batched call's kernels and fills, each grid by its packed formula
    packed = [c for c in CALLS if c.documents]
    assert {c.name for c in packed} == {f"{op}/triton_chunk/packed" for op in ("ssd", "retention", "rwkv6", "dplr_delta_rule")}
    for c in packed:
        batched = CALLS_BY_NAME[c.name.removesuffix("/packed")]
        assert [(k.name, k.fills) for k in c.launches] == [(k.name, k.fills) for k in batched.launches], c.name
        assert sum(c.documents) < kr.T and c.bounds(kr.T)[-1] == kr.T, c.name
