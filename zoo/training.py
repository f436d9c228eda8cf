"""Lightning pieces: the causal and masked-diffusion LightningModules, the metrics.csv writer, and the Hugging Face export."""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from zoo.reliability.io import atomic_directory
from zoo.reliability.resume import RECIPE_KEY
from zoo.config import Recipe
from zoo.diffusion import diffusion_nelbo, sample_times
from zoo.errors import ZooError
from zoo.layers.moe import moe_modules
from zoo.modeling import ZooConfig, ZooForCausalLM, ZooForMaskedLM, causal_lm_loss, set_activation_checkpointing
from zoo.noise import NoiseSchedule
from zoo.precision import resolve_fused
from zoo.synthetic import answer_accuracy, no_recall_floor
from zoo.typed import to_dict


def lr_lambda(step: int, warmup: int, max_steps: int, min_ratio: float, name: str) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_batch(batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs [B, T], targets [B, T])`` from a packed window batch ``[B, T + 1]`` or a synthetic task's pair."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:]
    inputs, targets = batch
    return inputs, targets


def document_positions(inputs: torch.Tensor, targets: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.packing: documents``: the ``position_ids [B, T]`` that make the model run each document of a
    concatenated window apart (a document begins at the window's start and after each ``eos``; positions count from 0
    in each) and the targets without the ones that cross a boundary (an ``eos`` input predicting the next document's
    first token: -100). A document cut by the window's edge continues in the next window as a document of its own."""
    ends = inputs == eos  # [B, T]
    begins = torch.ones_like(ends)
    begins[:, 1:] = ends[:, :-1]
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)  # [B, T]
    first = torch.where(begins, index, 0).cummax(dim=1).values  # [B, T]: where each position's document begins
    return index - first, targets.masked_fill(ends, -100)


