"""LoRA fine-tuning of a trained checkpoint with PEFT (a recipe's ``finetune:`` section).

``zoo.train`` with ``finetune: {init_from: DIR, lora: {...}}`` loads the base model from DIR (a Hugging Face
directory written by ``zoo.train`` or ``zoo.convert``), checks the recipe's model section against it, wraps it with
PEFT LoRA adapters (``target_modules`` for nn.Linear projections of every block, ``target_parameters`` for bare
parameters such as the MoE experts' stacked ``w_gate/w_up/w_down``), trains only the adapters, and saves them in
PEFT format to ``<output_dir>/adapter``: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR),
adapter_dir)`` loads them, and ``python -m zoo.merge`` folds them into a plain checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from zoo.config import LoRAConfig, ModelConfig, Recipe
from zoo.errors import ConfigError
from zoo.modeling import ZooConfig, ZooForCausalLM
from zoo.training import ZooLightningModule
from zoo.typed import describe_differences, differences


def peft_lora_config(lora: LoRAConfig, model: torch.nn.Module) -> LoraConfig:
    """PEFT's LoraConfig for a recipe's ``finetune.lora`` section, applied to ``model``."""
    names = [name for name, _ in model.named_modules()]
    # Only exclusions that name a module of this model (PEFT warns about the others).
    exclude = [e for e in lora.exclude_modules if any(n == e or n.endswith(f".{e}") for n in names)]
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules=lora.target_modules if lora.target_modules else [],
        target_parameters=list(lora.target_parameters) or None, exclude_modules=exclude or None,
    )


def checkpoint_model_config(init_from: str | Path) -> ModelConfig:
    """The zoo model config of the checkpoint ``init_from``; a clear error if it is missing or not a zoo model."""
    path = Path(init_from)
    if not (path / "config.json").is_file():
        raise ConfigError(
            "finetune.init_from",
            f"'{path}' is not a Hugging Face checkpoint directory (no config.json); train the base first "
            "(python -m zoo.train recipe=NAME writes <output_dir>/hf) or convert one (python -m zoo.convert)",
        )
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, ZooConfig):
        raise ConfigError("finetune.init_from", f"'{path}' holds a {config.model_type} model; convert it first: python -m zoo.convert {path} OUT_DIR")
    return config.model_config()


def check_lora_targets(lora: LoRAConfig, base: ModelConfig, init_from: str | Path) -> None:
    """``finetune.lora`` must target something in the base: PEFT wraps the base built on the meta device (no weights)."""
    from peft.utils.error import NoMatchingPeftModuleError

    with torch.device("meta"):
        model = ZooForCausalLM.from_spec(base)
        try:
            get_peft_model(model, peft_lora_config(lora, model))
        except NoMatchingPeftModuleError as err:
            key = "target_parameters" if lora.target_parameters and "target_parameters" in str(err) else "target_modules"
            raise ConfigError(f"finetune.lora.{key}", f"{err} (the base {init_from}: blocks {base.blocks}, ffn {base.ffn})") from None


def check_compatible(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """The recipe's model section and tokenizer must match the checkpoint's (an error names every differing key)."""
    init_from = recipe.finetune.init_from
    base = checkpoint_model_config(init_from)
    found = differences(recipe.model.to_dict(), base.to_dict(), "model")
    if found:
        raise ConfigError(
            found[0][0], f"the recipe's model differs from the checkpoint {init_from}: "
            f"{describe_differences(found, 'in the recipe', 'in the checkpoint')}; fine-tuning keeps the base architecture",
        )
    check_lora_targets(recipe.finetune.lora, base, init_from)
    path = Path(init_from)
    if (path / "tokenizer.json").is_file() and AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError("data.tokenizer", f"the data tokenizer differs from the checkpoint's ({init_from}); use the tokenizer the base was trained with")


class LoRALightningModule(ZooLightningModule):
    """Causal LM training of LoRA adapters on a checkpoint: the base weights are frozen, only adapters train."""

    def __init__(self, recipe: Recipe, special_tokens: dict[str, int] | None = None):
        super().__init__(recipe, special_tokens)
        self.model = get_peft_model(self.model, peft_lora_config(recipe.finetune.lora, self.model))

    def build_model(self, config: ZooConfig) -> PreTrainedModel:
        return ZooForCausalLM.from_pretrained(self.recipe.finetune.init_from)


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Write the adapter in PEFT format (adapter_config.json, adapter_model.safetensors) and the tokenizer."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
