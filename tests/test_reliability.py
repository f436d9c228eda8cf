"""Reliability: exact resume after SIGKILL / SIGTERM, atomic and weights-only checkpoints, corrupt files,
non-finite steps, bad model inputs, unwritable or full disks."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.reliability import (
    PREEMPTED_EXIT_CODE, AtomicCheckpointIO, CheckpointError, NonFiniteError, atomic_directory,
    checkpoint_files, ensure_writable_dir, find_resume_point, load_checkpoint_file, trim_metrics,
)
from zoo.config import ModelConfig
from zoo.data import ResumableBatchSampler
from zoo.errors import ConfigError
from zoo.layers import MIXERS
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.recipe_loader import load_recipe
from zoo.train import train
from zoo.training import ZooLightningModule

MAX_STEPS = 10


def _overrides(run: Path, data: Path, **extra) -> list[str]:
    """A tiny shuffled run over ``data`` (6 batches an epoch, so 10 steps cross an epoch boundary), fp32 on CPU."""
    base = {
        "output_dir": str(run), "model.d_model": 16, "model.n_layers": 1, "model.attention.n_heads": 2,
        "model.attention.n_kv_heads": 1, "data.source": str(data), "data.cache_dir": str(data.parent / "cache"),
        "data.val_fraction": 0.3, "data.seq_len": 16, "data.batch_size": 4, "data.val_batches": 2,
        "trainer.max_steps": MAX_STEPS, "trainer.val_every": 2, "trainer.log_every": 1, "trainer.progress_bar": False,
        "trainer.accelerator": "cpu", "trainer.precision": "32-true", "scheduler.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the timing column."""
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    data = root / "data"
    data.mkdir()
    for i in range(10):
        (data / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 2)
    return root


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    run = workdir / "reference"
    train(load_recipe("transformer_small", _overrides(run, workdir / "data")))
    assert [int(r["step"]) for r in _rows(run)] == list(range(1, MAX_STEPS + 1))
    return run


SIGNAL_CHILD = Path(__file__).with_name("signal_child.py")


def _run_until_signal(run: Path, workdir: Path, signal_name: str, after_steps: int, *extra: str) -> subprocess.CompletedProcess:
    """``zoo.train`` in a child process that sends itself ``signal_name`` as the step after ``after_steps`` begins."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ZOO_TEST_SIGNAL": f"{signal_name}:{after_steps}"}
    cmd = [sys.executable, str(SIGNAL_CHILD), "recipe=transformer_small", *_overrides(run, workdir / "data"), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_auto_matches_uninterrupted_run(workdir, reference):
    """SIGTERM a run during step 3 (checkpoint at the step boundary, exit 75), resume it in a new process that is
    SIGKILLed during step 10 (after the mid-epoch checkpoint of step 8), resume again: metrics.csv equals the
    uninterrupted run's (10 steps over two epochs). Each child signals itself at its step, so nothing races."""
    run = workdir / "interrupted"
    done = _run_until_signal(run, workdir, "SIGTERM", 2)
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stderr[-2000:]
    (saved,) = (run / "ckpt").glob("*-sigterm.ckpt")
    assert "stopped by SIGTERM" in done.stderr and saved.name in done.stderr
    assert load_checkpoint_file(saved)["global_step"] == 3 and find_resume_point(run, "auto").path == saved

    done = _run_until_signal(run, workdir, "SIGKILL", 9, "resume=auto")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert f"resuming from {saved} (step 3)" in done.stderr
    assert find_resume_point(run, "auto").step == 8

    train(load_recipe("transformer_small", [*_overrides(run, workdir / "data"), "resume=auto"]))
    assert _rows(run) == _rows(reference)  # per-step losses, lr and validation rows; no duplicated steps


@pytest.mark.parametrize("signal_step", [3, 4, MAX_STEPS])  # 4 and the last are followed by a validation, 3 is not
def test_sigterm_keeps_the_validation_of_its_step(workdir, reference, monkeypatch, signal_step):
    """SIGTERM during step N saves after N's validation when one follows, so the resumed run's metrics.csv (val rows
    included) equals the uninterrupted run's."""
    from zoo.reliability import PreemptedError

    run = workdir / f"sigterm-at-{signal_step}"
    original = ZooLightningModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == signal_step - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the step finishes
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ZooLightningModule, "training_step", training_step)
    with pytest.raises(PreemptedError):
        train(load_recipe("transformer_small", _overrides(run, workdir / "data")))
    monkeypatch.setattr(ZooLightningModule, "training_step", original)
    assert load_checkpoint_file(find_resume_point(run, "auto").path)["global_step"] == signal_step
    summary = train(load_recipe("transformer_small", [*_overrides(run, workdir / "data"), "resume=auto"]))
    assert _rows(run) == _rows(reference)
    expected = json.loads((reference / "summary.json").read_text())  # resumed at the last step: its validation kept
    assert (summary["steps"], summary["val_loss"], summary["train_loss"]) == pytest.approx(
        (expected["steps"], expected["val_loss"], expected["train_loss"]), rel=1e-6)


