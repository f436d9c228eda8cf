"""One command for the first GPU: environment, ``pytest -m gpu``, a bf16 training step per recipe, quick kernel and
decode benchmarks, all inside a time budget.

``python -m benchmarks.gpu_check [--budget-s 480] [--out DIR] [--jobs N]`` on one CUDA GPU. ``--dry-run`` (chosen
automatically when CUDA is absent, and said so) plans every step and checks each command instead of running it:
``pytest -m gpu`` runs as it is (on CPU every GPU test skips, with its reason), and the training, kernel and decode
commands run their ``main(argv)`` in this process with ``--print`` / ``--dry-run`` appended.

Every step runs under a timeout taken from what is left of the budget; a step that runs over has its process group
killed and is reported, and steps that no longer fit are reported as "not run: budget". One failing step never stops
the next. Writes ``<out>/gpu-check-<gpu>.{md,json}`` (``gpu-check-dry-run.*`` in dry mode) with the environment,
each step's status, wall time and the last lines of every failure. Exit code: 0 when every step that ran passed,
1 when one failed or timed out, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEERS = ["flash-linear-attention", "fla-core"]  # measured against in benchmarks/, declared nowhere in pyproject.toml
CORE_MODULES = ["torch", "zoo", "zoo.layers", "zoo.kernels", "zoo.recipes", "zoo.data", "zoo.train", "zoo.decoding"]
STEP_MODULES = ["triton", "pytest", "zoo.finetune", "benchmarks.kernels", "benchmarks.decode"]
TRAIN_OVERRIDES = [
    "trainer.max_steps=2", "trainer.val_every=2", "trainer.log_every=1", "trainer.progress_bar=false",
    "trainer.precision=bf16-mixed", "data.val_batches=2", "scheduler.warmup_steps=1",
]
PYTEST_ARGS = ["-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts="]
KERNEL_ARGS = ["--sizes", "1024:4,4096:1", "--iters", "3"]
DECODE_ARGS = ["--batches", "1", "--prompt", "64", "--new-tokens", "16"]
# Each step's cap as a fraction of the whole budget (the time left caps it too).
CAPS = {"pytest": 0.4, "train": 0.2, "kernels": 0.15, "decode": 0.25}
ENV_LIMIT_S = 90.0  # the environment comes first and everything depends on it: only the budget caps it further
TAIL_LINES = 30

# Run in a subprocess with the names of modules to import: what imports, the GPU, the recipes and the kernel ops.
DISCOVER = r"""
import importlib, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "imports": {}}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        out["imports"][name] = None
    except Exception as err:
        out["imports"][name] = f"{type(err).__name__}: {err}".splitlines()[0]
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count(),
                      "bf16": torch.cuda.is_bf16_supported()}
except Exception as err:
    out.update(cuda=False, torch_error=f"{type(err).__name__}: {err}".splitlines()[0])
try:
    from zoo.recipe_loader import builtin_recipe_names, load_recipe
    out["recipes"] = {}
    for name in builtin_recipe_names():
        r = load_recipe(name)
        out["recipes"][name] = {"output_dir": r.output_dir, "init_from": r.finetune.init_from if r.finetune else None}
