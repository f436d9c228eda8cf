"""A paper roofline of zoo's Triton calls (``python -m benchmarks.kernels --model``): lower bounds, not measurements.

Every Triton call of :data:`zoo.kernels.registry.CALLS` is recorded at the benchmark sizes by
:func:`zoo.kernels.registry.launches` (the launchers' own code on meta tensors, with their H100 tiles): per launch the
grid, the programs per SM and the bytes of the distinct buffers it gets. Each buffer counts once, read or written, so
re-reads, in-place updates and L2 traffic are left out and ``bytes / HBM bandwidth`` is a lower bound; FLOPs are not
modelled. Beside it stand the peers' fwd+bwd times measured on an H100, read from :data:`PEERS`.

For Gated DeltaNet (:data:`SCALAR_DECAY_OPS`), whose log decay is one scalar per head and token, it also bounds a
hypothetical scalar-decay specialisation (issue 27): the same launches with each per-channel log-decay buffer
(the kernels' :data:`DECAY_ARGS`: ``[B, T, H, K]`` fp32, and its gradient ``[NV, B, T, H, K]``) one K-th the size,
``[B, T, H]``; derived from the recorded buffers, nothing else changed. Still a paper bound, of a kernel that does not
exist.
"""
from __future__ import annotations

from benchmarks.common import RESULTS
from zoo.kernels.registry import CALLS, OPS, Launch, launches

H100 = {"name": "H100 SXM", "sms": 132, "hbm_bytes_per_s": 3.35e12}
PEERS = RESULTS / "kernels-peers-h100-2026-11-23.md"
PEER_ROWS = {"selective_scan": "mamba-ssm selective_scan_fn", "ssd": "mamba-ssm mamba_chunk_scan_combined",
             "retention": "fla chunk_retention", "rwkv6": "fla chunk_rwkv6"}  # op -> its row in PEERS


SCALAR_DECAY_OPS = ("gated_delta_rule",)  # the ops whose decay is a scalar per head (the kernels get it per channel)
DECAY_ARGS = ("w", "dw")  # the generalized delta rule kernels' per-channel log decay and its gradient (kernels/dplr_delta_rule)
SCALAR_DECAY_WORTH = 0.25  # the bar (a judgement, not a measurement): the fwd+bwd bytes a second kernel should save


def peer_ms(op: str) -> tuple[str | None, dict[int, float]]:
    """The row of :data:`PEERS` for ``op`` and its fwd+bwd ms by T (B = 16384 / T)."""
    for line in PEERS.read_text().splitlines():
        if op in PEER_ROWS and line.startswith(f"| {PEER_ROWS[op]} "):
            return line, dict(zip((1024, 4096, 16384), (float(c) for c in line.strip("|").split("|")[1:4])))
    return None, {}


def _pass(recorded: list) -> dict:
    moved = sum(launch.bytes for launch in recorded)
    return {"bytes": moved, "hbm_ms": moved / H100["hbm_bytes_per_s"] * 1e3,
            "fewest_programs_per_sm": min(launch.programs for launch in recorded) / H100["sms"]}


def scalar_decay_bytes(recorded: list[Launch], K: int) -> int:
    """The bytes of ``recorded`` with every per-channel log-decay buffer (a :data:`DECAY_ARGS` argument, fp32, last
    axis K) replaced by one value per head and token: ``[..., B, T, H, K]`` -> ``[..., B, T, H]``."""
    moved = 0
    for launch in recorded:
        moved += launch.bytes
        for buffer in (b for b in launch.buffers if set(b.names) & set(DECAY_ARGS)):
            assert buffer.shape[-1] == K and buffer.dtype == "float32", (launch.kernel, buffer)
            moved -= buffer.bytes - buffer.bytes // K
    return moved


def model_report(ops, sizes) -> dict:
    """The roofline of every Triton call of ``ops`` at ``sizes`` ((T, batch) pairs), bf16 inputs."""
    report = {"kind": "paper roofline (HBM lower bounds from the launchers' buffers, not measured)", "gpu": H100,
              "dtype": "bfloat16", "peers_source": str(PEERS.relative_to(RESULTS.parent.parent)), "ops": {}}
    for op in ops:
        peer_line, peers = peer_ms(op)
        runs = []
        for call in (c for c in CALLS if c.op.name == op and c.launches and not c.step and not c.documents):  # batched calls
            for T, batch in sizes:
                fwd_bwd = launches(call, OPS[op].bench, T, batch)
                fwd = fwd_bwd[:len(launches(call, OPS[op].bench, T, batch, backward=False))]
                runs.append({"backend": call.backend, "T": T, "batch": batch, "fwd": _pass(fwd), "fwd_bwd": _pass(fwd_bwd),
                             "peer_fwd_bwd_ms_measured": peers.get(T) if T * batch == 16384 else None,
                             "launches": [{"kernel": x.kernel, "grid": list(x.grid), "programs": x.programs,
                                           "bytes": x.bytes, "constants": x.constants} for x in fwd_bwd]})
                if op in SCALAR_DECAY_OPS:
                    moved = scalar_decay_bytes(fwd_bwd, OPS[op].bench["K"])
                    runs[-1]["scalar_decay_fwd_bwd_bound"] = {
                        "bytes": moved, "hbm_ms": moved / H100["hbm_bytes_per_s"] * 1e3,
                        "ratio": moved / runs[-1]["fwd_bwd"]["bytes"]}
        report["ops"][op] = {"shapes": OPS[op].bench, "peer_line": peer_line, "runs": runs}
    return report


