"""Converters from Hugging Face checkpoints to zoo models. Key maps are declarative: regex -> replacement."""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from zoo.config import ModelConfig
from zoo.modeling import ZooConfig, ZooForCausalLM


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], key_map: Mapping[str, str], source: str, transposed: str | None = None
) -> dict[str, torch.Tensor]:
    """Rename every key of ``state_dict`` by the first regex of ``key_map`` that matches it in full; the tensors of
    the new keys that ``transposed`` (a regex) matches in full are transposed (2-D weights stored the other way).

    A key no pattern matches is an error: silently dropping weights would give a model that only looks converted.
    """
    patterns = [(re.compile(pattern), replacement) for pattern, replacement in key_map.items()]
    flip = re.compile(transposed) if transposed is not None else None
    out = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in patterns:
            if pattern.fullmatch(key):
                new_key = pattern.sub(replacement, key)
                out[new_key] = tensor.T.contiguous() if flip is not None and flip.fullmatch(new_key) else tensor
                break
        else:
            raise KeyError(f"{source} weight '{key}' has no zoo counterpart in the key map")
    return out


def stack_parts(state_dict: Mapping[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    """Stack the tensors of keys ``pattern`` matches in full (groups: the stacked key, the row index) into one
    tensor per stacked key, rows in index order, each flattened to 1-D; other keys pass through. Rows must be
    ``0..n-1`` without gaps."""
    regex = re.compile(pattern)
    out, rows = {}, {}
    for key, tensor in state_dict.items():
        match = regex.fullmatch(key)
        if match is None:
            out[key] = tensor
        else:
            rows.setdefault(match.group(1), {})[int(match.group(2))] = tensor.reshape(-1)
    for key, parts in rows.items():
        if sorted(parts) != list(range(len(parts))):
            raise KeyError(f"{key}: rows {sorted(parts)} are not 0..{len(parts) - 1}")
        out[key] = torch.stack([parts[i] for i in range(len(parts))])
    return out


def load_converted(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load converted weights strictly, naming what is missing or left over."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise KeyError(f"{source} -> zoo: missing zoo weights {missing}, unexpected weights {unexpected}")


def zoo_config(spec: dict[str, Any], hf_config, source: str) -> ZooConfig:
    """The zoo config of a model ``spec`` (a recipe's ``model`` section; errors name ``source``), its width, depth,
    vocabulary and embedding tying taken from ``hf_config`` unless ``spec`` sets them, and the special-token ids."""
    common = {
        "d_model": hf_config.hidden_size,
        "n_layers": hf_config.num_hidden_layers,
        "vocab_size": hf_config.vocab_size,
        "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
    }
    model = ModelConfig.from_dict({**common, **spec}, source)
    return ZooConfig.from_model_config(
        model, bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id, pad_token_id=hf_config.pad_token_id
    )


def converted_model(
    hf_model, config: ZooConfig, convert_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], source: str
) -> ZooForCausalLM:
    """A :class:`ZooForCausalLM` of ``config`` holding ``hf_model``'s weights renamed by ``convert_state`` (a tied
    ``lm_head`` is left to the tying), in ``hf_model``'s dtype."""
    model = ZooForCausalLM(config)
    state = hf_model.state_dict()
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    load_converted(model, convert_state(state), source)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(hf_model.dtype)
