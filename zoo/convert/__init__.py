"""Converters from Hugging Face checkpoints to zoo models. Key maps are declarative: regex -> replacement."""
from __future__ import annotations

import re
from typing import Mapping

import torch


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str], source: str) -> dict[str, torch.Tensor]:
    """Rename every key of ``state_dict`` by the first regex of ``key_map`` that matches it in full.

    A key no pattern matches is an error: silently dropping weights would give a model that only looks converted.
    """
    patterns = [(re.compile(pattern), replacement) for pattern, replacement in key_map.items()]
    out = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in patterns:
            if pattern.fullmatch(key):
                out[pattern.sub(replacement, key)] = tensor
                break
        else:
            raise KeyError(f"{source} weight '{key}' has no zoo counterpart in the key map")
    return out


def load_converted(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load converted weights strictly, naming what is missing or left over."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise KeyError(f"{source} -> zoo: missing zoo weights {missing}, unexpected weights {unexpected}")
