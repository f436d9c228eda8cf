"""Hugging Face Llama (and Mistral without sliding windows) -> zoo ``attention`` model."""
from __future__ import annotations

from zoo.convert import convert_state_dict, converted_model, zoo_config
from zoo.modeling import ZooConfig, ZooForCausalLM

LLAMA_KEY_MAP = {
    r"model\.embed_tokens\.weight": "model.embed.weight",
    r"model\.norm\.weight": "model.norm.weight",
    r"lm_head\.weight": "lm_head.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"model.layers.\1.mixer_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"model.layers.\1.ffn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)": r"model.layers.\1.mixer.\2_proj.\3",
    r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight": r"model.layers.\1.ffn.\2_proj.weight",
}


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type '{params['rope_type']}' is not supported by zoo's attention block (only default RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the Llama config names no rope_theta")
    return float(theta)


def llama_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an HF LlamaConfig/MistralConfig; unsupported features are an error, never ignored."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act '{hf_config.hidden_act}' is not supported (zoo's swiglu uses silu)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by zoo's swiglu")
    if getattr(hf_config, "sliding_window", None):
        raise ValueError("sliding-window attention is not supported by zoo's attention block")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    spec = {
        "blocks": ["attention"],
        "ffn": "swiglu",
        "norm_eps": hf_config.rms_norm_eps,
        "attention": {
            "n_heads": hf_config.num_attention_heads,
            "n_kv_heads": hf_config.num_key_value_heads,
            "head_dim": head_dim,
            "rope_theta": _rope_theta(hf_config),
            "bias": bool(getattr(hf_config, "attention_bias", False)),
        },
        "swiglu": {"hidden_size": hf_config.intermediate_size},
    }
    return zoo_config(spec, hf_config, "llama")


def from_llama(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an HF ``LlamaForCausalLM``."""
    return converted_model(
        hf_model, llama_config_to_zoo(hf_model.config), lambda state: convert_state_dict(state, LLAMA_KEY_MAP, "Llama"), "Llama",
    )
