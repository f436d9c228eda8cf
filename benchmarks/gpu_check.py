"""One command for a lent GPU: the environment, the GPU tests, every recipe on GPU settings, quick kernel and decode
benchmarks, all inside a time budget.

``python -m benchmarks.gpu_check [--budget-s 480] [--out DIR]`` runs, each in a subprocess of its own session:
``nvidia-smi`` and ``pip list``; ``pytest -m gpu``; ``pytest tests/test_recipes_gpu_settings.py`` (every recipe
trained with bf16-mixed autocast and fused AdamW, on CUDA when there is one); ``benchmarks.kernels`` per op at the
quick sizes; ``benchmarks.decode`` at a short prompt. Test outcomes are read from each pytest's JUnit XML.

Each step's timeout is its share of the budget, capped by what is left; a step that runs over has its process group
killed, and steps that no longer fit are reported "not run: budget"; a failing step never stops the next. ``--dry-run``
(chosen when no CUDA device is seen, and said so) runs ``pytest -m gpu`` as it is (every GPU test skips, with its
reason), collects the recipe tests and runs the benchmarks with ``--dry-run``. Writes ``<out>/gpu-check-<gpu>.{md,json}``
(``gpu-check-dry-run.*``): one table of the steps, the benchmarks' tables and the tail of every failure. Exit code 0
when every step that ran passed, 1 otherwise, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.common import RESULTS, now, slug

ROOT = Path(__file__).resolve().parents[1]
KERNEL_ARGS = ["--sizes", "1024:4,4096:1", "--iters", "3"]
DECODE_ARGS = ["--batches", "1", "--prompt", "64", "--new-tokens", "16"]
SHARES = {"env": 0.1, "pytest": 0.3, "recipes": 0.3, "kernels": 0.15, "decode": 0.2}  # of the budget, per step
TAIL = 25
PROBE = """import json, torch
cuda = torch.cuda.is_available()
out = {"torch": torch.__version__, "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None}
try:
    from benchmarks.kernels import BENCHES
    out["kernel_ops"] = sorted(BENCHES)
except Exception as err:
    out["kernel_ops_error"] = f"benchmarks.kernels does not import: {type(err).__name__}: {err}".splitlines()[0]
print(json.dumps(out))"""
_GROUPS: set[int] = set()  # process groups of the commands running now


@dataclasses.dataclass
class Step:
    name: str
    cmd: list[str]
    share: str  # key of SHARES
    junit: Path | None = None  # a pytest step's JUnit XML
    out: Path | None = None  # a benchmark step's results folder


@dataclasses.dataclass
class Result:
    name: str
    command: str
    status: str  # ok | failed | timed out | not run: budget
    seconds: float | None = None
    detail: str = ""
    tail: list[str] = dataclasses.field(default_factory=list)
    output: str = ""  # a benchmark's markdown table

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "timed out")


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; a step needs ``min_step`` of them to start."""

    def __init__(self, seconds: float, min_step: float = 5.0):
        self.seconds, self.min_step, self.start = seconds, min_step, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def run_command(cmd: list[str], timeout: float, log: Path) -> int | None:
    """``cmd`` in its own session, output to ``log``; afterwards (on timeout: at once) its whole group is killed.
    Returns the exit code, None on timeout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        _GROUPS.add(proc.pid)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also what the step left behind (workers, compilers)
            proc.wait()
            _GROUPS.discard(proc.pid)


def _kill_groups_and_exit(signum: int, frame) -> None:
    for pgid in list(_GROUPS):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def junit_outcomes(path: Path) -> tuple[dict[str, int], list[str]]:
    """Counts of outcomes and, per failure or error, its test and the last lines of its report."""
    counts: dict[str, int] = {}
    failures: list[str] = []
    if not path.is_file():
        return counts, failures
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(getattr(problem, "tag", ""), "passed")
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome in ("failed", "error"):
            text = ((problem.get("message") or "") + "\n" + (problem.text or "")).strip().splitlines()
            failures += [f"{case.get('classname')}::{case.get('name')}: {outcome}", *text[-8:]]
    return counts, failures


def judge(step: Step, rc: int, log_text: str) -> tuple[bool, str, list[str], str]:
    """(passed, detail, failure lines, benchmark table) of a finished step."""
    if step.junit is not None:
        counts, failures = junit_outcomes(step.junit)
        last = log_text.strip().splitlines()[-1:] or ["no output"]
        return rc == 0, ", ".join(f"{n} {k}" for k, n in counts.items()) or last[0], failures, ""
    if step.out is not None and rc == 0:
        tables = sorted(step.out.glob("*.md"))
        errors = [line.strip() for path in step.out.glob("*.json") for line in path.read_text().splitlines() if '"error"' in line]
        if errors and step.share == "decode":
            return False, f"{len(errors)} error cells", errors[:10], ""
        return True, f"{len(errors)} error cells" if errors else "", [], tables[-1].read_text() if tables else ""
    start = log_text.find("{\n")
    if rc == 0 and start >= 0:  # a benchmark's --dry-run plan (the JSON object it prints)
        planned = json.JSONDecoder().raw_decode(log_text[start:])[0]
        return True, "plan: " + ", ".join(planned.get("recipes") or planned.get("ops") or []), [], ""
    return rc == 0, "", [], ""


def run_step(step: Step, budget: Budget, workdir: Path, budget_s: float) -> Result:
    command = " ".join(step.cmd).replace(sys.executable, "python")
    left = budget.left()
    if left < budget.min_step:
        return Result(step.name, command, "not run: budget", detail=f"{max(left, 0):.0f} s left")
    timeout = min(SHARES[step.share] * budget_s, left)
    log = workdir / (slug(step.name) + ".log")
    start = time.monotonic()
    rc = run_command(step.cmd, timeout, log)
    seconds = round(time.monotonic() - start, 1)
    text = log.read_text(errors="replace")
    tail = [line[:300] for line in text.rstrip().splitlines()[-TAIL:]]
    if rc is None:
        why = "budget" if timeout < SHARES[step.share] * budget_s else "step limit"
        return Result(step.name, command, "timed out", seconds, f"killed after {timeout:.0f} s ({why})", tail)
    try:
        ok, detail, failures, table = judge(step, rc, text)
    except (OSError, ValueError, ET.ParseError) as err:
        ok, detail, failures, table = False, f"output not understood: {err}", [], ""
    if ok:
        return Result(step.name, command, "ok", seconds, detail, output=table)
    return Result(step.name, command, "failed", seconds, detail or f"exit code {rc}", failures + ["--- log tail:"] + tail)


def plan(dry: bool, cuda: bool, ops: list[str], workdir: Path) -> list[Step]:
    """The steps after the environment, in order. Without CUDA the GPU tests skip, so even a dry run runs them; a
    dry run collects the recipe tests and plans the benchmarks (``--dry-run``)."""
    py, steps = sys.executable, []
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    collect = ["--collect-only"] if dry else []
    steps.append(Step("pytest -m gpu", [*pytest, *(collect if cuda else []), "-m", "gpu", f"--junitxml={workdir / 'gpu.xml'}"],
                      "pytest", junit=workdir / "gpu.xml"))
    steps.append(Step("recipes on GPU settings", [*pytest, *collect, "tests/test_recipes_gpu_settings.py",
                                                  f"--junitxml={workdir / 'recipes.xml'}"], "recipes", junit=workdir / "recipes.xml"))
    kernels = [py, "-m", "benchmarks.kernels", *KERNEL_ARGS]
    if dry:  # one process plans every op
        steps.append(Step("kernels", [*kernels, "--ops", *ops, "--dry-run"], "kernels"))
    for op in [] if dry else ops:  # one step per op: an op that hangs (autotuning) costs only its own share
        steps.append(Step(f"kernels {op}", [*kernels, "--ops", op, "--out", str(workdir / op)], "kernels", out=workdir / op))
    out = workdir / "decode"
    steps.append(Step("decode", [py, "-m", "benchmarks.decode", *DECODE_ARGS, "--out", str(out), *(["--dry-run"] if dry else [])],
                      "decode", out=None if dry else out))
    return steps


def environment(budget: Budget, workdir: Path, budget_s: float) -> tuple[Result, dict]:
    """``nvidia-smi``, ``pip list`` and a probe of torch, CUDA and the kernel ops, as the environment step."""
    env: dict = {}
    timeout = lambda: max(1.0, min(SHARES["env"] * budget_s, budget.left()))  # noqa: E731
    start = time.monotonic()
    for key, cmd in (("nvidia_smi", ["nvidia-smi"]), ("pip_list", [sys.executable, "-m", "pip", "list"]),
                     ("probe", [sys.executable, "-c", PROBE])):
        if key == "nvidia_smi" and not shutil.which("nvidia-smi"):
            env[key] = "nvidia-smi: not found"
            continue
        rc = run_command(cmd, timeout(), workdir / f"{key}.log")
        env[key] = (workdir / f"{key}.log").read_text(errors="replace").strip()
        if key == "probe" and rc == 0:
            env.update(json.loads(env.pop("probe").splitlines()[-1]))
    result = Result("environment", "nvidia-smi; pip list; probe", "ok", round(time.monotonic() - start, 1))
    if "torch" not in env:
        result.status, result.detail, result.tail = "failed", "the probe failed", env.get("probe", "").splitlines()[-TAIL:]
        return result, env
    result.detail = f"{env['gpu'] or 'no CUDA'}, torch {env['torch']}"
    if "kernel_ops_error" in env:
        result.status, result.detail = "failed", f"{result.detail}; {env['kernel_ops_error']}"
    return result, env


def markdown(report: dict) -> str:
    meta, env = report["meta"], report["environment"]
    results = [Result(**r) for r in report["steps"]]
    lines = [f"# GPU check{' (dry run)' if meta['dry_run'] else ''}: {meta['device']}", "",
             f"`{meta['command']}` on {meta['date']}: {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget, "
             f"exit code {meta['exit_code']}." + (f" Dry run: {meta['dry_reason']}." if meta["dry_run"] else ""), "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {r.name} | {r.status} | {'' if r.seconds is None else r.seconds} | {r.detail.replace('|', '/')} |" for r in results]
    for r in results:
        if r.output:
            lines += ["", f"## {r.name}", "", r.output.replace("\n# ", "\n### ").removeprefix("# ").rstrip()]
    for r in results:
        if r.failed:
            lines += ["", f"## {r.name}: {r.status}", "", f"`{r.command}`", "", "```", *r.tail, "```"]
    lines += ["", "## Environment", "", "```", env.get("nvidia_smi", ""), "```", "",
              "<details><summary>pip list</summary>", "", "```", env.get("pip_list", ""), "```", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for everything (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="plan and check every command, run nothing on a GPU")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu-check-<gpu>.{md,json}")
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--train-override", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs is not None or args.train_override:
        parser.error("--jobs / --train-override: gpu_check trains no recipe itself any more; "
                     "`pytest tests/test_recipes_gpu_settings.py` does (its GPU_SETTINGS are the overrides)")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    budget, workdir = Budget(args.budget_s), Path(tempfile.mkdtemp(prefix="zoo-gpu-check-"))
    handlers = {sig: signal.signal(sig, _kill_groups_and_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        env_result, env = environment(budget, workdir, args.budget_s)
        dry = args.dry_run or not env.get("cuda")
        why = "--dry-run given" if args.dry_run else "" if not dry else "no CUDA device seen" if "cuda" in env else "the probe failed"
        if dry:
            print(f"gpu_check: dry run: {why}", flush=True)
        results = [env_result]
        for step in plan(dry, bool(env.get("cuda")), env.get("kernel_ops") or [], workdir):
            results.append(run_step(step, budget, workdir, args.budget_s))
            r = results[-1]
            print(f"[{r.seconds or 0:7.1f}s] {r.status:<15} {r.name} {r.detail}", flush=True)
        code = 1 if any(r.failed for r in results) else 0
        device = "CPU, no GPU used" if dry else env["gpu"]
        meta = {"command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
                "dry_run": dry, "dry_reason": why, "device": device, "date": now(), "budget_s": args.budget_s,
                "wall_s": round(time.monotonic() - budget.start, 1), "exit_code": code}
        report = {"meta": meta, "environment": env, "steps": [dataclasses.asdict(r) for r in results]}
        stem = args.out / ("gpu-check-dry-run" if dry else f"gpu-check-{slug(device)}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_name(stem.name + ".md").write_text(markdown(report))
        print(f"gpu_check: exit code {code}; wrote {stem}.md and .json", flush=True)
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