except Exception as err:
    out["recipes_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
try:
    from benchmarks.kernels import BENCHES
    out["kernel_ops"] = sorted(BENCHES)
except Exception as err:
    out["kernel_ops_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
print(json.dumps(out))
"""


# ------------------------------------------------------------------------------------------------ steps and budget


@dataclasses.dataclass
class Step:
    """One check: a command run in a subprocess (``cmd``) or a call in this process (``call() -> (rc, output)``).

    ``parse(output, rc) -> (ok, details)`` judges it; ``skip`` is a reason not to run it; ``after`` names a step
    that must have passed first."""

    name: str
    group: str
    cmd: list[str] | None = None
    call: Callable[[], tuple[int, str]] | None = None
    cap_s: float = math.inf
    parse: Callable[[str, int], tuple[bool, dict]] | None = None
    skip: str = ""
    after: str = ""

    def command(self) -> str:
        return " ".join(self.cmd) if self.cmd else getattr(self.call, "command", self.name)


@dataclasses.dataclass
class Result:
    name: str
    group: str
    status: str  # ok | failed | timed out | skipped | not run: budget
    command: str = ""
    seconds: float | None = None
    returncode: int | None = None
    reason: str = ""
    details: dict = dataclasses.field(default_factory=dict)
    tail: list[str] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "timed out")


class Budget:
    """Wall-clock budget: ``left()`` seconds remain for steps; a step needs at least ``min_step`` to start."""

    def __init__(self, seconds: float, reserve: float = 0.0, min_step: float = 5.0):
        self.min_step = min_step
        self.start = time.monotonic()
        self.deadline = self.start + seconds - reserve

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


_GROUPS: set[int] = set()  # process groups of the commands running now
_STOP = threading.Event()  # set on SIGTERM / SIGINT: no command starts any more


def _kill_groups_and_exit(signum: int, frame: Any) -> None:
    """SIGTERM / SIGINT: the steps' process groups go too (they run in sessions of their own)."""
    _STOP.set()
    for pgid in list(_GROUPS):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_command(cmd: list[str], timeout: float, log: Path, cwd: Path = ROOT, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, output to ``log``; on timeout the whole group is killed (rc None)."""
    if _STOP.is_set():
        raise SystemExit("gpu_check: stopped by a signal")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    rc = None
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        _GROUPS.add(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also what the step left behind (workers, compilers)
            proc.wait()
            _GROUPS.discard(proc.pid)
    return rc, log.read_text(errors="replace")


def tail(text: str, n: int = TAIL_LINES) -> list[str]:
    return [line[:400] for line in text.rstrip().splitlines()[-n:]]


class Runner:
    """Runs steps against one budget, in order (``jobs`` at a time for subprocess stages); records every result."""

    def __init__(self, budget: Budget, workdir: Path, log: Callable[[str], None] = print):
        self.budget, self.workdir, self.log = budget, workdir, log
        self.results: dict[str, Result] = {}
        self._lock = threading.Lock()

    def run(self, step: Step) -> Result:
        result = self._run(step)
        with self._lock:
            self.results[step.name] = result
        extra = f" ({result.reason})" if result.reason else ""
        seconds = f"{result.seconds:7.1f}s" if result.seconds is not None else " " * 8
        self.log(f"[{seconds}] {result.status:<15} {step.name}{extra}")
        return result

    def _run(self, step: Step) -> Result:
        base = {"name": step.name, "group": step.group, "command": step.command()}
        if step.skip:
            return Result(**base, status="skipped", reason=step.skip)
        if step.after:
            dep = self.results.get(step.after)
            if dep is None or dep.status != "ok":
                why = {"skipped": "was skipped", "not run: budget": "was not run (budget)"}.get(dep.status, dep.status) if dep else "did not run"
                return Result(**base, status="skipped", reason=f"needs {step.after}, which {why}")
        left = self.budget.left()
        if left < self.budget.min_step:
            return Result(**base, status="not run: budget", reason=f"{max(left, 0):.0f} s left")
        timeout = min(step.cap_s, left)
        start = time.monotonic()
        try:
            if step.cmd:
                log = self.workdir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", step.name) + ".log")
                rc, output = run_command(step.cmd, timeout, log)
            else:
                rc, output = step.call()
        except Exception as err:  # noqa: BLE001 - one step's crash is recorded, the next step runs
            rc, output = 1, "".join(traceback.format_exception(err))
        seconds = round(time.monotonic() - start, 1)
        try:  # a killed step's output is parsed too: pytest's finished tests are worth reporting
            ok, details = step.parse(output, -9 if rc is None else rc) if step.parse else (rc == 0, {})
        except Exception as err:  # noqa: BLE001
            ok, details = False, {"reason": f"output not understood: {type(err).__name__}: {err}"}
        reason = details.pop("reason", "")
        if rc is None:
            limit = "budget" if timeout < step.cap_s else "step limit"
            return Result(**base, status="timed out", seconds=seconds, reason=f"killed after {timeout:.0f} s ({limit})",
                          details=details, tail=tail(output))
        return Result(**base, status="ok" if ok else "failed", seconds=seconds, returncode=rc, details=details,
                      reason="" if ok else reason or f"exit code {rc}", tail=[] if ok else tail(output))

    def stage(self, steps: list[Step], jobs: int = 1) -> list[Result]:
        """Run ``steps``; ``jobs`` > 1 runs subprocess steps concurrently (in-process calls always one at a time)."""
        if jobs > 1 and all(s.cmd for s in steps):
            with ThreadPoolExecutor(jobs) as pool:
                return list(pool.map(self.run, steps))
        return [self.run(s) for s in steps]


# ------------------------------------------------------------------------------------------------ environment


def declared_packages() -> dict[str, str]:
    """zoo's declared packages -> ``required`` or ``<extra> extra`` (installed metadata, else pyproject.toml), plus peers."""
    try:
        meta = importlib.metadata.metadata("zoo")
        lines, extras = meta.get_all("Requires-Dist") or [], meta.get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        optional = project.get("optional-dependencies", {})
        lines, extras = list(project["dependencies"]), list(optional)
        lines += [f"{r.split(';')[0]}; extra == '{extra}'" for extra, reqs in optional.items() for r in reqs]
    roles: dict[str, str] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            roles[req.name] = "required"
        else:
            role = next((f"{e} extra" for e in extras if req.marker.evaluate({"extra": e})), None)
            if role:
                roles.setdefault(req.name, role)
    return {**roles, **{p: "peer" for p in PEERS}, "zoo": "this project"}


def package_versions(names: list[str]) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(limit: float, workdir: Path) -> tuple[int, str, dict]:
    """nvidia-smi, the packages and what imports (in a subprocess, ``limit`` seconds); returns (rc, output, environment)."""
    deadline = time.monotonic() + limit
    env: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        rc, smi = run_command(["nvidia-smi"], min(30.0, limit), workdir / "nvidia-smi.log")
        env["nvidia_smi"] = smi.strip() if rc == 0 else f"nvidia-smi failed (exit {rc}): {smi.strip()[-500:]}"
    else:
        env["nvidia_smi"] = "nvidia-smi: not found"
    roles = declared_packages()
    versions = package_versions(list(roles))
    env["packages"] = {name: {"version": versions[name], "role": role} for name, role in roles.items()}
    env["missing_required"] = [n for n, r in roles.items() if r == "required" and versions[n] is None]
    env["missing_optional"] = [n for n, r in roles.items() if r not in ("required", "this project") and versions[n] is None]
    modules = CORE_MODULES + STEP_MODULES
    rc, output = run_command([sys.executable, "-c", DISCOVER, *modules], max(deadline - time.monotonic(), 1.0), workdir / "discover.log")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if rc != 0 or not lines:
        env["discover_error"] = "timed out" if rc is None else "\n".join(tail(output, 10)) or f"exit code {rc}"
        return 1, f"environment discovery failed: {env['discover_error'].splitlines()[-1]}", env
    env.update(json.loads(lines[-1]))
    broken = [m for m in CORE_MODULES if env["imports"].get(m)]
    problems = [f"missing required packages: {', '.join(env['missing_required'])}"] if env["missing_required"] else []
    problems += [f"{m} does not import ({env['imports'][m]})" for m in broken]
    env["problems"] = problems
    return (1 if problems else 0), "\n".join(problems), env


def choose_mode(dry_run: bool, env: dict) -> tuple[bool, str]:
    """(dry, why): dry when asked, or when no CUDA device is seen."""
    if dry_run:
        return True, "--dry-run given"
    if not env.get("cuda"):
        if env.get("discover_error"):
            why = f"environment discovery failed: {env['discover_error'].splitlines()[-1]}"
        else:
            why = env.get("torch_error") or "torch.cuda.is_available() is False"
        return True, f"no CUDA device seen ({why}): dry run instead"
    return False, ""


# ------------------------------------------------------------------------------------------------ parsing outputs


PYTEST_LINE = re.compile(r"^(\S+::.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
COLLECTED_LINE = re.compile(r"^(\S+\.py::\S.*)$")  # --collect-only -q
PYTEST_SUMMARY = re.compile(r"^=+ (.*\d+ \w+.*) in [\d.]+s")


def _junit_key(nodeid: str) -> str:
    """``tests/a.py::TestX::test_y[p]`` -> ``tests.a.TestX::test_y[p]``, as JUnit XML names a test case."""
    path, *rest = nodeid.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *rest[:-1]]) + "::" + rest[-1]


def parse_pytest(output: str, junit: Path | None = None) -> dict:
    """Counts, each test's outcome and the failures' and skips' short messages (from -v lines and the JUnit XML)."""
    tests: dict[str, dict] = {}
    for line in output.splitlines():
        m = PYTEST_LINE.match(line)
        if m:
            tests[m.group(1)] = {"outcome": m.group(2).lower()}
        elif COLLECTED_LINE.match(line):
            tests[line] = {"outcome": "collected"}
    if junit is not None and junit.is_file():
        nodes = {_junit_key(node): node for node in tests}
        for case in ET.parse(junit).getroot().iter("testcase"):
            key = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    text = (child.get("message") or child.text or "").strip()
                    message = text.splitlines()[0][:300] if text else ""
                    break
            tests[nodes.get(key, key)] = {"outcome": outcome, **({"message": message} if message else {})}
    counts: dict[str, int] = {}
    for info in tests.values():
        counts[info["outcome"]] = counts.get(info["outcome"], 0) + 1
    summary = next((m.group(1) for m in map(PYTEST_SUMMARY.match, reversed(output.splitlines())) if m), "")
    return {"counts": counts, "summary": summary, "tests": tests}


def pytest_parser(junit: Path) -> Callable[[str, int], tuple[bool, dict]]:
    def parse(output: str, rc: int) -> tuple[bool, dict]:
        details = parse_pytest(output, junit)
        if rc:
            details["reason"] = "no test is marked gpu" if rc == 5 else details["summary"] or f"exit code {rc}"
        return rc == 0, details

    return parse


def train_parser(out_dir: Path) -> Callable[[str, int], tuple[bool, dict]]:
    """Reads ``summary.json`` of a training run: losses must be finite."""

    def parse(output: str, rc: int) -> tuple[bool, dict]:
        path = out_dir / "summary.json"
        if rc != 0 or not path.is_file():
            return False, {}
        s = json.loads(path.read_text())
        details = {k: s.get(k) for k in ("steps", "train_loss", "val_loss", "tokens_per_s", "parameters", "seconds")}
        losses = [v for v in (s.get("train_loss"), s.get("val_loss")) if v is not None]
        if not losses or not all(math.isfinite(v) for v in losses):
            return False, {**details, "reason": f"loss not finite: {losses}"}
        return True, details

    return parse


def _lookup(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def print_parser(overrides: list[str]) -> Callable[[str, int], tuple[bool, dict]]:
    """``zoo.train --print`` output: every override must appear in the resolved recipe."""

    def parse(output: str, rc: int) -> tuple[bool, dict]:
        if rc != 0:
            return False, {}
        resolved = yaml.safe_load(output)
        wrong = []
        for item in overrides:
            key, value = item.split("=", 1)
            if key == "recipe":
                continue
            got = _lookup(resolved, key)
            if got != yaml.safe_load(value):
                wrong.append(f"{key}={got!r} (asked {value})")
        details = {"model": {k: resolved["model"].get(k) for k in ("d_model", "n_layers", "blocks")},
                   "batch": f"{resolved['data']['batch_size']} x {resolved['data']['seq_len']}"}
        if wrong:
            return False, {**details, "reason": "overrides not applied: " + "; ".join(wrong)}
        return True, details

    return parse


def bench_parser(out_dir: Path, kind: str) -> Callable[[str, int], tuple[bool, dict]]:
    """A benchmark's JSON/markdown from ``out_dir``; fails on error cells (out-of-memory cells are only noted)."""

    def parse(output: str, rc: int) -> tuple[bool, dict]:
        jsons, mds = sorted(out_dir.glob("*.json")), sorted(out_dir.glob("*.md"))
        if rc != 0 or not jsons:
            return False, {}
        report = json.loads(jsons[-1].read_text())
        errors = [line.strip() for line in json.dumps(report, indent=1).splitlines() if '"error"' in line]
        details = {"report": report, "markdown": mds[-1].read_text() if mds else ""}
        if errors and kind == "decode":
            return False, {**details, "reason": f"{len(errors)} error cells: {errors[0][:200]}"}
        return True, {**details, **({"notes": errors} if errors else {})}

    return parse


def plan_parser(output: str, rc: int) -> tuple[bool, dict]:
    """A benchmark's ``--dry-run`` plan (the JSON object it prints)."""
    start = output.find("{")
    if rc != 0 or start < 0:
        return False, {}
    return True, {"plan": json.loads(output[start:])}


# ------------------------------------------------------------------------------------------------ the plan


def call_main(module: str, argv: list[str]) -> Callable[[], tuple[int, str]]:
    """``module.main(argv)`` in this process, its output captured (dry mode)."""

    def call() -> tuple[int, str]:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                returned = importlib.import_module(module).main(argv)
            except SystemExit as exit_:
                returned = exit_.code
        rc = 0 if returned is None or isinstance(returned, dict) else int(returned)
        return rc, buffer.getvalue()

    call.command = f"python -m {module} " + " ".join(argv)  # type: ignore[attr-defined]
    return call


def needs(env: dict, *modules: str) -> str:
    """Why a step cannot run: the modules it needs that do not import ("" when all do)."""
    imports = env.get("imports")
    if imports is None:
        return f"environment discovery failed: {env.get('discover_error', 'not run').splitlines()[-1]}"
    return "; ".join(f"{m} does not import ({imports[m]})" for m in modules if imports.get(m))


def base_recipe(recipe: str, recipes: dict) -> tuple[str | None, str]:
    """(the recipe whose checkpoint ``recipe`` fine-tunes, why it cannot run) for recipes with finetune.init_from."""
    init_from = recipes[recipe].get("init_from")
    if not init_from:
        return None, ""
    for name, info in recipes.items():
        if info.get("output_dir") and Path(init_from) == Path(info["output_dir"]) / "hf":
            return name, ""
    return None, f"fine-tunes {init_from}, which no recipe of this check writes"


def plan(env: dict, dry: bool, workdir: Path, budget_s: float,
         overrides: list[str] = TRAIN_OVERRIDES) -> list[tuple[list[Step], bool]]:
    """Stages of steps after the environment: (steps, may run concurrently)."""
    py = sys.executable
    stages: list[tuple[list[Step], bool]] = []

    junit = workdir / "pytest.xml"
    # Without CUDA the GPU tests skip, so even a dry run runs them (and shows each skip reason); with CUDA it collects.
    pytest_args = ["-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"] if dry and env.get("cuda") else PYTEST_ARGS
    stages.append(([Step(
        "pytest -m gpu", "pytest", cmd=[py, "-m", "pytest", *pytest_args, f"--junitxml={junit}"],
        cap_s=CAPS["pytest"] * budget_s, parse=pytest_parser(junit), skip=needs(env, "pytest", "zoo"),
    )], False))

    recipes = env.get("recipes") or {}
    first, second = [], []
    for recipe in recipes:
        out_dir = workdir / "train" / recipe
        argv = [f"recipe={recipe}", f"output_dir={out_dir}", *overrides]
        base, why = base_recipe(recipe, recipes)
        if base:
            argv.append(f"finetune.init_from={workdir / 'train' / base / 'hf'}")
        modules = ("zoo.train", "zoo.data") + (("zoo.finetune",) if recipes[recipe].get("init_from") else ())
        common = {"name": f"train {recipe}", "group": "train", "cap_s": CAPS["train"] * budget_s,
                  "skip": why or needs(env, *modules), "after": f"train {base}" if base else ""}
        if dry:
            step = Step(**common, call=call_main("zoo.train", [*argv, "--print"]), parse=print_parser(argv))
        else:
            step = Step(**common, cmd=[py, "-m", "zoo.train", *argv], parse=train_parser(out_dir))
        (second if base else first).append(step)
    if not recipes:
        why = needs(env, "zoo.train") or env.get("recipes_error", "zoo.recipe_loader lists no recipe")
        first.append(Step("train (recipes)", "train", skip=f"no recipe list: {why}"))
    stages += [(first, True), (second, True)]

    kernel_steps = []
    for op in env.get("kernel_ops") or []:
        out_dir = workdir / f"kernels-{op}"
        argv = ["--ops", op, *KERNEL_ARGS, "--out", str(out_dir)]
        common = {"name": f"kernels {op}", "group": "kernels", "cap_s": CAPS["kernels"] * budget_s,
                  "skip": needs(env, "benchmarks.kernels")}
        if dry:
            kernel_steps.append(Step(**common, call=call_main("benchmarks.kernels", [*argv, "--dry-run"]), parse=plan_parser))
        else:
            kernel_steps.append(Step(**common, cmd=[py, "-m", "benchmarks.kernels", *argv], parse=bench_parser(out_dir, "kernels")))
    if not kernel_steps:
        why = needs(env, "benchmarks.kernels") or env.get("kernel_ops_error", "benchmarks.kernels lists no op")
        kernel_steps.append(Step("kernels", "kernels", skip=f"no kernel list: {why}"))
    stages.append((kernel_steps, False))

    out_dir = workdir / "decode"
    argv = [*DECODE_ARGS, "--out", str(out_dir)]
    common = {"name": "decode", "group": "decode", "cap_s": CAPS["decode"] * budget_s, "skip": needs(env, "benchmarks.decode")}
    if dry:
        decode = Step(**common, call=call_main("benchmarks.decode", [*argv, "--dry-run"]), parse=plan_parser)
    else:
        decode = Step(**common, cmd=[py, "-m", "benchmarks.decode", *argv], parse=bench_parser(out_dir, "decode"))
    stages.append(([decode], False))
    return stages


# ------------------------------------------------------------------------------------------------ the report


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.failed for r in results) else 0


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _demote(markdown_text: str, levels: int = 3) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + levels, 6) + " ", markdown_text, flags=re.M)


