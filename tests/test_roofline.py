"""benchmarks.kernels --model: the paper roofline's structure and a few numbers checked by hand."""
import json

import pytest

pytest.importorskip("triton")

from benchmarks.kernels import main  # noqa: E402
from benchmarks.roofline import H100, PEERS  # noqa: E402

T, BATCH, HEADS, HEAD_DIM = 16384, 1, 16, 64
LAUNCHES = {"ssd": 6}  # fwd + bwd launches per op where not 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    main(["--model", "--ops", "rwkv6", "selective_scan", "--sizes", f"{T}:{BATCH}", "--out", str(out)])
    return json.loads((out / "kernels-roofline.json").read_text()), (out / "kernels-roofline.md").read_text()


def _run(report, op, impl="zoo triton"):
    (run,) = [r for r in report["ops"][op]["runs"] if r["impl"] == impl and r["T"] == T]
    return run


def test_table_is_labelled_a_lower_bound_and_lists_every_launch(report):
    data, md = report
    assert "lower bounds, NOT measurements" in md and "not measured" in data["kind"]
    assert list(data["ops"]) == ["rwkv6", "selective_scan"]
    for op in data["ops"]:
        run = _run(data, op)
        kernels = [m["kernel"] for m in run["fwd_bwd"]["launches"]]
        assert len(kernels) == 2 and "fwd" in kernels[0] and "bwd" in kernels[1], kernels
        assert [m["kernel"] for m in run["fwd"]["launches"]] == kernels[:1]
        for m in run["fwd_bwd"]["launches"]:
            assert m["programs"] == pytest.approx(m["programs_per_sm"] * H100["sms"])
            assert f"| {m['kernel']} | {tuple(m['grid'])} | {m['programs']} |" in md


