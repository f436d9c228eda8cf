"""``python -m zoo.train recipe=NAME [key.path=value ...] [--print]``: train a recipe with Lightning.

Writes ``<output_dir>/recipe.yaml`` (resolved), ``metrics.csv``, ``ckpt/`` (Lightning checkpoints) and ``hf/``
(a Hugging Face directory); ``trainer.logger`` adds Lightning loggers (csv, tensorboard, wandb) under ``logs/``. ``--print`` prints the resolved recipe and exits without training.
Recipe errors exit with code 2 before any model is built.

``resume=auto`` continues from the newest loadable checkpoint in ``<output_dir>/ckpt`` (model, optimizer, scheduler,
RNG and data position; ``metrics.csv`` is continued), ``resume=PATH`` from that file. On SIGTERM the current step
finishes, a checkpoint is saved and the process exits with code 75; rerun with ``resume=auto``.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

from zoo.cli import ArgumentParser, run_main, split_recipe_args
from zoo.config import Recipe
from zoo.recipe_loader import load_recipe

USAGE = "usage: python -m zoo.train recipe=NAME [key.path=value ...] [--print]"


def parse_args(argv: list[str]) -> tuple[str, list[str], bool]:
    """Split the command line into (recipe name, overrides, print-only)."""
    parser = ArgumentParser(prog="python -m zoo.train", usage=USAGE[len("usage: "):], description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="recipe=NAME, then key.path=value overrides")
    parser.add_argument("--print", "--print-recipe", dest="print_only", action="store_true", help="print the resolved recipe and exit")
    args = parser.parse_args(argv)
    recipe, overrides = split_recipe_args(args.settings, USAGE)
    return recipe, overrides, args.print_only


LOGGER_EXTRAS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # logger -> modules, any of which serves


def make_loggers(recipe: Recipe, out) -> list:
    """Lightning loggers named by ``trainer.logger``, writing under ``<output_dir>/logs``. A logger whose optional
    extra is not installed raises a ConfigError naming the extra."""
    import importlib.util

    from lightning.pytorch import loggers

    from zoo.errors import ConfigError

    made = []
    for i, name in enumerate(recipe.trainer.logger):
        modules = LOGGER_EXTRAS.get(name, ())
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"trainer.logger[{i}]", f"{name} is not installed; pip install 'zoo[{name}]'")
        if name == "csv":
            logger = loggers.CSVLogger(save_dir=out / "logs", name="csv", version="")
        elif name == "tensorboard":
            logger = loggers.TensorBoardLogger(save_dir=out / "logs", name="tensorboard", version="", default_hp_metric=False)
        else:
            logger = loggers.WandbLogger(save_dir=str(out / "logs"), name=recipe.name, project="zoo")
        made.append(logger)
    return made


def check_strategy(recipe: Recipe) -> None:
    """Lightning's FSDP strategies need CUDA: refuse them on a CPU run with the recipe key, before anything is built."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy

    from zoo.errors import ConfigError

    trainer = recipe.trainer
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if trainer.strategy in FSDPStrategy.get_registered_strategies() and on_cpu:
        raise ConfigError(
            "trainer.strategy", f"{trainer.strategy} needs CUDA (Lightning's FSDP refuses the CPU); on CPU use ddp, "
            "or shard with torch's FSDP2 (torch.distributed.fsdp.fully_shard) in your own loop"
        )


RESUME_SECTIONS = ("model", "objective", "finetune")  # what a checkpoint's weights depend on


def check_resume_fits(recipe: Recipe, resume) -> None:
    """Refuse to resume from a checkpoint trained with another model: a ConfigError at ``resume`` naming every
    differing key of :data:`RESUME_SECTIONS` (the checkpoint keeps its resolved recipe; see ``saved_recipe``)."""
    from zoo.errors import ConfigError
    from zoo.typed import describe_differences, differences

    if resume.recipe is None:
        return
    ours = recipe.to_dict()
    found = [d for key in RESUME_SECTIONS for d in differences(ours.get(key), resume.recipe.get(key), key)]
    if found:
        raise ConfigError(
            "resume", f"{resume.path} was trained with a different model: {describe_differences(found, 'here', 'in the checkpoint')}; "
            "resume with the recipe it was trained with, or start a fresh run (drop resume, or use another output_dir)",
        )


