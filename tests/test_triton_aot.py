"""Ahead-of-time compile check: every zoo Triton kernel, forward and backward, compiles for sm_80, sm_86, sm_89 and
sm_90 at the ~125M models' shapes (bf16 and fp32) with the launch parameters zoo's launchers pick for that target, and
fits the target's shared memory per block. No GPU needed: benchmarks/kernel_resources.py compiles in worker processes
without the interpreter. The committed benchmarks/results/kernels-resources.md must equal the table they give
(deterministic: a difference is a change in the kernels). Cost on 2 busy CPU cores: about 4 minutes with an empty Triton cache, about 30 s with a warm one.
"""
import pytest

pytest.importorskip("triton")

from benchmarks import kernel_resources as kr  # noqa: E402

KERNELS = {
    "selective_scan": ["_selective_scan_fwd_kernel", "_selective_scan_bwd_kernel"],
    "ssd": ["_ssd_chunk_state_kernel", "_ssd_state_passing_kernel", "_ssd_chunk_scan_kernel",
            "_ssd_chunk_state_kernel", "_ssd_state_passing_kernel", "_ssd_chunk_bwd_kernel"],
    "ssd_step": ["_ssd_step_kernel"],
    "rwkv6": ["_rwkv6_fwd_kernel", "_rwkv6_bwd_kernel"],
    "rwkv7": ["_rwkv7_fwd_kernel", "_rwkv7_bwd_kernel"],
    "retention_chunk": ["_retention_chunk_fwd_kernel", "_retention_chunk_bwd_kernel"],
    "retention_recurrent": ["_retention_fwd_kernel", "_retention_bwd_kernel"],
    "retention_chunk_parallel": ["_retention_cp_chunk_state_kernel", "_chunk_pass_kernel", "_retention_cp_output_kernel",
                                 "_retention_cp_dstate_kernel", "_chunk_pass_kernel", "_retention_cp_grad_kernel"],
    "rwkv6_chunk_parallel": ["_rwkv6_cp_chunk_state_kernel", "_chunk_pass_kernel", "_rwkv6_cp_output_kernel",
                             "_rwkv6_cp_dstate_kernel", "_chunk_pass_kernel", "_rwkv6_cp_grad_kernel"],
    "rwkv7_chunk_parallel": ["_rwkv7_cp_chunk_state_kernel", "_rwkv7_cp_pass_kernel", "_rwkv7_cp_output_kernel",
                             "_rwkv7_bwd_kernel"],
}
CHUNK_PARALLEL = ("retention_chunk_parallel", "rwkv6_chunk_parallel")


@pytest.fixture(scope="module")
def rows():
    return kr.collect()


def test_committed_resource_table_is_what_the_kernels_compile_to(rows):
    """benchmarks/results/kernels-resources.md is the table these compiles give (``python -m
    benchmarks.kernel_resources`` rewrites it after a kernel change)."""
    assert kr.markdown(rows) == (kr.RESULTS / "kernels-resources.md").read_text()


def test_every_kernel_compiles_for_every_target_and_fits_its_shared_memory(rows):
    assert kr.problems(rows) == []
    for target in kr.TARGETS:
        for dtype in kr.DTYPES:
            for case in kr.cases():
                launched = [r["kernel"] for r in rows if (r["target"], r["dtype"], r["op"], r["shape"]) == (target, dtype, case.op, case.shape)]
                assert launched == KERNELS[case.op], (target, dtype, case)


def test_no_spills_but_the_known_ones(rows):
    unexpected = [f"{r['kernel']} {r['shape']} {r['dtype']} {r['target']}: {r['stack']} B" for r in rows
                  if r["stack"] > 0 and kr.known_spill(r) is None]
    assert unexpected == []
    hopper = [r for r in rows if r["target"] == "sm_90"]
    head_dim_64 = [r for r in hopper if r["dims"].get("K", r["dims"].get("P")) == 64]
    at_64 = [c for c in kr.cases() if c.dims.get("K", c.dims.get("P")) == 64]  # SSD at N = 64 and 128
    assert len(head_dim_64) == sum(len(KERNELS[c.op]) for c in at_64) * 2  # every launch, 2 dtypes
    assert all(r["stack"] == 0 for r in head_dim_64)
    assert all(r["stack"] == 0 for r in rows if r["op"] in ("ssd", "ssd_step", "selective_scan"))


def test_launch_grids_follow_the_docstring_formulas(rows):
    """``(B, cdiv(D, BLOCK_D))``; SSD ``(cdiv(T, L), B * H, cdiv(P, BLOCK_P))`` and state passing
    ``(cdiv(P * N, BLOCK), B * H)``; ``(cdiv(V, BV), B * H)`` at batch 1."""
    for r in rows:
        d, tiles = r["dims"], r["tiles"]
        # chunk-parallel retention / RWKV-6: state passes (cdiv(K * V, BLOCK), B * H), per chunk (cdiv(T, BT), cdiv(V, BV), B * H)
        if r["op"] in CHUNK_PARALLEL:
            expected = ([-(-d["K"] * d["V"] // tiles["BLOCK"]), d["H"], 1] if "BLOCK" in tiles
                        else [-(-kr.T // tiles["BT"]), -(-d["V"] // tiles["BV"]), d["H"]])
        elif r["op"] == "rwkv7_chunk_parallel":  # pass (cdiv(V, BVP), B * H); the recurrent backward (cdiv(V, BV), B * H)
            expected = ([-(-d["V"] // tiles["BVP"]), d["H"], 1] if "BVP" in tiles
                        else [-(-d["V"] // tiles["BV"]), d["H"], 1] if r["kernel"] == "_rwkv7_bwd_kernel"
                        else [-(-kr.T // tiles["BT"]), -(-d["V"] // tiles["BV"]), d["H"]])
        elif r["op"] == "selective_scan":
            expected = [1, -(-d["D"] // tiles["BLOCK_D"]), 1]
        elif r["op"] == "ssd_step":  # (B * H, cdiv(P, BLOCK_P))
            expected = [d["H"], -(-d["P"] // tiles["BLOCK_P"]), 1]
        elif r["kernel"] == "_ssd_state_passing_kernel":
            expected = [-(-d["P"] * d["N"] // tiles["BLOCK"]), d["H"], 1]
        elif r["op"] == "ssd":
            expected = [-(-kr.T // tiles["L"]), d["H"], -(-d["P"] // tiles["BLOCK_P"])]
        else:
            expected = [-(-d["V"] // tiles["BV"]), d["H"], 1]
        assert r["grid"] == expected, r
