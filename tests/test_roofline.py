"""benchmarks.kernels --model: the paper roofline reads the registry's launches; bytes checked by hand."""
import pytest

pytest.importorskip("triton")

from benchmarks.kernels import main  # noqa: E402
from benchmarks.roofline import H100, SCALAR_DECAY_OPS, peer_ms  # noqa: E402
from zoo.kernels.registry import CALLS, CALLS_BY_NAME  # noqa: E402

T, BATCH, H, K = 16384, 1, 16, 64


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    data = main(["--model", "--ops", "rwkv6", "retention", "--sizes", f"{T}:{BATCH}", "--out", str(out)])
    return data, (out / "kernels-roofline.md").read_text()


def test_every_triton_call_of_the_registry_is_modelled_with_its_declared_launches(report):
    data, md = report
    assert "lower bounds, NOT measurements" in md and "not measured" in data["kind"]
    for op, entry in data["ops"].items():
        declared = {c.backend: [k.name for k in c.launches] for c in CALLS if c.op.name == op and c.launches and not c.documents}
        assert [r["backend"] for r in entry["runs"]] == list(declared)
        for r in entry["runs"]:
            assert [x["kernel"] for x in r["launches"]] == declared[r["backend"]]
            assert 0 < r["fwd"]["bytes"] < r["fwd_bwd"]["bytes"] == sum(x["bytes"] for x in r["launches"])
            assert r["fwd_bwd"]["hbm_ms"] == pytest.approx(r["fwd_bwd"]["bytes"] / H100["hbm_bytes_per_s"] * 1e3)
            assert r["fwd_bwd"]["hbm_ms"] < r["peer_fwd_bwd_ms_measured"] == peer_ms(op)[1][T]


def test_rwkv6_recurrent_forward_bytes_by_hand(report):
    (run,) = [r for r in report[0]["ops"]["rwkv6"]["runs"] if r["backend"] == "triton_recurrent"]
    fwd = run["launches"][0]
    c = fwd["constants"]
    tokens = BATCH * T * H * K
    # r, k, v bf16; w_log fp32; u [H, K] fp32; o fp32; final state [B, H, K, V] fp32 (also the s0 placeholder: once);
    # checkpoints [programs, NC, BK, BV] fp32
    inputs = 3 * tokens * 2 + tokens * 4 + H * K * 4
    outputs = tokens * 4 + BATCH * H * K * K * 4 + fwd["programs"] * c["NC"] * c["BK"] * c["BV"] * 4
    assert fwd["bytes"] == run["fwd"]["bytes"] == inputs + outputs
    assert fwd["grid"] == [-(-K // c["BV"]), BATCH * H, 1]


def test_peer_numbers_come_from_the_results_folder():
    line, ms = peer_ms("selective_scan")
    assert line.startswith("| mamba-ssm selective_scan_fn") and ms == {1024: 3.08, 4096: 3.24, 16384: 3.78}
    assert peer_ms("dplr_delta_rule") == (None, {})


@pytest.fixture(scope="module")
def delta_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline-delta")
    data = main(["--model", "--ops", "gated_delta_rule", "kda", "--sizes", f"{T}:{BATCH}", "--out", str(out)])
    return data, (out / "kernels-roofline.md").read_text()


def test_gated_deltanet_and_kda_have_zoo_and_fla_calls(delta_report):
    """Issue 27: both parametrisations of the generalized delta rule are registry ops with zoo's Triton calls (dplr_delta_rule's
    kernels and grids) and fla's kernels as peers, and both are in the roofline with their declared launches."""
    for op in ("gated_delta_rule", "kda"):
        calls = {c.backend: c for c in CALLS if c.op.name == op and not c.step}
        assert set(calls) == {"triton_chunk", "triton_recurrent", "torch", "fla"}
        for backend in ("triton_chunk", "triton_recurrent"):
            assert calls[backend].launches == CALLS_BY_NAME[f"dplr_delta_rule/{backend}"].launches and not calls[backend].peer
        assert calls["fla"].peer and not calls["fla"].launches
        runs = delta_report[0]["ops"][op]["runs"]
        assert [r["backend"] for r in runs] == ["triton_chunk", "triton_recurrent"]
        for r in runs:
            assert [x["kernel"] for x in r["launches"]] == [k.name for k in calls[r["backend"]].launches]


def test_scalar_decay_bound_is_below_the_generalized_bound(delta_report):
    """The scalar-decay specialisation's paper bound: the same launches with the per-channel log decay ``w [B, T, H, K]``
    fp32 (every launch that gets it) and its gradient ``dw [NV, B, T, H, K]`` fp32 one K-th the size; bytes by hand."""
    data, md = delta_report
    assert SCALAR_DECAY_OPS == ("gated_delta_rule",)
    assert all("scalar_decay_fwd_bwd_bound" not in r for r in data["ops"]["kda"]["runs"])  # KDA's decay is per channel
    decay = BATCH * T * H * K * 4  # w, fp32
    for r in data["ops"]["gated_delta_rule"]["runs"]:
        bound, general = r["scalar_decay_fwd_bwd_bound"], r["fwd_bwd"]
        with_w = {"triton_chunk": 5, "triton_recurrent": 2}[r["backend"]]  # all but the two state passes / both
        nv = -(-K // r["launches"][-1]["constants"]["BV"])  # the last launch (the gradient kernel) writes dw
        assert general["bytes"] - bound["bytes"] == (with_w + nv) * (decay - decay // K)
        assert 0 < bound["hbm_ms"] < general["hbm_ms"] and 0 < bound["ratio"] < 1
        assert bound["ratio"] == pytest.approx(bound["bytes"] / general["bytes"])
    assert "Paper bound of a scalar-decay specialisation" in md and "Conclusion (paper bound only)" in md
