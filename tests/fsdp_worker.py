"""One rank of tests/test_fsdp_cpu.py, launched by ``torch.distributed.run`` (gloo, CPU).

Lightning refuses ``strategy=fsdp`` without CUDA, so this shards a zoo model with torch's FSDP2 (``fully_shard``
per residual layer, then the root) directly. Every rank builds the same model from the recipe (same seed) and keeps
an unsharded copy that trains on the whole batch, as a DDP run (or one process) would; the sharded model trains on
this rank's half. Rank 0 writes the gathered full state dicts as Hugging Face directories (``step0``, ``trained``)
and ``result.json`` with the largest differences to the unsharded model.
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from zoo.layers import ResidualLayer
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.recipe_loader import load_recipe

STEPS = 3
BATCH = 4  # split in halves across the two ranks


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def largest_difference(state: dict[str, torch.Tensor], reference: torch.nn.Module) -> float:
    expected = reference.state_dict()
    assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))
    return max(float((state[k].float() - expected[k].float()).abs().max()) for k in state)


def main(recipe_name: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(recipe_name, ["model.d_model=64", "model.n_layers=2", "model.vocab_size=256"])
    torch.manual_seed(0)
    model = ZooForCausalLM(ZooConfig.from_model_config(recipe.model))
    reference = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, ResidualLayer):
            fully_shard(module)
    fully_shard(model)
    step0 = full_state(model)
    result = {"world": world, "step0_max_diff": largest_difference(step0, reference)}
    if rank == 0:
        reference.save_pretrained(out / "step0", state_dict=step0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (BATCH, 17), generator=generator)  # the same batch on every rank
        half = ids.chunk(world)[rank]  # [BATCH / world, 17]: this rank's rows
        loss = model(input_ids=half[:, :-1], labels=half[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        full = reference(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        full.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append((float(mean) / world, float(full)))
    trained = full_state(model)
    result.update(trained_max_diff=largest_difference(trained, reference), losses=losses)
    if rank == 0:
        reference.save_pretrained(out / "trained", state_dict=trained)
        (out / "result.json").write_text(json.dumps(result))
    # Both ranks tear the group down together: a rank that destroys it while its peer is still writing the export
    # aborted in gloo's teardown once in ~40 CI runs ("terminate called without an active exception", SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
