"""benchmarks.gpu_check without a GPU: the dry run end to end, the budget (an overrunning step is killed with its
process group, later steps are not run), one failing step not stopping the next, the pytest parser and the report."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as g


def quiet_runner(budget: g.Budget, tmp_path: Path) -> g.Runner:
    return g.Runner(budget, tmp_path, log=lambda line: None)


def python_step(name: str, code: str, **kw) -> g.Step:
    return g.Step(name, "fake", cmd=[sys.executable, "-c", code], **kw)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dry_run_plans_and_checks_every_step(tmp_path):
    from benchmarks.kernels import BENCHES
    from zoo.recipe_loader import builtin_recipe_names

    assert g.main(["--dry-run", "--out", str(tmp_path), "--train-override", "optimizer.fused=false"]) == 0
    report = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    md = (tmp_path / "gpu-check-dry-run.md").read_text()
    assert md.startswith("# GPU check (dry run)") and report["meta"]["dry_run"] and report["meta"]["exit_code"] == 0
    recipes = builtin_recipe_names()
    steps = {s["name"]: s for s in report["steps"]}
    expected = {"environment", "pytest -m gpu", "decode"} | {f"train {r}" for r in recipes} | {f"kernels {op}" for op in BENCHES}
    assert set(steps) == expected
    assert [n for n, s in steps.items() if s["status"] != "ok" or s["seconds"] is None] == []
    assert all(f"| {name} | ok |" in md for name in expected)

    for recipe in recipes:
        command = steps[f"train {recipe}"]["command"]
        assert f"zoo.train recipe={recipe} " in command and " optimizer.fused=false " in command and command.endswith(" --print")
        assert all(item in command for item in g.TRAIN_OVERRIDES)  # trainer.precision=bf16-mixed among them
    order = [s["name"] for s in report["steps"]]
    assert order.index("train lora_small") > order.index("train mamba_small")
    assert "/train/mamba_small/hf" in steps["train lora_small"]["command"]
    for op in BENCHES:
        plan = steps[f"kernels {op}"]["details"]["plan"]
        assert list(plan["ops"]) == [op] and plan["sizes"] == [{"T": 1024, "batch": 4}, {"T": 4096, "batch": 1}]
    assert steps["decode"]["details"]["plan"]["shapes"]["new_tokens"] == 16

    env = report["environment"]
    assert env["packages"]["torch"]["version"] == torch.__version__
    assert {"datasets", "mamba-ssm", "flash-linear-attention", "peft"} <= set(env["packages"])
    assert set(env["missing_optional"]) <= set(env["packages"]) and env["missing_required"] == []
    tests = steps["pytest -m gpu"]["details"]["tests"]
    assert tests
    if not torch.cuda.is_available():  # each GPU test ran and skipped, saying why
        assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests.values()), tests


def test_without_cuda_the_run_becomes_dry_and_says_why():
    dry, why = g.choose_mode(False, {"cuda": False})
    assert dry and "no CUDA device" in why
    assert g.choose_mode(False, {"cuda": True}) == (False, "")
    assert g.choose_mode(True, {"cuda": True})[0]


def test_step_that_overruns_is_killed_with_its_group_and_later_steps_are_not_run(tmp_path):
    pidfile = tmp_path / "child.pid"
    steps = [
        python_step("quick", "print('hello')", parse=lambda out, rc: (rc == 0 and "hello" in out, {})),
        g.Step("overrun", "fake", cmd=["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]),
        python_step("later", "pass"),
    ]
    runner = quiet_runner(g.Budget(3.0, min_step=0.5), tmp_path)
    start = time.monotonic()
    results = runner.stage(steps)
    assert time.monotonic() - start < 10
    assert [r.status for r in results] == ["ok", "timed out", "not run: budget"]
    assert "budget" in results[1].reason and results[1].seconds < 4
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the step's own child survived the kill"
    assert g.exit_code(results) == 1


def test_failing_and_overlong_steps_do_not_stop_the_next(tmp_path):
    def broken_call():
        raise RuntimeError("in-process step broke")

    steps = [
        python_step("fails", "import sys; print('bad things'); sys.exit(3)"),
        python_step("too long", "import time; time.sleep(30)", cap_s=1.0),
        g.Step("crashes", "fake", call=broken_call),
        python_step("needs fails", "pass", after="fails"),
        python_step("skipped", "pass", skip="mamba_ssm does not import"),
        python_step("runs", "print('fine')"),
    ]
    results = quiet_runner(g.Budget(60.0), tmp_path).stage(steps)
    status = {r.name: r for r in results}
    assert status["fails"].status == "failed" and status["fails"].returncode == 3 and "bad things" in status["fails"].tail
    assert status["too long"].status == "timed out" and "step limit" in status["too long"].reason
    assert status["crashes"].status == "failed" and "in-process step broke" in "\n".join(status["crashes"].tail)
    assert status["needs fails"].status == "skipped" and "fails, which failed" in status["needs fails"].reason
    assert status["skipped"].reason == "mamba_ssm does not import"
    assert status["runs"].status == "ok"


def test_concurrent_stage_keeps_order_and_budget(tmp_path):
    steps = [python_step(f"s{i}", "import time; time.sleep(0.3)") for i in range(4)]
    results = quiet_runner(g.Budget(60.0), tmp_path).stage(steps, jobs=4)
    assert [r.name for r in results] == ["s0", "s1", "s2", "s3"] and all(r.status == "ok" for r in results)


def test_pytest_output_and_junit_are_parsed(tmp_path):
    output = "\n".join([
        "tests/test_a.py::test_ok PASSED [ 33%]",
        "tests/test_a.py::test_bad[bf16] FAILED [ 66%]",
        "tests/test_b.py::TestX::test_skip SKIPPED (needs a CUDA GPU) [100%]",
        "FAILED tests/test_a.py::test_bad[bf16] - AssertionError: 3 != 4",
        "=========== 1 failed, 1 passed, 1 skipped, 9 deselected in 4.20s ===========",
    ])
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.1"/>'
        '<testcase classname="tests.test_a" name="test_bad[bf16]"><failure message="AssertionError: 3 != 4">long</failure></testcase>'
        '<testcase classname="tests.test_b.TestX" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    parsed = g.parse_pytest(output, junit)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["summary"] == "1 failed, 1 passed, 1 skipped, 9 deselected"
    assert parsed["tests"]["tests/test_a.py::test_bad[bf16]"] == {"outcome": "failed", "message": "AssertionError: 3 != 4"}
    assert parsed["tests"]["tests/test_b.py::TestX::test_skip"]["message"] == "needs a CUDA GPU"
    partial = g.parse_pytest(output.splitlines()[0] + "\n", tmp_path / "absent.xml")  # killed mid-run: no XML yet
    assert partial["counts"] == {"passed": 1}


def test_report_is_written_as_markdown_and_json(tmp_path):
    results = [
        g.Result("environment", "env", "ok", seconds=2.0, details={"summary": "NVIDIA H200, torch 2.11"}),
        g.Result("train mamba_small", "train", "ok", command="python -m zoo.train recipe=mamba_small", seconds=12.5,
                 details={"train_loss": 5.5, "val_loss": 5.25, "steps": 2, "tokens_per_s": 3000.0}),
        g.Result("train lora_small", "train", "failed", command="python -m zoo.train recipe=lora_small "
                 "finetune.init_from=/tmp/x/train/mamba_small/hf", seconds=3.0, returncode=1, reason="exit code 1",
                 tail=["Traceback (most recent call last):", "RuntimeError: boom"]),
        g.Result("decode", "decode", "not run: budget", reason="2 s left"),
    ]
    report = {
        "meta": {"command": "python -m benchmarks.gpu_check", "dry_run": False, "dry_reason": "", "device": "NVIDIA H200",
                 "stem": "gpu-check-nvidia-h200", "date": "2026-12-01T00:00:00+00:00", "budget_s": 480.0, "wall_s": 470.2,
                 "exit_code": g.exit_code(results)},
        "environment": {"gpu": {"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8, "multiprocessors": 132,
                                "count": 1, "bf16": True},
                        "torch": "2.11.0", "packages": {"mamba-ssm": {"version": None, "role": "cuda extra"}},
                        "missing_required": [], "missing_optional": ["mamba-ssm"], "nvidia_smi": "NVIDIA-SMI 580"},
        "steps": [vars(r) for r in results],
    }
    json_path, md_path = g.write_report(report, tmp_path)
    assert json_path.name == "gpu-check-nvidia-h200.json" and md_path.name == "gpu-check-nvidia-h200.md"
    md = md_path.read_text()
    assert md.startswith("# GPU check: NVIDIA H200") and "dry run" not in md.splitlines()[0]
    assert "exit code 1" in md and "| train mamba_small | ok | 12.5 | train loss 5.5, val loss 5.25 |" in md
    assert "| mamba_small | ok | 5.5 | 5.25 | 2 | 12.5 | 3,000 |" in md
    assert "fine-tunes this check's mamba_small export" in md
    assert "RuntimeError: boom" in md and "- decode: not run: budget: 2 s left" in md
    assert "| mamba-ssm | **missing** | cuda extra |" in md
    assert json.loads(json_path.read_text()) == report
    assert g.markdown(json.loads(json_path.read_text())) == md


@pytest.mark.parametrize("argv", [["--budget-s", "0"], ["--jobs", "0"], ["--train-override", "recipe=x"], ["--no-such-option"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_:
        g.main(argv)
    assert exit_.value.code == 2


def test_kernel_benchmark_sizes_option(capsys):
    from benchmarks import kernels

    plan = kernels.main(["--smoke", "--sizes", "8:2,16:1", "--ops", "ssd", "--dry-run"])
    assert plan["sizes"] == [{"T": 8, "batch": 2}, {"T": 16, "batch": 1}] and plan["dtype"] == "float32"
    assert json.loads(capsys.readouterr().out)["ops"]["ssd"]["implementations"][:2] == ["triton_chunk", "torch"]
    with pytest.raises(SystemExit) as exit_:
        kernels.main(["--sizes", "1024:x", "--dry-run"])
    assert exit_.value.code == 2


def test_benchmark_outputs_are_read_back(tmp_path):
    from benchmarks import kernels

    kernels.main(["--smoke", "--ops", "selective_scan", "--out", str(tmp_path / "k")])
    ok, details = g.bench_parser(tmp_path / "k", "kernels")("", 0)
    assert ok and details["report"]["ops"]["selective_scan"]["runs"] and "| triton_recurrent |" in details["markdown"]
    assert g.bench_parser(tmp_path / "k", "kernels")("", 1)[0] is False  # a failed run does not pass on old files

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "decode-x.json").write_text(json.dumps(
        {"models": {"mamba_small": {"static@1": {"tokens_per_s": 10.0}, "cuda_graph@1": {"error": "RuntimeError: capture"}}}}
    ))
    ok, details = g.bench_parser(tmp_path / "d", "decode")("", 0)
    assert not ok and "1 error cells" in details["reason"] and "capture" in details["reason"]
