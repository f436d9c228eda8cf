"""``python -m zoo.convert HF_DIR OUT_DIR``: turn a local Hugging Face checkpoint into a zoo checkpoint.

Supported ``model_type``s: llama, mistral (without sliding windows), mixtral, qwen3_next, mamba, mamba2 (transformers), and
rwkv6, rwkv7 and retnet (flash-linear-attention's ``fla-hub`` models; reading them needs fla installed); fla's gla
and transformers' kimi_linear are refused with the reason (``NOT_CONVERTED``). OUT_DIR gets config.json
(model_type "zoo"), model.safetensors, generation_config.json and the tokenizer files if HF_DIR has them; load it
with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` after ``import zoo``.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from zoo.cli import ArgumentParser, run_parsed
from zoo.convert.fla import from_fla_retnet, from_fla_rwkv6, from_fla_rwkv7
from zoo.convert.llama import from_llama
from zoo.convert.mamba import from_mamba, from_mamba2
from zoo.convert.mixtral import from_mixtral
from zoo.convert.qwen3_next import from_qwen3_next
from zoo.errors import ZooError

# config.model_type of the source checkpoint -> ("module.Class" that loads it, converter of the loaded model).
# The class is named, not looked up through the Auto classes: other packages (fla) register their own "mamba".
CONVERTERS = {
    "llama": ("transformers.LlamaForCausalLM", from_llama),
    "mistral": ("transformers.MistralForCausalLM", from_llama),
    "mixtral": ("transformers.MixtralForCausalLM", from_mixtral),
    "qwen3_next": ("transformers.Qwen3NextForCausalLM", from_qwen3_next),
    "mamba": ("transformers.MambaForCausalLM", from_mamba),
    "mamba2": ("transformers.Mamba2ForCausalLM", from_mamba2),
    "retnet": ("fla.models.RetNetForCausalLM", from_fla_retnet),
    "rwkv6": ("fla.models.RWKV6ForCausalLM", from_fla_rwkv6),
    "rwkv7": ("fla.models.RWKV7ForCausalLM", from_fla_rwkv7),
}
# model_types zoo has no converter for, and why
NOT_CONVERTED = {
    "gla": "zoo has no gated linear attention (GLA) block to map fla's GatedLinearAttention onto",
    "kimi_linear": "its full-attention layers are multi-head latent attention (MLA: keys and values through a "
    "kv_lora_rank compression), which zoo's attention block does not express, and its MoE routes by sigmoid scores "
    "with a learned bias (DeepSeek-V3's router), which zoo's moe does not; zoo's kda block matches its KDA layers",
}


def load_class(path: str, model_type: str) -> type:
    """The class ``module.Class`` that loads ``model_type`` checkpoints; a missing package is a ZooError naming it."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        package = module.split(".")[0]
        raise ZooError(f"reading a {model_type} checkpoint needs the {package} package ({err}); install it (fla: pip install flash-linear-attention)") from None


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the HF checkpoint in ``hf_dir`` and save the zoo model (and tokenizer, if any) to ``out_dir``."""
    from transformers import AutoTokenizer, GenerationConfig

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise ZooError(f"'{hf_dir}' is not a Hugging Face checkpoint directory (no config.json)")
    # Read from the file: AutoConfig knows fla's model_types only once fla is imported.
    try:
        model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ZooError(f"{hf_dir / 'config.json'} is not a JSON object: {err}") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise ZooError(f"out_dir '{out_dir}' is a file; expected a directory (made if missing)")
    if model_type in NOT_CONVERTED:
        raise ZooError(f"{hf_dir}: model_type '{model_type}' is not converted: {NOT_CONVERTED[model_type]}")
    if model_type not in CONVERTERS:
        raise ZooError(f"{hf_dir}: model_type '{model_type}' has no zoo converter; supported: {', '.join(CONVERTERS)}")
    hf_class, converter = CONVERTERS[model_type]
    hf_model = load_class(hf_class, model_type).from_pretrained(hf_dir, dtype="auto")
    try:
        model = converter(hf_model)
    except (ValueError, KeyError) as err:
        raise ZooError(f"{hf_dir}: cannot convert this {model_type} checkpoint: {err}") from None
    if (hf_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(hf_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m zoo.convert", description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", help="a local Hugging Face checkpoint directory")
    parser.add_argument("out_dir", help="where to write the zoo checkpoint")
    return run_parsed("zoo.convert", parser, argv, lambda args: print(f"zoo.convert: wrote {convert_checkpoint(args.hf_dir, args.out_dir)}"))


if __name__ == "__main__":
    sys.exit(main())
