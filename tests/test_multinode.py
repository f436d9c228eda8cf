"""Two "nodes" on one machine: two launches of ``python -m zoo.train`` with ``trainer.num_nodes=2`` (gloo, CPU), each
in its own working directory, so ``output_dir`` and ``data.cache_dir`` are node-local as on machines without shared
storage. Started by ``torchrun --nnodes 2 --node_rank {0,1}``, and by SLURM's variables as ``srun`` sets them."""
import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.errors import ConfigError
from zoo.recipe_loader import load_recipe
from zoo.train import train

STEPS = 6


def _overrides(data: Path, **extra) -> list[str]:
    """A tiny fp32 run on CPU: checkpoints and validations at steps 3 and 6, every step logged."""
    base = {
        "output_dir": "run", "model.d_model": 16, "model.n_layers": 1, "model.attention.n_heads": 2,
        "model.attention.n_kv_heads": 1, "data.source": str(data), "data.cache_dir": "cache", "data.val_fraction": 0.3,
        "data.seq_len": 16, "data.batch_size": 4, "data.val_batches": 2, "trainer.max_steps": STEPS, "trainer.val_every": 3,
        "trainer.log_every": 1, "trainer.progress_bar": False, "trainer.accelerator": "cpu", "trainer.precision": "32-true",
        "trainer.devices": 1, "trainer.strategy": "ddp", "trainer.num_nodes": 2, "scheduler.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(node: int, port: int, data: Path, *extra: str) -> list[str]:
    launch = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "zoo.train", "recipe=transformer_small", *_overrides(data), *extra]


