"""Hugging Face Qwen3-Next -> zoo ``gated_deltanet`` + ``attention`` hybrid with ``moe`` (or ``swiglu``) FFNs.

Layer ``i`` runs ``gated_deltanet`` where ``config.layer_types[i]`` is ``linear_attention`` and ``attention`` where
it is ``full_attention`` (the model's block pattern is the whole list). The attention is Qwen3-Next's: output gate,
zero-centred per-head q/k RMSNorm, partial RoPE; every RMSNorm of the model is zero-centred (``1 + weight``). MoE
layers have one gated shared expert of ``shared_expert_intermediate_size`` = ``shared_experts * moe_intermediate_size``.
Gated DeltaNet weights are split by :func:`zoo.layers.gated_deltanet.weights_from_qwen3_next`, experts by
:func:`zoo.convert.mixtral.stack_experts`. Settings zoo cannot reproduce are refused with the reason.
"""
from __future__ import annotations

import re

import torch

from zoo.convert import convert_state_dict, converted_model, zoo_config
from zoo.convert.mixtral import MIXTRAL_KEY_MAP, stack_experts
from zoo.layers.gated_deltanet import GatedDeltaNetConfig, weights_from_qwen3_next
from zoo.modeling import ZooConfig, ZooForCausalLM

BLOCKS = {"linear_attention": "gated_deltanet", "full_attention": "attention"}

QWEN3_NEXT_KEY_MAP = {
    **MIXTRAL_KEY_MAP,  # embeddings, norms, q/k/v/o, dense MLPs, router, stacked experts
    r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight": r"model.layers.\1.mixer.\2_norm.weight",
    r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight": r"model.layers.\1.ffn.shared.\2_proj.weight",
    r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight": r"model.layers.\1.ffn.shared_gate.weight",
    r"model\.layers\.(\d+)\.linear_attn\.(.+)": r"model.layers.\1.mixer.\2",  # regrouped by split_linear_attention
}

_MIXER = re.compile(r"(model\.layers\.(\d+)\.mixer\.)(.+)")


def split_linear_attention(state: dict[str, torch.Tensor], layers: set[int], config: GatedDeltaNetConfig) -> dict[str, torch.Tensor]:
    """The Gated DeltaNet mixers' weights of ``layers`` (renamed ``linear_attn`` keys) in zoo's split layout."""
    out, parts = {}, {}
    for key, tensor in state.items():
        m = _MIXER.fullmatch(key)
        if m is not None and int(m.group(2)) in layers:
            parts.setdefault(m.group(1), {})[m.group(3)] = tensor
        else:
            out[key] = tensor
    for prefix, hf_state in parts.items():
        out.update({prefix + name: t for name, t in weights_from_qwen3_next(hf_state, config).items()})
    return out


def _refuse_unsupported(hf_config) -> None:
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act '{hf_config.hidden_act}' is not supported (zoo's swiglu and experts use silu)")
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is not supported: Qwen3-Next's gated q_proj is converted without biases")
    if hf_config.num_experts and not getattr(hf_config, "norm_topk_prob", True):
        raise ValueError("norm_topk_prob=False is not supported: zoo's softmax_topk router renormalizes the top-k weights")
    if hf_config.num_experts and hf_config.shared_expert_intermediate_size % hf_config.moe_intermediate_size:
        raise ValueError(
            f"shared_expert_intermediate_size={hf_config.shared_expert_intermediate_size} is not a multiple of "
            f"moe_intermediate_size={hf_config.moe_intermediate_size} (zoo's shared expert is shared_experts * expert_hidden)"
        )
    unknown = sorted(set(hf_config.layer_types) - set(BLOCKS))
    if unknown:
        raise ValueError(f"layer_types {unknown} have no zoo block; known: {', '.join(BLOCKS)}")


def _rope(hf_config) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of default RoPE; other rope types are refused."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type '{params['rope_type']}' is not supported by zoo's attention block (only default RoPE)")
    return float(params["rope_theta"]), float(params.get("partial_rotary_factor", 1.0))


def _ffn_pattern(hf_config) -> list[str]:
    """Each layer's FFN: ``moe`` where transformers builds a sparse MoE block, else ``swiglu``."""
    sparse_step, dense = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or [])
    return ["moe" if i not in dense and hf_config.num_experts > 0 and (i + 1) % sparse_step == 0 else "swiglu"
            for i in range(hf_config.num_hidden_layers)]


def gated_deltanet_config(hf_config) -> GatedDeltaNetConfig:
    return GatedDeltaNetConfig(
        n_k_heads=hf_config.linear_num_key_heads, n_v_heads=hf_config.linear_num_value_heads,
        head_k_dim=hf_config.linear_key_head_dim, head_v_dim=hf_config.linear_value_head_dim,
        d_conv=hf_config.linear_conv_kernel_dim, norm_eps=hf_config.rms_norm_eps,
    )


def qwen3_next_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an HF Qwen3NextConfig; unsupported features are an error, never ignored."""
    _refuse_unsupported(hf_config)
    theta, partial = _rope(hf_config)
    eps = hf_config.rms_norm_eps
    ffns = _ffn_pattern(hf_config)
    gdn = gated_deltanet_config(hf_config)
    spec = {
        "blocks": [BLOCKS[t] for t in hf_config.layer_types],
        "ffn": ffns,
        "norm": "rmsnorm_zero_centred",
        "norm_eps": eps,
        "attention": {
            "n_heads": hf_config.num_attention_heads, "n_kv_heads": hf_config.num_key_value_heads,
            "head_dim": hf_config.head_dim, "rope_theta": theta, "partial_rotary_factor": partial,
            "output_gate": True, "qk_norm": "rmsnorm_zero_centred", "qk_norm_eps": eps,
        },
        "gated_deltanet": {k: getattr(gdn, k) for k in ("n_k_heads", "n_v_heads", "head_k_dim", "head_v_dim", "d_conv", "norm_eps")},
    }
    if "moe" in ffns:
        spec["moe"] = {
            "num_experts": hf_config.num_experts, "top_k": hf_config.num_experts_per_tok,
            "expert_hidden": hf_config.moe_intermediate_size, "router": "softmax_topk",
            "shared_experts": hf_config.shared_expert_intermediate_size // hf_config.moe_intermediate_size,
            "shared_expert_gate": True, "aux_loss_coef": float(hf_config.router_aux_loss_coef), "z_loss_coef": 0.0,
        }
    if "swiglu" in ffns:
        spec["swiglu"] = {"hidden_size": hf_config.intermediate_size}
    return zoo_config(spec, hf_config, "qwen3_next")


def from_qwen3_next(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an HF ``Qwen3NextForCausalLM`` (its multi-token-prediction ``mtp`` weights,
    which transformers does not load either, are not converted)."""
    config = qwen3_next_config_to_zoo(hf_model.config)
    linear = {i for i, t in enumerate(hf_model.config.layer_types) if t == "linear_attention"}
    gdn = gated_deltanet_config(hf_model.config)

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed = stack_experts(convert_state_dict(state, QWEN3_NEXT_KEY_MAP, "Qwen3-Next"))
        return split_linear_attention(renamed, linear, gdn)

    return converted_model(hf_model, config, convert, "Qwen3-Next")