class ZooLightningModule(L.LightningModule):
    """Causal LM training of a :class:`ZooForCausalLM` built from a recipe."""

    def __init__(self, recipe: Recipe, special_tokens: dict[str, int] | None = None):
        super().__init__()
        self.recipe = recipe
        config = ZooConfig.from_model_config(recipe.model, **(special_tokens or {}))
        self.model = self.build_model(config)
        set_activation_checkpointing(self.model, recipe.trainer.activation_checkpointing)
        self.moe_layers = [i for i, layer in enumerate(self.model.model.layers) if moe_modules([layer])]
        self._val_acc_floor: float | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resolved recipe (a plain dict) in every checkpoint: a resume checks its model against it."""
        checkpoint[RECIPE_KEY] = self.recipe.to_dict()

    def build_model(self, config: ZooConfig) -> PreTrainedModel:
        """The model this module trains (subclasses with another objective build another head)."""
        return ZooForCausalLM(config)

    def metric_columns(self) -> list[str]:
        """Logged metrics beyond the standard ones that ``metrics.csv`` gets columns for (task accuracy, MoE router metrics)."""
        return [*self.task_columns(), *self.router_columns()]

    def router_columns(self) -> list[str]:
        """MoE router metrics logged by :meth:`log_router_metrics`."""
        if not self.moe_layers:
            return []
        per_layer = [f"moe/load_max_over_mean/layer{i}" for i in self.moe_layers]
        return ["train_aux_loss", "train_z_loss", "moe/load_max_over_mean", *per_layer]

    def task_columns(self) -> list[str]:
        """Synthetic tasks log the accuracy on answer positions; MQAR also its no-recall floor (``val_acc_floor``)."""
        if self.recipe.data.task is None:
            return []
        return ["train_acc", "val_acc", "val_acc_floor"] if self.recipe.data.source == "mqar" else ["train_acc", "val_acc"]

    def _log_no_recall_floor(self) -> None:
        """MQAR: log :func:`zoo.synthetic.no_recall_floor` of the validation samples (computed on the first validation)."""
        if self.recipe.data.source != "mqar" or self.trainer.sanity_checking:
            return
        if self._val_acc_floor is None:
            samples = self.trainer.val_dataloaders.dataset  # TaskSamples: every validation sample evaluated
            self._val_acc_floor = no_recall_floor(samples.inputs.numpy(), samples.targets.numpy(), self.recipe.data.task)
        self.log("val_acc_floor", self._val_acc_floor)

    def _log_answer_accuracy(self, name: str, logits: torch.Tensor, batch, **kwargs: Any) -> None:
        if self.recipe.data.task is None:
            return
        accuracy, count = answer_accuracy(logits, split_batch(batch)[1])
        if count:
            self.log(name, accuracy, batch_size=count, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def loss_and_output(self, batch, batch_idx: int | None = None) -> tuple[torch.Tensor, Any]:
        """The objective's loss on ``batch`` and the model output it came from (a training step adds its MoE router
        loss). ``batch_idx`` is given on validation batches (an objective that draws noise fixes it from there)."""
        inputs, targets = split_batch(batch)  # [B, T] each
        packing = {}
        if self.recipe.data.packing == "documents":
            packing["position_ids"], targets = document_positions(inputs, targets, self.model.config.eos_token_id)
        out = self.model(input_ids=inputs, use_cache=False, **packing)
        return causal_lm_loss(out.logits, targets), out

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | dict[str, torch.Tensor]:
        loss, out = self.loss_and_output(batch)
        self.log("train_loss", loss, prog_bar=True)
        self._log_answer_accuracy("train_acc", out.logits.detach(), batch)
        if not self.moe_layers:
            return loss
        # MoE: optimize the objective + router losses; train_loss stays the objective's, comparable with val_loss.
        self.log_router_metrics(out)
        return {"loss": loss + out.router_loss, "lm_loss": loss.detach()}

    def log_router_metrics(self, out) -> None:
        """Router losses and expert load balance of an MoE model's training output (``aux_loss``, ``z_loss``, ``expert_load``)."""
        self.log("train_aux_loss", out.aux_loss)
        self.log("train_z_loss", out.z_loss)
        if (self.trainer.global_step + 1) % self.recipe.trainer.log_every == 0:
            load = out.expert_load  # [n_moe_layers, E], fractions of routed tokens
            ratio = load.max(-1).values / load.mean(-1)  # [n_moe_layers]
            self.log("moe/load_max_over_mean", ratio.mean())
            for i, r in zip(self.moe_layers, ratio):
                self.log(f"moe/load_max_over_mean/layer{i}", r)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, out = self.loss_and_output(batch, batch_idx)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=split_batch(batch)[0].shape[0])
        self._log_answer_accuracy("val_acc", out.logits, batch, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_no_recall_floor()
        val_loss = self.trainer.callback_metrics.get("val_loss")
        if val_loss is not None:
            self.log("val_ppl", torch.exp(val_loss.float()), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.recipe.optimizer
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        fused = resolve_fused(opt.fused, decay + no_decay)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused,
        )
        sched = self.recipe.scheduler
        max_steps = self.recipe.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, sched.warmup_steps, max_steps, sched.min_lr_ratio, sched.name)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DiffusionLightningModule(ZooLightningModule):
    """Trains a :class:`ZooForMaskedLM` on the masked-diffusion NELBO (:mod:`zoo.diffusion`); shares the steps, the
    optimizer and the scheduler with the causal module. ``val_loss`` is the NELBO per token on the same validation
    windows the causal recipes score (their targets, ``window[1:]``), with times and masks drawn from a fixed seed per
    batch so steps compare."""

    def __init__(self, recipe: Recipe, special_tokens: dict[str, int] | None = None):
        if (special_tokens or {}).get("mask_token_id") is None:
            raise ZooError("objective: diffusion needs a tokenizer with a mask token (mask_token_id)")
        self.diffusion = recipe.diffusion
        super().__init__(recipe, special_tokens)
        self.schedule = NoiseSchedule(self.diffusion.schedule, self.diffusion.eps)
        self.mask_id = self.model.config.mask_token_id

    def build_model(self, config: ZooConfig) -> ZooForMaskedLM:
        settings = to_dict(self.diffusion)
        settings["sampling"]["context_length"] = settings["sampling"]["context_length"] or self.recipe.data.seq_len
        config.diffusion = settings
        return ZooForMaskedLM(config)

    def metric_columns(self) -> list[str]:
        return self.router_columns()

    def loss_and_output(self, batch, batch_idx: int | None = None) -> tuple[torch.Tensor, Any]:
        if not isinstance(batch, torch.Tensor):
            raise ZooError("objective: diffusion trains on packed text windows; this data source yields (inputs, targets) pairs")
        generator = None
        if batch_idx is not None:
            generator = torch.Generator(device=batch.device).manual_seed(self.recipe.seed * 100003 + batch_idx)
        x = batch[:, 1:]  # [B, T]: the tokens a causal model predicts from these windows
        t = sample_times(x.shape[0], self.diffusion.t_min, self.diffusion.antithetic, generator, x.device)
        positions = None
        if self.recipe.data.packing == "documents":  # each document of the window denoised apart
            positions = document_positions(x, x, self.model.config.eos_token_id)[0]
        return diffusion_nelbo(self.model, x, self.schedule, self.mask_id, t, generator=generator, position_ids=positions)