def _run_nodes(commands: list[list[str]], nodes: list[Path], envs: list[dict[str, str]], timeout: float = 600) -> list[str]:
    """Start one process per node (each in its node's directory, output to ``<node>/log.txt``) and wait for all; when
    one fails the others are stopped (they would wait for it until the process group's timeout). Returns the logs."""
    procs = []
    for command, node, env in zip(commands, nodes, envs):
        node.mkdir(parents=True, exist_ok=True)
        with open(node / "log.txt", "w") as log:
            procs.append(subprocess.Popen(command, cwd=node, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            break
        time.sleep(0.2)
    outputs = [(node / "log.txt").read_text() for node in nodes]
    codes = [p.wait() for p in procs]
    assert codes == [0] * len(procs), "\n".join(f"node {i} exited {c}:\n{out[-3000:]}" for i, (c, out) in enumerate(zip(codes, outputs)))
    return outputs


def _rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the timing column."""
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in csv.DictReader((run / "metrics.csv").open())]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode")
    data = root / "data"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 2)
    return root


@pytest.fixture(scope="module")
def single(workdir) -> Path:
    """The same training in one process on the whole batch: two ranks of 4 windows are one batch of 8 (the sampler
    deals batch i of the 8-window run to the ranks as 4 + 4), and validation sees the same 8 windows."""
    run = workdir / "single"
    overrides = _overrides(workdir / "data", **{
        "output_dir": str(run), "data.cache_dir": str(workdir / "single-cache"), "data.batch_size": 8, "data.val_batches": 1,
        "trainer.num_nodes": 1, "trainer.strategy": "auto",
    })
    train(load_recipe("transformer_small", overrides))
    return run


@pytest.fixture(scope="module")
def two_nodes(workdir) -> tuple[list[Path], list[str]]:
    nodes = [workdir / "torchrun" / f"node{i}" for i in range(2)]
    port = _free_port()
    outputs = _run_nodes([_torchrun(i, port, workdir / "data") for i in range(2)], nodes, [_env(), _env()])
    return nodes, outputs


@pytest.mark.slow
def test_two_torchrun_nodes_train_in_lockstep_with_one_writer(workdir, single, two_nodes):
    nodes, outputs = two_nodes
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1] and "Starting with 2 processes" in outputs[0]
    assert "output_dir node-local (written by global rank 0), data.cache_dir node-local (prepared once per machine)" in outputs[0]
    run0, run1 = (n / "run" for n in nodes)
    rows, reference = _rows(run0), _rows(single)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for row, ref in zip(rows, reference, strict=True):  # the all-reduced loss of both ranks' batches = the one batch's
        for key in ("train_loss", "val_loss"):
            assert (row[key] == ref[key] == "") or abs(float(row[key]) - float(ref[key])) < 1e-5, (row, ref)
        assert row["lr"] == ref["lr"]
    assert sum(r["val_loss"] != "" for r in rows) == 2
    # one writer: every run output is on global rank 0's node, none on the other
    assert sorted(p.name for p in (run0 / "ckpt").iterdir()) == ["step-0000003.ckpt", "step-0000006.ckpt"]
    assert {p.name for p in run0.iterdir()} >= {"recipe.yaml", "metrics.csv", "summary.json", "hf", "ckpt"}
    assert [p.name for p in run1.iterdir()] == []
    assert not list(workdir.rglob(".zoo-shared-probe-*"))
    # the caches are node-local: each node tokenized the corpus once, into its own cache
    for node in nodes:
        assert len(list((node / "cache" / "tokens").glob("*/index.json"))) == 2
    two, one = load_file(run0 / "hf" / "model.safetensors"), load_file(single / "hf" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_resumed_two_node_run_continues_exactly(workdir, two_nodes):
    """Node 0 holds the step-3 checkpoint (as rank 0 wrote it), node 1 holds nothing: rank 0 chooses it, reads it and
    broadcasts it; the resumed run's metrics.csv and export equal the uninterrupted run's."""
    (run0, _), _ = two_nodes
    run0 = run0 / "run"
    nodes = [workdir / "resumed" / f"node{i}" for i in range(2)]
    (nodes[0] / "run" / "ckpt").mkdir(parents=True)
    shutil.copy(run0 / "ckpt" / "step-0000003.ckpt", nodes[0] / "run" / "ckpt")
    shutil.copy(run0 / "metrics.csv", nodes[0] / "run")
    port = _free_port()
    outputs = _run_nodes([_torchrun(i, port, workdir / "data", "resume=auto") for i in range(2)], nodes, [_env(), _env()])
    assert "(step 3)" in outputs[0] and "resuming from" in outputs[0]
    assert _rows(nodes[0] / "run") == _rows(run0)
    resumed, uninterrupted = load_file(nodes[0] / "run" / "hf" / "model.safetensors"), load_file(run0 / "hf" / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)
    assert not (nodes[1] / "run" / "hf").exists()


@pytest.mark.slow
def test_slurm_variables_resume_two_nodes_on_shared_storage(workdir, two_nodes):
    """``srun --nodes 2 --ntasks-per-node 1 python -m zoo.train ...`` as Lightning's SLURMEnvironment sees it, with
    ``output_dir`` and ``data.cache_dir`` both machines share: the cache is prepared by global rank 0 alone, every rank
    reads the step-3 checkpoint itself, and ``resume=auto`` trains steps 4-6 exactly as the torchrun run did."""
    (run0, _), _ = two_nodes
    run0 = run0 / "run"
    shared = workdir / "slurm" / "shared"
    (shared / "run" / "ckpt").mkdir(parents=True)
    shutil.copy(run0 / "ckpt" / "step-0000003.ckpt", shared / "run" / "ckpt")
    shutil.copy(run0 / "metrics.csv", shared / "run")
    port = str(_free_port())
    envs = []
    for rank in range(2):
        env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
        env.update({
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zoo",
            "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": port,
        })
        envs.append(env)
    paths = {"output_dir": str(shared / "run"), "data.cache_dir": str(shared / "cache")}
    command = [sys.executable, "-m", "zoo.train", "recipe=transformer_small", *_overrides(workdir / "data", **paths), "resume=auto"]
    outputs = _run_nodes([command, command], [workdir / "slurm" / f"node{i}" for i in range(2)], envs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1] and "(step 3)" in outputs[0]
    assert "output_dir shared (written by global rank 0), data.cache_dir shared (prepared once)" in outputs[0]
    assert len(list((shared / "cache" / "tokens").glob("*/index.json"))) == 2 and not list(workdir.rglob(".zoo-shared-probe-*"))
    assert _rows(shared / "run") == _rows(run0)
    resumed, uninterrupted = load_file(shared / "run" / "hf" / "model.safetensors"), load_file(run0 / "hf" / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)
    assert [p.parent.name for p in (workdir / "slurm").rglob("model.safetensors")] == ["hf"]


def test_num_nodes_is_validated_with_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes: .*>= 1"):
        load_recipe("transformer_small", ["trainer.num_nodes=0"])
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes"):
        load_recipe("transformer_small", ["trainer.num_nodes=two"])


def test_several_nodes_need_a_launcher(tmp_path):
    """Without torchrun or srun, Lightning would start the processes of one machine only: refused with the key."""
    recipe = load_recipe("transformer_small", [f"output_dir={tmp_path / 'run'}", "trainer.num_nodes=2", "trainer.accelerator=cpu", "trainer.devices=1"])
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes: 2 machines need a launcher"):
        train(recipe)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_memory_estimate_on_meta_tensors():
    """The README's per-GPU table: checkpointing keeps less, FSDP divides the model states, nothing is allocated."""
    from benchmarks.memory_estimate import estimate, markdown

    result = estimate(["model.d_model=64", "model.n_layers=4", "model.vocab_size=512", "data.seq_len=128"], 2, [8])
    rows = {(r["strategy"], r["checkpointing"]): r for r in result["rows"]}
    assert rows["DDP", "all"]["activations_gib"] < rows["DDP", "none"]["activations_gib"]
    assert rows["FSDP x8", "none"]["model_states_gib"] < rows["DDP", "none"]["model_states_gib"] / 4
    assert result["parameters"] > 4 * 64 * 64 * 3 and "meta tensors (not a measurement)" in markdown(result)