def test_resume_auto_skips_a_truncated_checkpoint_and_says_so(workdir, reference, tmp_path):
    ckpts = checkpoint_files(reference / "ckpt")
    assert [p.name for p in ckpts] == ["step-0000010.ckpt", "step-0000008.ckpt"]  # the two latest are kept
    for p in ckpts:
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        (tmp_path / "ckpt" / p.name).write_bytes(p.read_bytes())
    newest = tmp_path / "ckpt" / "step-0000010.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    point = find_resume_point(tmp_path, "auto")
    assert point.path.name == "step-0000008.ckpt" and point.step == 8
    assert len(point.skipped) == 1 and "step-0000010.ckpt" in point.skipped[0] and "truncated or corrupt" in point.skipped[0]
    with pytest.raises(CheckpointError, match="step-0000010.ckpt.*truncated or corrupt"):
        load_checkpoint_file(newest)
    newest.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="step-0000010.ckpt"):
        load_checkpoint_file(newest)
    assert find_resume_point(tmp_path / "nothing-here", "auto") is None


def test_checkpoints_load_weights_only_and_pickled_code_is_refused(reference, tmp_path):
    checkpoint = torch.load(reference / "ckpt" / "step-0000010.ckpt", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    assert {"ZooDataModule", "callbacks", "optimizer_states", "lr_schedulers"} <= set(checkpoint)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": ZooLightningModule}, evil)  # a class: needs full unpickling
    with pytest.raises(CheckpointError, match="evil.ckpt.*refusing to load"):
        load_checkpoint_file(evil)


def test_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 4}
    io.save_checkpoint(good, tmp_path / "step-0000004.ckpt")

    def full_disk(obj, f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on the device while writing .*step-0000008.ckpt"):
        io.save_checkpoint({"state_dict": {}, "global_step": 8}, tmp_path / "step-0000008.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004.ckpt"]
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-0000004.ckpt"]
    assert io.load_checkpoint(tmp_path / "step-0000004.ckpt")["global_step"] == 4


def test_hf_export_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "hf"
    with atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "model.safetensors").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_corrupt_hf_export_names_the_file(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    export = tmp_path / "hf"
    export.mkdir()
    for p in (reference / "hf").iterdir():
        (export / p.name).write_bytes(p.read_bytes())
    AutoModelForCausalLM.from_pretrained(export)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for loader in (ZooForCausalLM, AutoModelForCausalLM):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
            loader.from_pretrained(export)


def test_unwritable_output_dir_is_a_config_error(tmp_path, monkeypatch):
    """The write probe fails as on a read-only directory (a chmod cannot show it: tests run as root, whom it does not
    stop)."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", denied)
    with pytest.raises(ConfigError, match="output_dir: .* is not writable: Permission denied"):
        ensure_writable_dir(tmp_path / "run")


def test_trim_metrics_keeps_rows_before_the_resume_step(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss\n1,5.0\n2,4.9\n3,4.8\n4,4.")  # last row cut by a kill
    assert trim_metrics(path, 3) == 2
    assert path.read_text().splitlines() == ["step,train_loss", "1,5.0", "2,4.9"]


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    full = ResumableBatchSampler(22, 4, seed=3)
    epoch0 = list(full)
    assert len(epoch0) == 5 and len(set(sum(epoch0, []))) == 20 and sum(epoch0, []) != list(range(20))  # shuffled
    full.set_epoch(1)
    assert list(full) != epoch0
    resumed = ResumableBatchSampler(22, 4, seed=3)
    resumed.resume(epoch=0, batches_done=2)
    assert list(resumed) == epoch0[2:]
    assert list(resumed) == epoch0  # the skip applies once
    ranks = [list(ResumableBatchSampler(22, 4, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks[0] == epoch0[0:4:2] and ranks[1] == epoch0[1:4:2]


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss / gradients
# ----------------------------------------------------------------------------------------------------------------


def _inject_nan(monkeypatch, bad_steps: set[int], seen: list):
    """Make the LM loss NaN on the given (1-based) optimizer steps; record (step, params, Adam moments) per call."""
    original = ZooLightningModule.loss_and_output

    def patched(self, batch, batch_idx=None):
        loss, out = original(self, batch, batch_idx)
        if not self.training:
            return loss, out
        step = self.trainer.global_step + 1
        state = self.trainer.optimizers[0].state
        moments = [s["exp_avg"].clone() for s in state.values()] if state else []
        seen.append((step, [p.detach().clone() for p in self.parameters()], moments, self))
        return (loss * float("nan") if step in bad_steps else loss), out

    monkeypatch.setattr(ZooLightningModule, "loss_and_output", patched)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("before", ["default", "custom"])
def test_training_in_process_leaves_the_sigterm_handler_as_it_found_it(workdir, before):
    """zoo.train installs SIGTERM handlers for the run (Lightning's and PreemptionCheckpoint's); afterwards the
    process's own is back. A leftover one that only sets a flag made the process ignore SIGTERM, so a
    multiprocessing.Pool forked later (lm-eval's bootstrap) hung forever in terminate()."""
    def custom(signum, frame):
        pass

    found = signal.signal(signal.SIGTERM, custom if before == "custom" else signal.SIG_DFL)
    try:
        train(load_recipe("transformer_small", _overrides(workdir / f"handler-{before}", workdir / "data", **{"trainer.max_steps": 2})))
        assert signal.getsignal(signal.SIGTERM) is (custom if before == "custom" else signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGTERM, found)


def test_nonfinite_raise_stops_with_the_step_and_parameters_untouched(workdir, monkeypatch):
    seen = []
    _inject_nan(monkeypatch, {3}, seen)
    run = workdir / "nan-raise"
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3.*parameters were not updated"):
        train(load_recipe("transformer_small", _overrides(run, workdir / "data", **{"trainer.max_steps": 4})))
    step, params_before, _, module = seen[-1]
    assert step == 3 and _same(params_before, [p.detach() for p in module.parameters()])


def test_nonfinite_skip_leaves_params_and_moments_and_logs_a_column(workdir, monkeypatch):
    seen = []
    _inject_nan(monkeypatch, {3}, seen)
    run = workdir / "nan-skip"
    train(load_recipe("transformer_small", _overrides(run, workdir / "data", **{"trainer.max_steps": 5, "trainer.nonfinite": "skip"})))
    by_step = {step: (params, moments) for step, params, moments, _ in seen}
    assert _same(by_step[3][0], by_step[4][0]) and _same(by_step[3][1], by_step[4][1])  # step 3 changed nothing
    assert not _same(by_step[4][0], by_step[5][0])  # step 4 trained again
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["nonfinite_skips"]) for r in rows if r["train_loss"]] == [0, 0, 1, 1, 1]


