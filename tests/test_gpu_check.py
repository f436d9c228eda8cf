"""benchmarks.gpu_check without a GPU: the dry run end to end, the real run's plan, the budget (an overrunning step is
killed with its process group, later steps are not run), JUnit outcomes and failure tails in the report."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as g


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dry_run_runs_the_gpu_tests_collects_the_recipes_and_plans_the_benchmarks(tmp_path):
    assert g.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "pytest -m gpu", "recipes on GPU settings", "kernels", "decode"]
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in steps.values()), steps
    assert report["environment"]["torch"] == torch.__version__ and "torch" in report["environment"]["pip_list"]
    if not torch.cuda.is_available():  # every GPU test ran and skipped
        assert set(steps["pytest -m gpu"]["detail"].split(" ")[1::2]) == {"skipped"}, steps["pytest -m gpu"]["detail"]
    assert "tests collected" in steps["recipes on GPU settings"]["detail"]
    assert steps["kernels"]["detail"].startswith("plan: ") and "--dry-run" in steps["kernels"]["command"]
    assert "transformer_small" in steps["decode"]["detail"]
    md = (tmp_path / "gpu-check-dry-run.md").read_text()
    assert md.startswith("# GPU check (dry run)") and all(f"| {name} | ok |" in md for name in steps)
    assert g.markdown(report) == md


def test_the_real_run_times_each_op_and_runs_the_recipe_tests(tmp_path):
    steps = {s.name: s for s in g.plan(False, True, ["ssd", "rwkv6"], tmp_path)}
    assert list(steps) == ["pytest -m gpu", "recipes on GPU settings", "kernels ssd", "kernels rwkv6", "decode"]
    assert "--collect-only" not in steps["pytest -m gpu"].cmd + steps["recipes on GPU settings"].cmd
    assert steps["kernels ssd"].cmd[-4:] == ["--ops", "ssd", "--out", str(tmp_path / "ssd")]
    assert "--dry-run" not in steps["decode"].cmd and steps["decode"].out == tmp_path / "decode"


def test_step_that_overruns_is_killed_with_its_group_and_later_steps_are_not_run(tmp_path):
    pidfile = tmp_path / "child.pid"
    overrun = g.Step("overrun", ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], "decode")
    budget = g.Budget(3.0, min_step=0.5)
    start = time.monotonic()
    result = g.run_step(overrun, budget, tmp_path, budget_s=100.0)
    assert result.status == "timed out" and "budget" in result.detail and time.monotonic() - start < 5
    later = g.run_step(g.Step("later", [sys.executable, "-c", "pass"], "decode"), budget, tmp_path, 100.0)
    assert later.status == "not run: budget"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the step's own child survived the kill"
    capped = g.run_step(g.Step("capped", [sys.executable, "-c", "import time; time.sleep(30)"], "env"), g.Budget(60.0), tmp_path, 10.0)
    assert capped.status == "timed out" and "step limit" in capped.detail  # its share: 10% of a 10 s budget


def test_failed_pytest_reports_its_junit_outcomes_and_failure_tails(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 3 == 4, 'three is not four'\n")
    junit = tmp_path / "x.xml"
    step = g.Step("pytest x", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py"),
                               f"--junitxml={junit}"], "pytest", junit=junit)
    result = g.run_step(step, g.Budget(120.0), tmp_path, 120.0)
    assert result.status == "failed" and result.detail == "1 passed, 1 failed"
    assert any("test_bad: failed" in line for line in result.tail) and any("three is not four" in line for line in result.tail)
    report = {"meta": {"command": "c", "dry_run": False, "dry_reason": "", "device": "NVIDIA H200", "date": "d",
                       "budget_s": 480.0, "wall_s": 12.0, "exit_code": 1},
              "environment": {"nvidia_smi": "NVIDIA-SMI 580", "pip_list": "torch 2.11"}, "steps": [vars(result)]}
    md = g.markdown(report)
    assert "| pytest x | failed |" in md and "## pytest x: failed" in md and "three is not four" in md


@pytest.mark.parametrize("argv,message", [(["--budget-s", "0"], "--budget-s"), (["--jobs", "4"], "test_recipes_gpu_settings"),
                                          (["--train-override", "a=b"], "test_recipes_gpu_settings")])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        g.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