class MetricsCSV(L.Callback):
    """Writes ``metrics.csv``: one row per logged optimizer step (step, train_loss, lr, tokens_per_s, val_loss, val_ppl,
    then the module's ``metric_columns()``, e.g. MoE router metrics, at their value on the logged step).

    ``train_loss`` is the mean LM loss over the steps since the previous row, averaged over the ranks of a distributed
    run. Only global rank 0 writes; rows are flushed as they are written.
    """

    COLUMNS = ["step", "train_loss", "lr", "tokens_per_s", "val_loss", "val_ppl"]

    def __init__(self, path: Path, log_every: int, extra_columns: list[str] | tuple[str, ...] = ()):
        self.path = Path(path)
        self.log_every = log_every
        self.extra_columns = list(extra_columns)  # logged metrics given columns besides the module's (nonfinite_skips)
        self._row: dict[str, Any] | None = None
        self._losses: list[float] = []
        self._tokens = 0
        self._t0 = 0.0
        self._val_t0 = 0.0
        self._last_step = -1
        self._file = None
        self._writer = None
        self._extra: list[str] = []

    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is None and trainer.is_global_zero:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._extra = [*self.extra_columns, *getattr(pl_module, "metric_columns", list)()]
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.COLUMNS + self._extra)
            if new:
                self._writer.writeheader()

    def _flush_row(self) -> None:
        if self._row is not None and self._writer is not None:
            self._writer.writerow(self._row)
            self._file.flush()
        self._row = None

    def state_dict(self) -> dict[str, Any]:
        """The row not yet written and the losses since the last row: a resumed run continues them."""
        return {"row": dict(self._row or {}), "losses": list(self._losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._row = dict(state_dict["row"]) or None
        self._losses = list(state_dict["losses"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)
        self._t0 = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += split_batch(batch)[0].numel() * trainer.world_size
        loss = (outputs.get("lm_loss", outputs["loss"]) if isinstance(outputs, dict) else outputs).detach()
        if trainer.world_size > 1:  # the loss of the whole batch (every rank's part), as one process would log it
            loss = trainer.strategy.reduce(loss.clone(), reduce_op="mean")
        self._losses.append(float(loss))
        step = trainer.global_step
        if step == self._last_step or step % self.log_every:
            return
        self._last_step = step
        elapsed = time.perf_counter() - self._t0
        self._flush_row()
        self._row = {
            "step": step,
            "train_loss": f"{sum(self._losses) / len(self._losses):.6f}",
            "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.6e}",
            "tokens_per_s": f"{self._tokens / elapsed:.1f}" if elapsed > 0 else "",
            "val_loss": "",
            "val_ppl": "",
            **self._logged(trainer),
        }
        self._losses, self._tokens, self._t0 = [], 0, time.perf_counter()

    def _logged(self, trainer: L.Trainer) -> dict[str, str]:
        metrics = trainer.callback_metrics
        # Validation metrics (val_acc) go on validation rows only.
        return {key: f"{float(metrics[key]):.6f}" if key in metrics and not key.startswith("val_") else "" for key in self._extra}

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._t0 += time.perf_counter() - self._val_t0  # validation time does not count against training throughput
        self._open(trainer, pl_module)
        metrics = trainer.callback_metrics
        if "val_loss" not in metrics:
            return
        step = trainer.global_step
        if self._row is None or self._row["step"] != step:
            self._flush_row()
            self._row = {"step": step, "train_loss": "", "lr": "", "tokens_per_s": "", "val_loss": "", "val_ppl": ""}
            self._row.update({key: "" for key in self._extra})
        self._row["val_loss"] = f"{float(metrics['val_loss']):.6f}"
        self._row["val_ppl"] = f"{math.exp(float(metrics['val_loss'])):.4f}"
        self._row.update({key: f"{float(metrics[key]):.6f}" for key in self._extra if key.startswith("val_") and key in metrics})

    def close(self) -> None:
        self._flush_row()
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush_row()

    def on_fit_end(self, trainer, pl_module) -> None:
        """Also a run resumed at its last step (no training batch, no ``on_train_start``) writes the row it restored."""
        self._open(trainer, pl_module)
        self._flush_row()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()


def export_hf(model: ZooForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Write a plain Hugging Face directory: config.json, model.safetensors, tokenizer files, generation_config.json."""
    out_dir = Path(out_dir)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        max_new_tokens=64,
    )
    with atomic_directory(out_dir) as tmp:  # written beside out_dir, then renamed over it
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