def markdown(report: dict) -> str:
    """The human-readable report: title, step table, environment, then one section per step group."""
    meta, env = report["meta"], report["environment"]
    steps = [Result(**s) for s in report["steps"]]
    gpu = env.get("gpu") or {}
    title = f"# GPU check (dry run): {meta['device']}" if meta["dry_run"] else f"# GPU check: {meta['device']}"
    lines = [
        title, "",
        f"`{meta['command']}` on {meta['date']}: {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget, "
        f"exit code {meta['exit_code']}.",
    ]
    if meta["dry_run"]:
        lines += ["", f"**Dry run**: {meta['dry_reason']}. Every step was planned and its command checked "
                  "(`zoo.train --print`, the benchmarks' `--dry-run`; `pytest -m gpu` ran and skips without CUDA); "
                  "nothing ran on a GPU."]
    counts: dict[str, int] = {}
    for r in steps:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines += ["", "Steps: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", "",
              "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for r in steps:
        lines.append(f"| {_cell(r.name)} | {r.status} | {_fmt(r.seconds)} | {_cell(_summary(r))} |")

    lines += ["", "## Environment", ""]
    if gpu:
        lines.append(f"GPU: {gpu['name']} (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB, "
                     f"{gpu['multiprocessors']} SMs, {gpu['count']} device(s), bf16 {'yes' if gpu['bf16'] else 'no'}); "
                     f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}).")
    else:
        torch_version = env.get("torch") or ("unknown (discovery failed)" if env.get("discover_error") else "not importable")
        lines.append(f"No CUDA device seen; torch {torch_version}. "
                     f"{env.get('cpus')} CPUs, {env.get('platform')}.")
    lines.append(f"Python {env.get('python', platform.python_version())} at {env.get('executable', sys.executable)}.")
    lines += ["", "| package | version | role |", "|---|---|---|"]
    for name, info in env.get("packages", {}).items():
        lines.append(f"| {name} | {info['version'] or '**missing**'} | {info['role']} |")
    lines += ["", f"Missing required packages: {', '.join(env.get('missing_required', [])) or 'none'}. "
              f"Missing optional packages: {', '.join(env.get('missing_optional', [])) or 'none'}."]
    broken = {m: err for m, err in env.get("imports", {}).items() if err}
    if broken:
        lines += ["", "Modules that do not import:", ""] + [f"- `{m}`: {err}" for m, err in broken.items()]
    lines += ["", "```", env.get("nvidia_smi", ""), "```"]

    by_group: dict[str, list[Result]] = {}
    for r in steps:
        by_group.setdefault(r.group, []).append(r)
    for r in by_group.get("pytest", []):
        lines += ["", "## pytest -m gpu", "", f"`{r.command}`: {r.status}. {r.details.get('summary', '')}"]
        tests = r.details.get("tests", {})
        if tests:
            lines += ["", "| test | outcome | message |", "|---|---|---|"]
            lines += [f"| `{_cell(t)}` | {i['outcome']} | {_cell(i.get('message', ''))} |" for t, i in tests.items()]
    train = by_group.get("train", [])
    if train:
        lines += ["", "## Training: one short run per recipe", "",
                  "`python -m zoo.train recipe=NAME output_dir=TMP " + " ".join(meta.get("train_overrides", TRAIN_OVERRIDES)) + "`"
                  + (" (dry run: with `--print`; the resolved recipe is checked to carry every override)." if meta["dry_run"] else "."),
                  ""]
        if meta["dry_run"]:
            lines += ["| recipe | status | model | batch | note |", "|---|---|---|---|---|"]
            for r in train:
                m = r.details.get("model") or {}
                model = f"d_model {m['d_model']}, {m['n_layers']} layers, {'+'.join(m['blocks'])}" if m else ""
                lines.append(f"| {r.name.removeprefix('train ')} | {r.status} | {model} | "
                             f"{r.details.get('batch', '')} | {_cell(_train_note(r))} |")
        else:
            lines += ["| recipe | status | train loss | val loss | steps | seconds | tokens/s | note |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
            for r in train:
                d = r.details
                lines.append(f"| {r.name.removeprefix('train ')} | {r.status} | {_fmt(d.get('train_loss'))} | "
                             f"{_fmt(d.get('val_loss'))} | {_fmt(d.get('steps'))} | {_fmt(r.seconds)} | "
                             f"{_fmt(d.get('tokens_per_s'))} | {_cell(_train_note(r))} |")
    for group, heading in (("kernels", "Kernels (quick sizes)"), ("decode", "Decode (quick)")):
        results = by_group.get(group, [])
        if not results:
            continue
        lines += ["", f"## {heading}", ""]
        for r in results:
            lines += [f"`{r.command}`: {r.status}" + (f" ({r.reason})" if r.reason else "") + ".", ""]
            if r.details.get("markdown"):
                lines += [_demote(r.details["markdown"]).rstrip(), ""]
            elif r.details.get("plan"):
                lines += ["```json", json.dumps(_plan_summary(r.details["plan"])), "```", ""]
    failed = [r for r in steps if r.failed]
    if failed:
        lines += ["", "## Failures"]
        for r in failed:
            lines += ["", f"### {r.name}: {r.status} ({r.reason})", "", f"`{r.command}`", "", "```", *r.tail[-15:], "```"]
    not_run = [r for r in steps if r.status in ("skipped", "not run: budget")]
    if not_run:
        lines += ["", "## Skipped or not run", ""] + [f"- {r.name}: {r.status}: {r.reason}" for r in not_run]
    return "\n".join(lines) + "\n"


def _train_note(r: Result) -> str:
    base = re.search(r"finetune\.init_from=\S*/train/([^/\s]+)/hf", r.command)
    notes = [f"fine-tunes this check's {base.group(1)} export" if base else "", r.reason]
    return "; ".join(n for n in notes if n)


def _plan_summary(plan_: dict) -> dict:
    """The parts of a benchmark's dry-run plan worth a line in the report."""
    keep = ("device", "dtype", "sizes", "iters", "modes", "shapes")
    summary = {k: plan_[k] for k in keep if k in plan_}
    if "ops" in plan_:
        summary["ops"] = {op: {"implementations": v["implementations"], "peers_missing": v["peers_missing"]} for op, v in plan_["ops"].items()}
    if "recipes" in plan_:
        summary["recipes"] = list(plan_["recipes"])
    return summary


def _summary(r: Result) -> str:
    d = r.details
    if r.status != "ok":
        return r.reason
    if r.group == "pytest":
        return d.get("summary") or ", ".join(f"{n} {k}" for k, n in d.get("counts", {}).items())
    if r.group == "train":
        if "val_loss" in d:
            return f"train loss {_fmt(d.get('train_loss'))}, val loss {_fmt(d.get('val_loss'))}"
        return f"--print ok, batch {d.get('batch', '')}"
    if r.group == "env":
        return d.get("summary", "")
    if "plan" in d:
        return "--dry-run ok"
    return "; ".join(d.get("notes", [])[:2]) or "report written"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / report["meta"]["stem"]
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for everything (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="plan and check every command, run nothing on a GPU")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu-check-<gpu>.{md,json}")
    parser.add_argument("--jobs", type=int, default=4, help="training runs at a time on the GPU (default 4)")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="one more recipe override for every training run (repeatable)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if any("=" not in item or item.startswith(("recipe=", "output_dir=")) for item in args.train_override):
        parser.error("--train-override takes KEY=VALUE, and neither recipe nor output_dir")
    overrides = [*TRAIN_OVERRIDES, *args.train_override]
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out}: {err}")
    budget = Budget(args.budget_s, reserve=min(15.0, 0.05 * args.budget_s))
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _kill_groups_and_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    command = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    workdir = Path(tempfile.mkdtemp(prefix="zoo-gpu-check-"))
    try:
        runner = Runner(budget, workdir)
        env: dict = {}

        def env_call() -> tuple[int, str]:
            rc, output, found = environment(min(ENV_LIMIT_S, budget.left()), workdir)
            env.update(found)
            return rc, output

        env_step = Step("environment", "env", call=env_call,
                        parse=lambda output, rc: (rc == 0, {"reason": output.replace("\n", "; ")} if rc else {}))
        env_step.call.command = "nvidia-smi; pip list; import checks"  # type: ignore[attr-defined]
        env_result = runner.run(env_step)
        dry, why = choose_mode(args.dry_run, env)
        if dry:
            print(f"gpu_check: dry run: {why}", flush=True)
        gpu = (env.get("gpu") or {}).get("name")
        env_result.details["summary"] = (f"{gpu}, torch {env.get('torch')}" if gpu else f"no CUDA; torch {env.get('torch')}")
        results = [env_result]
        for steps, concurrent in plan(env, dry, workdir, args.budget_s, overrides):
            results += runner.stage(steps, args.jobs if concurrent and not dry else 1)
        device = gpu if gpu and not dry else f"{platform.machine()} CPU, no GPU used"
        code = exit_code(results)
        report = {
            "meta": {
                "command": command, "dry_run": dry, "dry_reason": why, "device": device,
                "stem": "gpu-check-dry-run" if dry else f"gpu-check-{slug(gpu or device)}",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "budget_s": args.budget_s, "wall_s": round(budget.elapsed(), 1), "exit_code": code, "jobs": args.jobs,
                "train_overrides": overrides, "kernel_args": KERNEL_ARGS, "decode_args": DECODE_ARGS,
            },
            "environment": env,
            "steps": [dataclasses.asdict(r) for r in results],
        }
        json_path, md_path = write_report(report, args.out)
        print(f"gpu_check: exit code {code}; wrote {md_path} and {json_path}", flush=True)
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
