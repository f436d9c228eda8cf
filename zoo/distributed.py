"""Ranks on more than one machine: what they agree on before training, and who writes what.

Global rank 0 writes every run output (``recipe.yaml``, ``metrics.csv``, loggers, checkpoints, ``summary.json``,
``hf/``); the other ranks write nothing under ``output_dir``. Under a launcher that starts every process itself
(torchrun, srun, or any other cluster environment Lightning detects), :func:`coordinate` brings the process group up
before the model is built (Lightning's own ``setup_environment`` call in ``fit`` finds it up and goes on), then:

- probes whether ``output_dir`` and ``data.cache_dir`` are shared (:func:`is_shared`: global rank 0 writes a file
  under a random name, every rank looks for it);
- makes the tokenizer once per shared cache, or once per node on node-local caches (the others wait at a barrier),
  and sets the data module's ``prepare_data_per_node`` the same way for Lightning's ``prepare_data`` (tokenization);
- takes ``resume=auto``'s choice from global rank 0, so every rank resumes from the same step; on node-local output
  directories global rank 0 reads the checkpoint and broadcasts it (:class:`zoo.reliability.AtomicCheckpointIO`).
"""
from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from zoo.errors import ConfigError, ZooError

PROBE_PREFIX = ".zoo-shared-probe-"


@dataclass
class Layout:
    """What the ranks of a run share. ``coordinated``: the ranks agreed on it (False for one process, and for
    processes Lightning starts itself on one machine, which share everything)."""

    coordinated: bool = False
    output_shared: bool = True
    cache_shared: bool = True


def launched_by_cluster() -> bool:
    """Whether a launcher that starts every process itself (torchrun, srun, LSF) started this one, by Lightning's own
    detection of those cluster environments (Kubeflow's cannot be detected; its runs build the trainer later)."""
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    return any(environment.detect() for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment))


def launched_externally(trainer: L.Trainer) -> bool:
    """More than one process, each started by a launcher and running the whole script from its start."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.world_size > 1 and environment is not None and not isinstance(environment, LightningEnvironment)


def is_shared(strategy, directory: Path) -> bool:
    """Whether every rank sees the same ``directory``: global rank 0 writes a random token to a file of a fresh name
    in it (so no cached lookup hides it), every rank reads it back, and all must agree."""
    token = strategy.broadcast(secrets.token_hex(8))
    probe = Path(directory) / f"{PROBE_PREFIX}{token}"
    if strategy.is_global_zero:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    strategy.barrier()
    try:
        sees = probe.read_text() == token
    except OSError:
        sees = False
    shared = strategy.reduce_boolean_decision(sees, all=True)  # every rank has read once this returns
    if strategy.is_global_zero:
        probe.unlink(missing_ok=True)
    return shared


def coordinate(trainer: L.Trainer | None, data, output_dir: Path, num_nodes: int) -> Layout:
    """Bring the process group up early under an external launcher and settle the run's :class:`Layout`; make the
    tokenizer (``data.load_tokenizer()``) on the rank that prepares data, the others after a barrier. ``trainer``
    is None where no cluster launcher started this process (:func:`launched_by_cluster`)."""
    if trainer is None or not launched_externally(trainer):
        if num_nodes > 1:
            raise ConfigError(
                "trainer.num_nodes", f"{num_nodes} machines need a launcher that starts every process (torchrun "
                "--nnodes, srun); this process was not started by one"
            )
        return Layout()
    strategy = trainer.strategy
    strategy.setup_environment()  # init_process_group; idempotent when fit calls it again
    data.cache_dir.mkdir(parents=True, exist_ok=True)
    layout = Layout(True, is_shared(strategy, output_dir), is_shared(strategy, data.cache_dir))
    data.prepare_data_per_node = not layout.cache_shared
    if strategy.is_global_zero:
        output = "shared" if layout.output_shared else "node-local"
        cache = "shared (prepared once)" if layout.cache_shared else "node-local (prepared once per machine)"
        print(
            f"zoo.train: {trainer.world_size} processes on {num_nodes} machine(s); output_dir {output} (written by "
            f"global rank 0), data.cache_dir {cache}", file=sys.stderr,
        )
    failure = None
    if strategy.is_global_zero if layout.cache_shared else trainer.local_rank == 0:
        try:
            data.load_tokenizer()
        except Exception as err:  # re-raised below, after telling the waiting ranks
            failure = err
    if strategy.reduce_boolean_decision(failure is not None, all=False):  # also the barrier the others wait at
        raise failure or ZooError("the rank preparing the tokenizer failed; its error says why")
    return layout


def agree_on_resume(trainer: L.Trainer, layout: Layout, output_dir: Path, resume: str | None):
    """The :class:`~zoo.reliability.ResumePoint` every rank resumes from: global rank 0's when the ranks are
    coordinated (a node-local ``output_dir`` holds checkpoints on rank 0's machine only); on a node-local
    ``output_dir`` the checkpoint is then read by rank 0 and broadcast."""
    from zoo.reliability import CheckpointError, find_resume_point

    if not layout.coordinated:
        return find_resume_point(output_dir, resume) if resume else None
    point, error = None, None
    if resume and trainer.is_global_zero:
        try:
            point = find_resume_point(output_dir, resume)
        except CheckpointError as err:
            error = str(err)
    point, error = trainer.strategy.broadcast((point, error))
    if error is not None:
        raise CheckpointError(error)  # on every rank, so none waits for the others
    trainer.strategy.checkpoint_io.broadcast_loads = not layout.output_shared
    return point