def build_trainer(recipe: Recipe, out: Path):
    """``(make_trainer, metrics)``: the Trainer's callbacks, loggers and precision plugin are built (and checked) now,
    the Trainer itself when ``make_trainer()`` is called."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoo.precision import precision_plugin, resolve_precision
    from zoo.reliability import AtomicCheckpointIO, NonFiniteGuard, PreemptionCheckpoint, RNGStateCheckpoint
    from zoo.training import MetricsCSV

    cfg = recipe.trainer
    metrics = MetricsCSV(out / "metrics.csv", cfg.log_every, ["nonfinite_skips"] if cfg.nonfinite == "skip" else [])
    # After every validation (so its metrics row is in the checkpoint); the 2 latest are kept, so resume=auto can fall
    # back to the older one when the newer is unreadable.
    checkpoint = ModelCheckpoint(
        dirpath=out / "ckpt", filename="step-{step:07d}", auto_insert_metric_name=False,
        save_on_train_epoch_end=False, save_top_k=2, monitor="step", mode="max",
    )
    nonfinite = NonFiniteGuard(cfg.nonfinite, cfg.max_nonfinite_skips)
    loggers = make_loggers(recipe, out)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    amp = precision_plugin(precision, cfg.accelerator, cfg.strategy)

    def make_trainer() -> L.Trainer:
        return L.Trainer(
            max_steps=cfg.max_steps,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,
            precision=None if amp else precision,
            gradient_clip_val=cfg.grad_clip or None,
            accumulate_grad_batches=cfg.accumulate_grad_batches,
            val_check_interval=cfg.val_every * cfg.accumulate_grad_batches,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            logger=loggers or False,
            log_every_n_steps=cfg.log_every,
            callbacks=[metrics, RNGStateCheckpoint(), nonfinite, PreemptionCheckpoint(out / "ckpt", cfg.val_every), checkpoint],
            plugins=[AtomicCheckpointIO(), *([amp] if amp else [])],
            use_distributed_sampler=False,  # ZooDataModule's resumable sampler shards batches across ranks itself
            enable_progress_bar=cfg.progress_bar,
            default_root_dir=str(out),
        )

    return make_trainer, metrics


def check_inputs(recipe: Recipe, trainer, layout, data, out: Path):
    """``(recipe with its vocabulary size, tokenizer, resume point or None)``, every input checked: the resume point
    (agreed by all ranks), the checkpoint's recipe, the fine-tuning base and the data source."""
    from zoo.distributed import agree_on_resume
    from zoo.errors import ConfigError
    from zoo.reliability import CheckpointError

    try:
        resume = agree_on_resume(trainer, layout, out, recipe.resume)
    except CheckpointError as err:
        raise ConfigError("resume", str(err)) from None
    tokenizer = data.load_tokenizer()
    recipe = recipe.with_vocab_size(len(tokenizer))
    if resume is not None:
        check_resume_fits(recipe, resume)
    if recipe.finetune is not None:
        from zoo.finetune import check_compatible

        check_compatible(recipe, tokenizer)
    data.check_source()
    return recipe, tokenizer, resume


def build_module(recipe: Recipe, tokenizer):
    """The LightningModule of the recipe's objective: diffusion, LoRA fine-tuning or causal LM."""
    special = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if recipe.objective == "diffusion":
        from zoo.training import DiffusionLightningModule

        return DiffusionLightningModule(recipe, {**special, "mask_token_id": tokenizer.mask_token_id})
    if recipe.finetune is not None:
        from zoo.finetune import LoRALightningModule

        return LoRALightningModule(recipe, special)
    from zoo.training import ZooLightningModule

    return ZooLightningModule(recipe, special)


def write_run_files(recipe: Recipe, trainer, out: Path, metrics_path: Path, resume) -> None:
    """Global rank 0's start of a run: ``recipe.yaml``, the loggers' hyperparameters, ``metrics.csv`` removed (a
    fresh run) or trimmed to the resume step."""
    from zoo.reliability import trim_metrics

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    for logger in trainer.loggers:
        logger.log_hyperparams(recipe.to_dict())
    if resume is None:
        metrics_path.unlink(missing_ok=True)
    else:
        trim_metrics(metrics_path, resume.step)
        print(f"zoo.train: resuming from {resume.path} (step {resume.step})", file=sys.stderr)


