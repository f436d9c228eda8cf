"""Hugging Face Llama (and Mistral without sliding windows) -> zoo ``attention`` model."""
from __future__ import annotations

from zoo.config import ModelConfig
from zoo.convert import convert_state_dict, load_converted
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
    model = ModelConfig.from_dict(
        {
            "d_model": hf_config.hidden_size,
            "n_layers": hf_config.num_hidden_layers,
            "blocks": ["attention"],
            "ffn": "swiglu",
            "vocab_size": hf_config.vocab_size,
            "norm_eps": hf_config.rms_norm_eps,
            "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
            "attention": {
                "n_heads": hf_config.num_attention_heads,
                "n_kv_heads": hf_config.num_key_value_heads,
                "head_dim": head_dim,
                "rope_theta": _rope_theta(hf_config),
                "bias": bool(getattr(hf_config, "attention_bias", False)),
            },
            "swiglu": {"hidden_size": hf_config.intermediate_size},
        },
        "llama",
    )
    return ZooConfig.from_model_config(
        model, bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id, pad_token_id=hf_config.pad_token_id
    )


def from_llama(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an HF ``LlamaForCausalLM``."""
    model = ZooForCausalLM(llama_config_to_zoo(hf_model.config))
    state = convert_state_dict(hf_model.state_dict(), LLAMA_KEY_MAP, "Llama")
    load_converted(model, state, "Llama")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.to(hf_model.dtype)