def test_nonfinite_skip_stops_after_max_consecutive(workdir, monkeypatch):
    _inject_nan(monkeypatch, {2, 3, 4, 5}, [])
    run = workdir / "nan-stop"
    overrides = _overrides(run, workdir / "data", **{"trainer.max_steps": 6, "trainer.nonfinite": "skip", "trainer.max_nonfinite_skips": 2})
    with pytest.raises(NonFiniteError, match="step 3 .*: 2 consecutive non-finite steps"):
        train(load_recipe("transformer_small", overrides))


# ----------------------------------------------------------------------------------------------------------------
# Bad model inputs, through the generic model, for every registered block
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", MIXERS.names())
def test_bad_inputs_raise_value_errors_naming_the_problem(block):
    model = ZooForCausalLM(ZooConfig.from_model_config(ModelConfig(d_model=64, n_layers=1, blocks=[block], vocab_size=50)))
    ids = torch.randint(0, 50, (2, 8))
    assert model(input_ids=ids).logits.shape == (2, 8, 50)
    with pytest.raises(ValueError, match=r"input_ids: expected an integer tensor, got torch.float32"):
        model(input_ids=ids.float())
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[batch, seq_len\], got \[8\]"):
        model(input_ids=ids[0])
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[batch, seq_len\], got \[2, 8, 1\]"):
        model(input_ids=ids[..., None])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\), got values in \[\d+, 50\]"):
        model(input_ids=torch.cat([ids, torch.full((2, 1), 50)], 1))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\), got values in \[-1, "):
        model(input_ids=torch.cat([ids, torch.full((2, 1), -1)], 1))
    with pytest.raises(ValueError, match=r"inputs_embeds: expected a floating-point tensor, got torch.int64"):
        model(inputs_embeds=torch.zeros(2, 8, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"inputs_embeds: expected shape \[batch, seq_len, 64\], got \[2, 8, 16\]"):
        model(inputs_embeds=torch.zeros(2, 8, 16))
