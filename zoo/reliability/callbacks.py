"""Lightning callbacks for reliable training: RNG state in checkpoints, SIGTERM preemption, non-finite steps."""
from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from zoo.errors import ZooError

logger = logging.getLogger("zoo")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on SIGTERM after saving a checkpoint; rerun with resume=auto


class PreemptedError(ZooError):
    """Training stopped on SIGTERM after saving a checkpoint at a step boundary."""

    def __init__(self, step: int, checkpoint: Path):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint}; continue with resume=auto")


class NonFiniteError(ZooError):
    """A NaN/Inf loss or gradient norm under ``trainer.nonfinite``'s policy stopped training."""


class RNGStateCheckpoint(L.Callback):
    """Puts the Python, NumPy and torch (CPU and CUDA) RNG states in every checkpoint and restores them when training
    resumes, so random draws after a resume match an uninterrupted run. Stored as tensors and ints only, so the
    checkpoint stays loadable with ``weights_only=True``."""

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, py_state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._to_restore = self._to_restore, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM: finish the current optimizer step, save ``<dirpath>/step-NNNNNNN-sigterm.ckpt``, raise
    :class:`PreemptedError` (no validation or export runs after it).

    The signal handler only sets a flag (it replaces Lightning's, which would stop without saving); the checkpoint is
    written in ``on_train_batch_end`` at a step boundary, or after the validation when that step is followed by one
    (every ``val_every`` optimizer steps), so a resumed run does not lose that validation.
    """

    def __init__(self, dirpath: str | Path, val_every: int | None = None):
        self.dirpath = Path(dirpath)
        self.val_every = val_every
        self.received = False
        self._previous_handler: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            self.received = trainer.strategy.reduce_boolean_decision(self.received, all=False)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not self.received or not stepped:
            return
        if self.val_every and trainer.global_step % self.val_every == 0:
            return  # validation runs next: save after it, in on_validation_end
        self._save_and_stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received and trainer.state.fn == "fit":
            self._save_and_stop(trainer)

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        path = self.dirpath / f"step-{trainer.global_step:07d}-sigterm.ckpt"
        trainer.save_checkpoint(path)
        raise PreemptedError(trainer.global_step, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put back the handler found at ``on_train_start``, only while ours is installed: Lightning's own teardown
        runs first and restores the process's original handler, which re-installing Lightning's (the one found) would
        undo, leaving a handler that ignores SIGTERM (a forked ``multiprocessing.Pool`` worker then never exits)."""
        if self._previous_handler is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None


class NonFiniteGuard(L.Callback):
    """Checks the loss and the gradient norm before every optimizer step.

    ``policy="raise"``: a NaN/Inf stops training with :class:`NonFiniteError` naming the step; parameters and optimizer
    state are untouched (with fp16's GradScaler only the loss is checked: the scaler handles overflowing gradients).
    ``policy="skip"``: the update is skipped (all gradients set to None, so the optimizer leaves
    parameters and moments alone; the LR schedule still advances), ``nonfinite_skips`` (the running total) is logged,
    and ``max_consecutive`` skipped steps in a row raise :class:`NonFiniteError`.
    """

    def __init__(self, policy: Literal["raise", "skip"] = "raise", max_consecutive: int = 10):
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite = True

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        loss_finite, self._loss_finite = self._loss_finite, True
        # fp16 with a GradScaler: overflowing gradients are the scaler's business (it skips them and lowers the scale).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad = not loss_finite or (scaler is None and not bool(torch.isfinite(grad_norm)))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        step = trainer.global_step + 1  # the step this update would complete
        what = f"non-finite {'loss' if not loss_finite else 'gradient norm'} at step {step} (grad norm {float(grad_norm):.4g})"
        if bad and self.policy == "raise":
            raise NonFiniteError(f"{what}; parameters were not updated (trainer.nonfinite=raise; use skip to skip such steps)")
        if bad:
            self.skipped += 1
            self.consecutive += 1
            optimizer.zero_grad(set_to_none=True)
            logger.warning("%s: update skipped (%d in a row, %d in all)", what, self.consecutive, self.skipped)
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteError(f"{what}: {self.consecutive} consecutive non-finite steps (trainer.max_nonfinite_skips={self.max_consecutive}); stopping")
        else:
            self.consecutive = 0
        if self.policy == "skip":
            pl_module.log("nonfinite_skips", float(self.skipped))
