"""Per-GPU training memory of a recipe, estimated on meta tensors (nothing is allocated, no GPU needed).

``python -m benchmarks.memory_estimate [recipe=NAME] [key.path=value ...] [--batch B] [--gpus 8,64] [--out FILE]``;
the default is a ~1B dense Transformer (``transformer_small`` with :data:`ONE_B`) at 4 x 2048 tokens per GPU.

The model is built on the meta device and cast to bf16 (autocast does not act on meta tensors, so bf16-mixed
activations are modelled by bf16 weights); a training forward and the loss run under
``torch.autograd.graph.saved_tensors_hooks``, which see every tensor autograd keeps for the backward (counted once per
storage, parameters left out). Attention runs as GPUs run it, through the flash kernel's op (q, k, v, output and
log-sum-exp saved; on meta tensors ``scaled_dot_product_attention`` would take the math path, which keeps the
T x T probabilities). Per configuration:

- model states: fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes a parameter; DDP adds its fp32
  gradient buckets (Lightning's default copies gradients into them: 4 bytes a parameter); FSDP (full shard) divides the
  16 bytes by the GPUs and adds the bf16 weights of the two largest layers it gathers at once (one computing, one
  prefetched);
- activations without checkpointing: everything saved for the backward; with ``trainer.activation_checkpointing=all``:
  what is saved outside the layers, every layer's input, and one layer's activations again while it is recomputed.

Not counted: the CUDA context and kernels' workspaces, the allocator's fragmentation, the backward's temporaries. An
estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from zoo.modeling import ResidualLayer, ZooForCausalLM, causal_lm_loss, set_activation_checkpointing
from zoo.recipe_loader import load_recipe

ONE_B = [
    "model.d_model=2048", "model.n_layers=20", "model.attention.n_heads=16", "model.attention.n_kv_heads=4",
    "model.vocab_size=32000", "data.seq_len=2048",
]
GiB = 2**30


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` through the flash kernel's op (its meta function saves what the GPU kernel saves)."""
    if attn_mask is not None:
        raise NotImplementedError("memory_estimate models causal or full attention only (no explicit mask)")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


def saved_bytes(model: ZooForCausalLM, batch: int, seq_len: int) -> dict[str, float]:
    """Bytes autograd keeps for the backward of one training forward + loss, on meta tensors: ``total``, the part
    kept by the layers (``layers``, a list, one entry per layer) and the layers' inputs (``layer_inputs``)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    per_layer, inputs, marks = [], 0, []

    def before(layer, args):
        nonlocal inputs
        inputs += args[0].untyped_storage().nbytes()
        marks.append(sum(seen.values()))

    def after(layer, args, output):
        per_layer.append(sum(seen.values()) - marks.pop())

    layers = [m for m in model.modules() if isinstance(m, ResidualLayer)]
    hooks = [h for m in layers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    dtype = next(model.parameters()).dtype
    embeds = torch.empty(batch, seq_len, model.config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    targets = torch.empty(batch, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa):
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            causal_lm_loss(logits, targets)
    finally:
        for hook in hooks:
            hook.remove()
    return {"total": sum(seen.values()), "layers": per_layer, "layer_inputs": inputs}


def estimate(overrides: list[str], batch: int, gpus: list[int], recipe: str = "transformer_small") -> dict:
    """GiB per GPU for DDP and FSDP over each of ``gpus``, without and with activation checkpointing."""
    r = load_recipe(recipe, overrides)
    with torch.device("meta"):
        model = ZooForCausalLM.from_spec(r.model).to(torch.bfloat16)
    model.train()
    set_activation_checkpointing(model, "none")
    saved = saved_bytes(model, batch, r.data.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    layer_params = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, ResidualLayer))
    outside = saved["total"] - sum(saved["layers"])
    activations = {"none": saved["total"], "all": outside + saved["layer_inputs"] + max(saved["layers"])}
    states = {"DDP": 16 * n_params + 4 * n_params, **{f"FSDP x{n}": 16 * n_params / n + 2 * 2 * layer_params for n in gpus}}
    rows = [
        {"strategy": name, "checkpointing": mode, "model_states_gib": s / GiB, "activations_gib": a / GiB, "total_gib": (s + a) / GiB}
        for name, s in states.items() for mode, a in activations.items()
    ]
    return {"parameters": n_params, "batch": batch, "seq_len": r.data.seq_len, "overrides": overrides, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"Estimate computed on meta tensors (not a measurement): {result['parameters'] / 1e9:.2f}B parameters, "
        f"{result['batch']} x {result['seq_len']} tokens per GPU, bf16 activations, fp32 weights + AdamW; "
        "FSDP xN: fully sharded over N GPUs in all.",
        "",
        "| strategy | activation checkpointing | weights + grads + AdamW | activations | total per GPU |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['strategy']} | {row['checkpointing']} | {row['model_states_gib']:.1f} GiB | "
            f"{row['activations_gib']:.1f} GiB | {row['total_gib']:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_estimate", description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="recipe=NAME, then key.path=value overrides (default: the ~1B Transformer)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--gpus", default="8,64", help="GPUs FSDP shards over, comma-separated")
    args = parser.parse_args(argv)
    recipe = next((s.split("=", 1)[1] for s in args.settings if s.startswith("recipe=")), "transformer_small")
    overrides = [s for s in args.settings if not s.startswith("recipe=")] or ONE_B
    print(markdown(estimate(overrides, args.batch, [int(g) for g in args.gpus.split(",")], recipe)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