def model_markdown(report: dict) -> str:
    lines = [
        f"# Paper roofline of zoo's Triton kernels on an {H100['name']} (lower bounds, NOT measurements)",
        "",
        f"Computed by `python -m benchmarks.kernels --model` at the benchmark shapes, {report['dtype']} inputs: every "
        f"distinct buffer a launch gets counts once (re-reads and in-place updates not again), at {H100['hbm_bytes_per_s'] / 1e12} "
        f"TB/s; no FLOPs. Programs per SM: of {H100['sms']} SMs. Peer column: measured fwd+bwd ms (not a bound), "
        f"from `{report['peers_source']}`.",
    ]
    for op, entry in report["ops"].items():
        lines += ["", f"## {op}: {', '.join(f'{k} {v}' for k, v in entry['shapes'].items())}", "",
                  "| backend | T | B | fwd MB | fwd HBM ms | fwd+bwd MB | fwd+bwd HBM ms | fewest programs / SM | peer fwd+bwd ms (measured) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in entry["runs"]:
            f, fb = r["fwd"], r["fwd_bwd"]
            lines.append(f"| {r['backend']} | {r['T']} | {r['batch']} | {f['bytes'] / 1e6:.1f} | {f['hbm_ms']:.3f} | "
                         f"{fb['bytes'] / 1e6:.1f} | {fb['hbm_ms']:.3f} | {fb['fewest_programs_per_sm']:.2f} | "
                         f"{r['peer_fwd_bwd_ms_measured'] or '-'} |")
        lines += ["", "| backend | T | B | kernel | grid | programs / SM | MB | launch constants |", "|---|---:|---:|---|---|---:|---:|---|"]
        for r in entry["runs"]:
            for x in r["launches"]:
                tiles = ", ".join(f"{k}={v}" for k, v in x["constants"].items())
                lines.append(f"| {r['backend']} | {r['T']} | {r['batch']} | {x['kernel']} | {tuple(x['grid'])} | "
                             f"{x['programs'] / H100['sms']:.2f} | {x['bytes'] / 1e6:.1f} | {tiles} |")
        lines += ["", f"Peer row: `{entry['peer_line']}`" if entry["peer_line"] else "No peer timing for this op."]
        scalar = [r for r in entry["runs"] if "scalar_decay_fwd_bwd_bound" in r]
        if scalar:
            lines += scalar_decay_markdown(scalar)
    return "\n".join(lines) + "\n"


def scalar_decay_markdown(runs: list[dict]) -> list[str]:
    """The scalar-decay bound beside the generalized kernels' bound, and the conclusion the numbers give."""
    lines = ["", "### Paper bound of a scalar-decay specialisation (a kernel that does not exist; issue 27)", "",
             f"The same launches with the per-channel log-decay buffers (arguments {' / '.join(f'`{a}`' for a in DECAY_ARGS)}: "
             "`[B, T, H, K]` fp32 and their gradient `[NV, B, T, H, K]` fp32) one value per head and token (`[B, T, H]`); "
             "everything else as recorded. Both columns are HBM lower bounds, not measurements.", "",
             "| backend | T | B | generalized fwd+bwd MB | generalized HBM ms | scalar-decay fwd+bwd MB | scalar-decay HBM ms | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        g, s = r["fwd_bwd"], r["scalar_decay_fwd_bwd_bound"]
        lines.append(f"| {r['backend']} | {r['T']} | {r['batch']} | {g['bytes'] / 1e6:.1f} | {g['hbm_ms']:.3f} | "
                     f"{s['bytes'] / 1e6:.1f} | {s['hbm_ms']:.3f} | {s['ratio']:.3f} |")
    saving = 1 - max(r["scalar_decay_fwd_bwd_bound"]["ratio"] for r in runs)
    most = 1 - min(r["scalar_decay_fwd_bwd_bound"]["ratio"] for r in runs)
    verdict = (f"under the {SCALAR_DECAY_WORTH:.0%} this report asks of a second kernel to maintain, so on this bound a "
               "scalar-decay specialisation is not worth one (only a GPU profile showing the decay traffic matters more "
               "could change that)" if most < SCALAR_DECAY_WORTH else
               f"at least the {SCALAR_DECAY_WORTH:.0%} this report asks of a second kernel: worth prototyping and measuring")
    return lines + ["", f"Conclusion (paper bound only): a scalar-decay kernel would move {saving:.1%} to {most:.1%} "
                        f"fewer bytes than the generalized kernels it would replace (fwd+bwd, these sizes), {verdict}."]
