"""Hugging Face Mamba / Mamba-2 -> zoo ``mamba`` / ``mamba2`` models (pre-norm mixer + residual, no FFN)."""
from __future__ import annotations

import math

from zoo.convert import convert_state_dict, converted_model, zoo_config
from zoo.modeling import ZooConfig, ZooForCausalLM

_SHARED = {
    r"backbone\.embeddings\.weight": "model.embed.weight",
    r"backbone\.norm_f\.weight": "model.norm.weight",
    r"lm_head\.weight": "lm_head.weight",
    r"backbone\.layers\.(\d+)\.norm\.weight": r"model.layers.\1.mixer_norm.weight",
}

MAMBA_KEY_MAP = {
    **_SHARED,
    r"backbone\.layers\.(\d+)\.mixer\.(in_proj|x_proj|dt_proj|out_proj|conv1d)\.(weight|bias)": r"model.layers.\1.mixer.\2.\3",
    r"backbone\.layers\.(\d+)\.mixer\.(A_log|D)": r"model.layers.\1.mixer.\2",
}

MAMBA2_KEY_MAP = {
    **_SHARED,
    r"backbone\.layers\.(\d+)\.mixer\.(in_proj|out_proj|conv1d|norm)\.(weight|bias)": r"model.layers.\1.mixer.\2.\3",
    r"backbone\.layers\.(\d+)\.mixer\.(A_log|D|dt_bias)": r"model.layers.\1.mixer.\2",
}


def _check_common(hf_config) -> None:
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act '{hf_config.hidden_act}' is not supported (zoo's mamba blocks use silu)")


def _zoo_config(hf_config, block: str, block_args: dict) -> ZooConfig:
    spec = {"blocks": [block], "ffn": "none", "norm_eps": hf_config.layer_norm_epsilon, block: block_args}
    return zoo_config(spec, hf_config, block)


def mamba_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an HF ``MambaConfig``; unsupported features are an error, never ignored."""
    _check_common(hf_config)
    if hf_config.intermediate_size != hf_config.expand * hf_config.hidden_size:
        raise ValueError(f"intermediate_size {hf_config.intermediate_size} != expand * hidden_size; zoo derives d_inner from expand")
    return _zoo_config(
        hf_config,
        "mamba",
        {
            "d_state": hf_config.state_size,
            "d_conv": hf_config.conv_kernel,
            "expand": int(hf_config.expand),
            "dt_rank": int(hf_config.time_step_rank),
            "conv_bias": bool(hf_config.use_conv_bias),
            "bias": bool(hf_config.use_bias),
        },
    )


def mamba2_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an HF ``Mamba2Config``; unsupported features are an error, never ignored."""
    _check_common(hf_config)
    d_inner = int(hf_config.expand * hf_config.hidden_size)
    if hf_config.num_heads * hf_config.head_dim != d_inner:
        raise ValueError(f"num_heads * head_dim = {hf_config.num_heads * hf_config.head_dim} != expand * hidden_size = {d_inner}")
    low, high = hf_config.time_step_limit
    return _zoo_config(
        hf_config,
        "mamba2",
        {
            "d_state": hf_config.state_size,
            "d_conv": hf_config.conv_kernel,
            "expand": int(hf_config.expand),
            "head_dim": hf_config.head_dim,
            "n_groups": hf_config.n_groups,
            "chunk_size": hf_config.chunk_size,
            "conv_bias": bool(hf_config.use_conv_bias),
            "bias": bool(hf_config.use_bias),
            "norm_eps": hf_config.layer_norm_epsilon,
            "dt_limit_min": float(low),
            "dt_limit_max": None if math.isinf(high) else float(high),
        },
    )


def from_mamba(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an HF ``MambaForCausalLM``."""
    return converted_model(hf_model, mamba_config_to_zoo(hf_model.config), lambda state: convert_state_dict(state, MAMBA_KEY_MAP, "Mamba"), "Mamba")


def from_mamba2(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an HF ``Mamba2ForCausalLM``."""
    return converted_model(
        hf_model, mamba2_config_to_zoo(hf_model.config), lambda state: convert_state_dict(state, MAMBA2_KEY_MAP, "Mamba2"), "Mamba2",
    )