def test_rwkv6_forward_bytes_flops_and_grid_by_hand(report):
    data, _ = report
    fwd = _run(data, "rwkv6")["fwd"]
    tokens = BATCH * T * HEADS * HEAD_DIM
    # r, k, v, w_log in bf16 and u [H, K] in fp32; o [B, T, H, V] fp32, final state and checkpoints fp32
    assert fwd["bytes_read"] == {"bfloat16": 4 * tokens * 2, "float32": HEADS * HEAD_DIM * 4}
    (launch,) = fwd["launches"]
    c = launch["constants"]
    checkpoints = launch["programs"] * c["NC"] * c["BK"] * c["BV"] * 4
    assert fwd["bytes_written"] == {"float32": tokens * 4 + BATCH * HEADS * HEAD_DIM * HEAD_DIM * 4 + checkpoints}
    # one program per (V block, batch * head); 7 CUDA-core FLOPs per state element per token, no tensor cores
    assert launch["grid"] == [-(-HEAD_DIM // c["BV"]), BATCH * HEADS]
    assert fwd["cuda_core_flops"] == 7 * T * BATCH * HEADS * HEAD_DIM * HEAD_DIM and fwd["tensor_flops"] == 0
    moved = sum(fwd["bytes_read"].values()) + sum(fwd["bytes_written"].values())
    terms = (moved / 3.35e12, fwd["cuda_core_flops"] / 67e12)
    assert fwd["bound_ms"] == pytest.approx(max(terms) * 1e3)
    share = launch["programs"] / 132
    assert fwd["bound_sm_limited_ms"] == pytest.approx(max(terms[0], terms[1] / share) * 1e3)


def test_selective_scan_inputs_and_peer_column(report):
    data, md = report
    run = _run(data, "selective_scan")
    d, n = 2048, 16
    # u, delta, z [B, T, D] and B, C [B, T, N] in bf16; A [D, N], D, delta_bias [D] in fp32
    assert run["fwd"]["bytes_read"] == {"bfloat16": (3 * T * d + 2 * T * n) * 2, "float32": (d * n + 2 * d) * 4}
    assert run["peer_fwd_bwd_ms_measured"] == 3.78 and run["fwd_bwd"]["bound_ms"] < 3.78
    assert "| mamba-ssm selective_scan_fn (d_inner 2048, N 16) | 3.08 | 3.24 | 3.78 |" in md
    assert "| 3.78 |" in md


@pytest.mark.parametrize("op", ["retention", "rwkv6"])
def test_chunk_parallel_grids_fill_an_h100(tmp_path, op):
    """At B = 1, T = 16k, 16 heads of 64 every chunk-parallel launch has >= 4 programs per SM (528); the per-chunk
    grids are (cdiv(T, BT), cdiv(V, BV), B * H), the state passes (cdiv(K * V, BLOCK), B * H); the in-place state
    passes read and write their buffer."""
    data = main(["--model", "--ops", op, "--sizes", f"{T}:{BATCH}", "--out", str(tmp_path)])
    run = _run(data, op, "zoo triton chunk-parallel")
    launches = run["fwd_bwd"]["launches"]
    prefix = {"retention": "_retention_cp_", "rwkv6": "_rwkv6_cp_"}[op]
    assert [m["kernel"] for m in launches] == [
        "_chunk_pass_kernel" if name == "pass" else f"{prefix}{name}_kernel" for name in ("chunk_state", "pass", "output", "dstate", "pass", "grad")]
    BT = launches[0]["constants"]["BT"]
    for m in launches:
        c = m["constants"]
        assert m["programs"] >= 4 * H100["sms"], m
        if "BLOCK" in c:
            assert m["grid"] == [-(-HEAD_DIM * HEAD_DIM // c["BLOCK"]), BATCH * HEADS]
            states = (T // BT + 1) * HEADS * HEAD_DIM**2 * 4  # [B * H, NT + 1, K, V] fp32
            edge = HEADS * HEAD_DIM**2 * 4 if c["REVERSE"] else 0  # the final state's gradient (no initial state here)
            # the shared pass reads the log decay of every chunk and state row [B * H, NT, K]
            decays = HEADS * (T // BT) * HEAD_DIM * 4
            assert m["bytes_written"]["float32"] == states and m["bytes_read"]["float32"] == states + edge + decays
        else:
            assert m["grid"] == [-(-T // c["BT"]), -(-HEAD_DIM // c["BV"]), BATCH * HEADS]
    assert run["fwd_bwd"]["tensor_flops"] > 0 and run["peer_fwd_bwd_ms_measured"] == PEERS[op][1][T]


# fwd + bwd launches of an implementation where not 2 (RWKV-7's chunk-parallel backward is the recurrent kernel)
IMPL_LAUNCHES = {("retention", "zoo triton chunk-parallel"): 6, ("rwkv6", "zoo triton chunk-parallel"): 6,
                 ("rwkv7", "zoo triton chunk-parallel"): 4}


def test_every_op_and_kernel_has_a_model(tmp_path):
    data = main(["--model", "--sizes", "64:2", "--out", str(tmp_path)])
    assert sorted(data["ops"]) == ["retention", "rwkv6", "rwkv7", "selective_scan", "ssd"]
    for op, entry in data["ops"].items():
        assert (entry["peer_line"] is None) == (op == "rwkv7"), op  # PEERS.md has no rwkv7 timing
        for run in entry["runs"]:
            s = run["fwd_bwd"]
            assert len(s["launches"]) == IMPL_LAUNCHES.get((op, run["impl"]), LAUNCHES.get(op, 2)) and s["bound_ms"] > 0 and s["bound_sm_limited_ms"] >= s["bound_ms"], (op, run["impl"])
            assert s["tensor_flops"] + s["cuda_core_flops"] > run["fwd"]["tensor_flops"] + run["fwd"]["cuda_core_flops"] > 0


def test_rwkv7_chunk_parallel_grids_and_pass_bytes(tmp_path):
    """At B = 1, T = 16k, 16 heads of 64: the per-chunk forward launches have (cdiv(T, BT), cdiv(V, BV), B * H) >= 528
    programs; the state pass (cdiv(V, BVP), B * H) = 64 and the recurrent backward (cdiv(V, BV), B * H) = 32 have fewer
    (kernels/rwkv7/triton_chunk_parallel.py says why); the pass reads and writes the state buffer and reads the
    [B * H, NT, K, K] transitions."""
    data = main(["--model", "--ops", "rwkv7", "--sizes", f"{T}:{BATCH}", "--out", str(tmp_path)])
    run = _run(data, "rwkv7", "zoo triton chunk-parallel")
    launches = run["fwd_bwd"]["launches"]
    assert [m["kernel"] for m in launches] == ["_rwkv7_cp_chunk_state_kernel", "_rwkv7_cp_pass_kernel",
                                               "_rwkv7_cp_output_kernel", "_rwkv7_bwd_kernel"]
    for m in (launches[0], launches[2]):
        c = m["constants"]
        assert m["grid"] == [-(-T // c["BT"]), -(-HEAD_DIM // c["BV"]), BATCH * HEADS] and m["programs"] >= 4 * H100["sms"]
    pass_, bwd = launches[1], launches[3]
    assert pass_["grid"] == [-(-HEAD_DIM // pass_["constants"]["BVP"]), BATCH * HEADS] and pass_["programs"] == 64
    assert bwd["programs"] == 32
    NT = T // launches[0]["constants"]["BT"]
    states = (NT + 1) * HEADS * HEAD_DIM**2 * 4
    assert pass_["bytes_written"]["float32"] == states and pass_["bytes_read"]["float32"] == states + NT * HEADS * HEAD_DIM**2 * 4
    assert run["fwd"]["cuda_core_flops"] > 0 and run["fwd"]["tensor_flops"] > 0


def test_ssd_chunk_parallel_grids_bytes_and_flops_by_hand(tmp_path):
    """SSD at the benchmark shape (32 heads of 64, N 128, bf16 -> tf32 products, L = 64): every O(T) launch has at
    least 4 programs per H100 SM at batch 1; the chunk-state FLOPs and the output kernel's bytes by hand."""
    data = main(["--model", "--ops", "ssd", "--sizes", f"{T}:{BATCH}", "--out", str(tmp_path)])
    (run,) = data["ops"]["ssd"]["runs"][:1]
    shapes = data["ops"]["ssd"]["shapes"]
    h, p, n = shapes["heads"], shapes["head_dim"], shapes["d_state"]
    launches = run["fwd_bwd"]["launches"]
    assert [m["kernel"] for m in launches] == ["_ssd_chunk_state_kernel", "_ssd_state_passing_kernel", "_ssd_chunk_scan_kernel",
                                               "_ssd_chunk_state_kernel", "_ssd_state_passing_kernel", "_ssd_chunk_bwd_kernel"]
    assert all(m["programs"] >= 4 * H100["sms"] for m in launches)
    state = launches[0]
    c = state["constants"]
    n_chunks = -(-T // c["L"])
    assert state["grid"] == [n_chunks, BATCH * h, -(-p // c["BLOCK_P"])]
    assert n % c["BLOCK_N"] == 0 and c["N"] == n
    assert state["tensor_precision"] == "tf32" and state["tensor_flops"] == 2 * c["L"] * c["BLOCK_P"] * n * state["programs"]
    assert launches[1]["grid"] == [-(-p * n // launches[1]["constants"]["BLOCK"]), BATCH * h]
    scan = launches[2]
    # x, B, C bf16; dt bf16; A, D, dt_bias fp32 [H]; start states fp32 [B, H, NC, P, N]; y bf16
    assert scan["bytes_read"] == {"bfloat16": (T * h * p + T * h + 2 * T * n) * 2, "float32": 3 * h * 4 + BATCH * h * n_chunks * p * n * 4}
    assert scan["bytes_written"] == {"bfloat16": T * h * p * 2}


@pytest.mark.parametrize("op, shapes", [
    ("ssd", {"heads": HEADS, "head_dim": HEAD_DIM, "groups": 1, "d_state": 64}),
    ("ssd", {"heads": HEADS, "head_dim": HEAD_DIM, "groups": 1, "d_state": 128}),
    ("selective_scan", {"d_inner": 2048, "d_state": 16}),
])
def test_every_launch_has_four_programs_per_sm_at_batch_1(op, shapes):
    """Issue 16's bar at B = 1, T = 16k, 16 heads of 64: every launch (all do O(T) work) has >= 4 programs per H100
    SM, forward and backward, with the launchers' own H100 tiles."""
    from benchmarks.kernels import BENCHES
    from benchmarks.roofline import record

    bench = BENCHES[op]
    fwd, bwd = record(op, bench.zoo["zoo triton"], bench.make_inputs, shapes, T, BATCH)
    assert fwd and bwd
    for launch in fwd + bwd:
        assert launch.programs >= 4 * H100["sms"], (launch.kernel, launch.grid)
