"""``python -m zoo.merge --base DIR --adapter DIR --out DIR``: fold a LoRA adapter into its base model.

The base is a Hugging Face directory (``zoo.train``'s ``hf/`` or ``zoo.convert``'s output), the adapter a PEFT
directory (``<output_dir>/adapter`` of a ``finetune:`` recipe). OUT gets a plain checkpoint (config.json,
model.safetensors, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads without PEFT.
"""
from __future__ import annotations

import sys
from pathlib import Path

from zoo.cli import ArgumentParser, run_parsed
from zoo.errors import ZooError


def merge_leftover_adapters(model):
    """Merge and unwrap LoRA layers that ``merge_and_unload`` left in place.

    peft 0.21 leaves the adapter of a module that sits inside a ``target_parameters`` wrapper (an MoE router
    ``ffn.gate`` under the experts' ParamWrappers) unmerged, which would save ``gate.base_layer.weight`` and
    ``lora_A/B`` keys a plain model cannot load.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model


def check_adapter_fits(base_dir: Path, adapter_dir: Path) -> None:
    """Refuse an adapter trained on another base, before loading any weights: the model section of the adapter run's
    ``recipe.yaml`` (beside ``adapter/``) against the base's config, every differing key named; without that recipe,
    each LoRA matrix's shape against the base's module it adapts (built on the meta device)."""
    import torch
    import yaml
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.modeling import ZooConfig
    from zoo.typed import describe_differences, differences

    config = AutoConfig.from_pretrained(base_dir)
    recipe = adapter_dir.parent / "recipe.yaml"
    if isinstance(config, ZooConfig) and recipe.is_file():
        trained = (yaml.safe_load(recipe.read_text()) or {}).get("model")
        found = differences(trained, config.model_config().to_dict(), "model")
        if found:
            raise ZooError(
                f"--adapter '{adapter_dir}' does not fit --base '{base_dir}': "
                f"{describe_differences(found, 'in the adapter recipe ' + str(recipe), 'in the base')}; merge it into the base it was trained on"
            )
        return
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with torch.device("meta"):
        modules = dict(AutoModelForCausalLM.from_config(config).named_modules())
    with safe_open(str(weights), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    for key, shape in shapes.items():
        name, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        module = modules.get(name)
        if module is None:
            raise ZooError(f"--adapter '{adapter_dir}' does not fit --base '{base_dir}': it adapts {name}, which the base does not have")
        want = {"A.weight": getattr(module, "in_features", None), "B.weight": getattr(module, "out_features", None)}.get(kind)
        got = shape[1] if kind == "A.weight" else shape[0]
        if want is not None and got != want:
            raise ZooError(
                f"--adapter '{adapter_dir}' does not fit --base '{base_dir}': {key} has {got} features where the base's "
                f"{name} has {want}; merge it into the base it was trained on"
            )


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Load base + adapter, merge the LoRA weights into the base weights and save the plain model to ``out_dir``."""
    import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise ZooError(f"--base '{base_dir}' is not a Hugging Face checkpoint directory (no config.json)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ZooError(f"--adapter '{adapter_dir}' is not a PEFT adapter directory (no adapter_config.json)")
    check_adapter_fits(base_dir, adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    merged = merge_leftover_adapters(model.merge_and_unload())
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_dir
    if (tokenizer_dir / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m zoo.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the base model's Hugging Face directory")
    parser.add_argument("--adapter", required=True, help="the PEFT adapter directory")
    parser.add_argument("--out", required=True, help="where to write the merged checkpoint")
    return run_parsed("zoo.merge", parser, argv, lambda args: print(f"zoo.merge: wrote {merge_adapter(args.base, args.adapter, args.out)}"))


if __name__ == "__main__":
    sys.exit(main())