def fit(recipe: Recipe, trainer, module, data, resume, metrics) -> float:
    """Train (then validate once more if the last step was not a validation step); returns the seconds taken."""
    import torch

    if recipe.trainer.compile:
        module.model = torch.compile(module.model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning cannot see that ZooDataModule's sampler resumes mid-epoch (it is restored through the datamodule).
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(module, datamodule=data, ckpt_path=str(resume.path) if resume else None)  # SIGTERM: PreemptedError
    if trainer.global_step % recipe.trainer.val_every:
        trainer.validate(module, datamodule=data, verbose=False)
    metrics.close()
    return time.perf_counter() - start


def last_logged(trainer, metrics_path: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The latest value of each of ``keys``: from this process's metrics, else (a run resumed at its last step, whose
    final validation ran before the checkpoint) from the last ``metrics.csv`` row that has it."""
    import csv

    found = {k: float(trainer.callback_metrics[k]) for k in keys if k in trainer.callback_metrics}
    missing = [k for k in keys if k not in found]
    if missing and metrics_path.exists():
        for row in reversed(list(csv.DictReader(metrics_path.open()))):
            for k in [k for k in missing if row.get(k)]:
                found[k] = float(row[k])
                missing.remove(k)
    if "val_loss" not in found:
        raise RuntimeError(f"zoo.train: no validation loss for the summary, neither this run's nor in {metrics_path}")
    return found


def finish(recipe: Recipe, trainer, module, data, tokenizer, out: Path, seconds: float) -> dict:
    """Global rank 0's end of a run: the export (``hf/``, or ``adapter/`` for LoRA) and ``summary.json``."""
    from zoo.training import export_hf

    model = module.model._orig_mod if recipe.trainer.compile else module.model
    if recipe.finetune is not None:
        from zoo.finetune import save_adapter

        export_dir = save_adapter(model, tokenizer, out / "adapter")
    else:
        export_dir = export_hf(model, tokenizer, out / "hf")
    stats = data.stats()
    logged = last_logged(trainer, out / "metrics.csv", ("val_loss", "val_acc", "train_loss"))
    val_loss, train_loss = logged["val_loss"], logged.get("train_loss")
    summary = {
        "recipe": recipe.name,
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        **({"val_acc": logged["val_acc"]} if "val_acc" in logged else {}),
        "unigram_entropy": stats.unigram_entropy,
        "tokens_per_s": trainer.global_step * recipe.data.batch_size * recipe.data.seq_len * trainer.world_size
        * recipe.trainer.accumulate_grad_batches / seconds,
        "train_tokens_in_corpus": stats.train_tokens,
        "hf_dir": str(export_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"zoo.train: {recipe.name}: {summary['steps']} steps in {seconds:.0f}s, val_loss {val_loss:.4f} nats "
        f"(ppl {summary['val_ppl']:.2f}; unigram entropy {stats.unigram_entropy:.4f}), "
        f"{summary['tokens_per_s']:.0f} tokens/s; Hugging Face export in {export_dir}"
    )
    return summary


def train(recipe: Recipe) -> dict:
    """Train ``recipe``; returns the run summary (also written to ``<output_dir>/summary.json``; ``{}`` on ranks
    other than global rank 0)."""
    import lightning as L
    import torch

    from zoo.data import ZooDataModule
    from zoo.distributed import coordinate, launched_by_cluster
    from zoo.errors import ConfigError
    from zoo.reliability import ensure_writable_dir

    check_strategy(recipe)
    if Path(recipe.output_dir).exists() and not Path(recipe.output_dir).is_dir():
        raise ConfigError("output_dir", f"'{recipe.output_dir}' is a file; expected a directory (made if missing)")
    out = Path(recipe.output_dir)
    data = ZooDataModule(recipe.data, seed=recipe.seed)
    make_trainer, metrics = build_trainer(recipe, out)
    # Under a launcher that starts every process (torchrun, srun) the ranks agree on directories, tokenizer and resume
    # point before the checks below; one process checks first, so a refused run prints nothing of Lightning's.
    trainer = make_trainer() if launched_by_cluster() else None
    layout = coordinate(trainer, data, out, recipe.trainer.num_nodes)
    recipe, tokenizer, resume = check_inputs(recipe, trainer, layout, data, out)
    # Every input is checked: only now is the run directory made.
    out = ensure_writable_dir(recipe.output_dir)
    trainer = trainer or make_trainer()
    for reason in resume.skipped if resume and trainer.is_global_zero else []:
        print(f"zoo.train: resume=auto: skipped unusable checkpoint {reason}", file=sys.stderr)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    module = build_module(recipe, tokenizer)
    if trainer.is_global_zero:
        write_run_files(recipe, trainer, out, metrics.path, resume)
    seconds = fit(recipe, trainer, module, data, resume, metrics)
    return finish(recipe, trainer, module, data, tokenizer, out, seconds) if trainer.is_global_zero else {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        name, overrides, print_only = parse_args(argv)
        recipe = load_recipe(name, overrides)
        if print_only:
            print(recipe.to_yaml(), end="")
            return 0
        from zoo.reliability import PREEMPTED_EXIT_CODE, PreemptedError

        try:
            train(recipe)
        except PreemptedError as err:
            print(f"zoo.train: {err}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        return 0

    return run_main("zoo.train", body)


if __name__ == "__main__":
    sys.exit(main())
