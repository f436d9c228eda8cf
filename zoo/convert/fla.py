"""flash-linear-attention (fla) checkpoints -> zoo models: RWKV-7 (``fla-hub/rwkv7-*``, model_type ``rwkv7``).

fla's ``RWKV7ForCausalLM`` is RWKV-LM's x070 model: LayerNorms with bias (``ln0`` after the embedding, one before
each branch, one at the end), RWKV-7 time mixing with the value residual (layer 0 has no ``v_lora``) and the x070
channel mix. Its zoo form: ``norm: layernorm``, ``embed_norm: true``, block ``rwkv7`` (``value_residual: true``,
``group_norm_eps = head_dim * norm_eps`` as fla's ``g_norm``), FFN ``rwkv7_cmix``. fla's LoRAs are ``Linear``
pairs (``lora.0`` down, ``lora.2`` up with the bias); zoo keeps RWKV-LM's matrices (``w1 [D, r]``, ``w2 [r, D]``,
``w0`` the bias), so those weights are transposed; fla's six ``x_*`` lerp weights ``[1, 1, D]`` stack into zoo's
``x_mix [6, D]``. Unsupported settings are an error naming the setting, never ignored.
"""
from __future__ import annotations

from typing import Mapping

import torch

from zoo.convert import convert_state_dict, converted_model, stack_parts, zoo_config
from zoo.modeling import ZooConfig, ZooForCausalLM

_LAYER = r"model\.layers\.(\d+)"
_ZOO = r"model.layers.\1"

# x_mix rows of zoo's RWKV7 block, in its order (r, w, k, v, a, g).
_LERPS = "rwkvag"

FLA_RWKV7_KEY_MAP = {
    r"model\.embeddings\.weight": "model.embed.weight",
    r"model\.layers\.0\.pre_norm\.(weight|bias)": r"model.embed_norm.\1",
    rf"{_LAYER}\.attn_norm\.(weight|bias)": rf"{_ZOO}.mixer_norm.\2",
    rf"{_LAYER}\.ffn_norm\.(weight|bias)": rf"{_ZOO}.ffn_norm.\2",
    **{rf"{_LAYER}\.attn\.x_{c}": rf"{_ZOO}.mixer.x_mix.{i}" for i, c in enumerate(_LERPS)},
    rf"{_LAYER}\.attn\.(k_k|k_a|r_k)": rf"{_ZOO}.mixer.\2",
    rf"{_LAYER}\.attn\.r_proj\.weight": rf"{_ZOO}.mixer.receptance.weight",
    rf"{_LAYER}\.attn\.k_proj\.weight": rf"{_ZOO}.mixer.key.weight",
    rf"{_LAYER}\.attn\.v_proj\.weight": rf"{_ZOO}.mixer.value.weight",
    rf"{_LAYER}\.attn\.o_proj\.weight": rf"{_ZOO}.mixer.output.weight",
    rf"{_LAYER}\.attn\.([wavg])_lora\.lora\.0\.weight": rf"{_ZOO}.mixer.\g<2>1",
    rf"{_LAYER}\.attn\.([wavg])_lora\.lora\.2\.weight": rf"{_ZOO}.mixer.\g<2>2",
    rf"{_LAYER}\.attn\.([wav])_lora\.lora\.2\.bias": rf"{_ZOO}.mixer.\g<2>0",
    rf"{_LAYER}\.attn\.g_norm\.(weight|bias)": rf"{_ZOO}.mixer.ln_x.\2",
    rf"{_LAYER}\.ffn\.x_k": rf"{_ZOO}.ffn.x_k",
    rf"{_LAYER}\.ffn\.(key|value)\.weight": rf"{_ZOO}.ffn.\2.weight",
    r"model\.norm\.(weight|bias)": r"model.norm.\1",
    r"lm_head\.weight": "lm_head.weight",
}
# zoo keys whose fla tensor is the transpose (nn.Linear [out, in] -> RWKV-LM's [in, out] LoRA matrices)
FLA_RWKV7_TRANSPOSED = r"model\.layers\.\d+\.mixer\.[wavg][12]"
# zoo x_mix rows: ``<x_mix>.<row>`` keys stacked in row order into ``<x_mix>``
FLA_RWKV7_STACKED = r"(model\.layers\.\d+\.mixer\.x_mix)\.(\d)"


def rwkv7_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an fla ``RWKV7Config``; unsupported features are an error, never ignored."""
    D = hf_config.hidden_size
    if getattr(hf_config, "attn", None):
        raise ValueError(f"attn={hf_config.attn}: fla RWKV-7 models with softmax-attention layers are not supported")
    if hf_config.hidden_act != "sqrelu":
        raise ValueError(f"hidden_act '{hf_config.hidden_act}' is not supported (zoo's rwkv7_cmix uses sqrelu)")
    if not hf_config.norm_bias:
        raise ValueError("norm_bias=False is not supported (zoo's layernorm has a bias)")
    if any(v != D for v in hf_config.value_dim):
        raise ValueError(f"value_dim {hf_config.value_dim} != hidden_size {D} is not supported (zoo's rwkv7 has V = K)")
    intermediate = hf_config.intermediate_size
    if intermediate is None:
        intermediate = 32 * -(-int(D * (hf_config.hidden_ratio or 4)) // 32)  # fla's RWKV7FeedForward rounding
    spec = {
        "blocks": ["rwkv7"],
        "ffn": "rwkv7_cmix",
        "norm": "layernorm",
        "norm_eps": hf_config.norm_eps,
        "embed_norm": bool(hf_config.norm_first),
        "rwkv7": {
            "head_dim": hf_config.head_dim,
            "decay_lora_rank": hf_config.decay_low_rank_dim,
            "a_lora_rank": hf_config.a_low_rank_dim,
            "gate_lora_rank": hf_config.gate_low_rank_dim,
            "value_lora_rank": hf_config.v_low_rank_dim,
            "value_residual": True,
            "group_norm_eps": hf_config.head_dim * hf_config.norm_eps,
        },
        "rwkv7_cmix": {"hidden_size": intermediate},
    }
    return zoo_config(spec, hf_config, "rwkv7")


def convert_rwkv7_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla RWKV-7 weights under zoo's names and layouts (renamed, LoRA matrices transposed, lerps stacked)."""
    out = convert_state_dict(state, FLA_RWKV7_KEY_MAP, "fla RWKV-7", transposed=FLA_RWKV7_TRANSPOSED)
    return stack_parts(out, FLA_RWKV7_STACKED)


def from_fla_rwkv7(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an fla ``RWKV7ForCausalLM``."""
    return converted_model(hf_model, rwkv7_config_to_zoo(hf_model.config), convert_rwkv7_state_dict, "fla RWKV-7")


# fla's RWKV-6 keeps its five ddlerp mixes in the order r, w, k, v, g; zoo's (RWKV-LM's) order is w, k, v, r, g.
_RWKV6_ORDER = [1, 2, 3, 0, 4]  # zoo row i <- fla row _RWKV6_ORDER[i]

FLA_RWKV6_KEY_MAP = {
    r"model\.embeddings\.weight": "model.embed.weight",
    r"model\.layers\.0\.pre_norm\.(weight|bias)": r"model.embed_norm.\1",
    rf"{_LAYER}\.attn_norm\.(weight|bias)": rf"{_ZOO}.mixer_norm.\2",
    rf"{_LAYER}\.ffn_norm\.(weight|bias)": rf"{_ZOO}.ffn_norm.\2",
    rf"{_LAYER}\.attn\.x_proj\.0\.mu": rf"{_ZOO}.mixer.time_maa_x",
    rf"{_LAYER}\.attn\.x_proj\.0\.linear\.weight": rf"{_ZOO}.mixer.time_maa_w1",
    rf"{_LAYER}\.attn\.x_proj\.2\.weight": rf"{_ZOO}.mixer.time_maa_w2",
    rf"{_LAYER}\.attn\.x_bias": rf"{_ZOO}.mixer.time_maa",
    rf"{_LAYER}\.attn\.r_proj\.linear\.weight": rf"{_ZOO}.mixer.receptance.weight",
    rf"{_LAYER}\.attn\.k_proj\.linear\.weight": rf"{_ZOO}.mixer.key.weight",
    rf"{_LAYER}\.attn\.v_proj\.linear\.weight": rf"{_ZOO}.mixer.value.weight",
    rf"{_LAYER}\.attn\.g_proj\.linear\.weight": rf"{_ZOO}.mixer.gate.weight",
    rf"{_LAYER}\.attn\.w_proj\.linear\.lora\.0\.weight": rf"{_ZOO}.mixer.time_decay_w1",
    rf"{_LAYER}\.attn\.w_proj\.linear\.lora\.2\.weight": rf"{_ZOO}.mixer.time_decay_w2",
    rf"{_LAYER}\.attn\.w_proj\.linear\.lora\.2\.bias": rf"{_ZOO}.mixer.time_decay",
    rf"{_LAYER}\.attn\.bonus": rf"{_ZOO}.mixer.time_faaaa",
    rf"{_LAYER}\.attn\.g_norm\.(weight|bias)": rf"{_ZOO}.mixer.ln_x.\2",
    rf"{_LAYER}\.attn\.o_proj\.weight": rf"{_ZOO}.mixer.output.weight",
    rf"{_LAYER}\.ffn\.key\.mu": rf"{_ZOO}.ffn.time_maa_k",
    rf"{_LAYER}\.ffn\.receptance\.mu": rf"{_ZOO}.ffn.time_maa_r",
    rf"{_LAYER}\.ffn\.(key|receptance)\.linear\.weight": rf"{_ZOO}.ffn.\2.weight",
    rf"{_LAYER}\.ffn\.value\.weight": rf"{_ZOO}.ffn.value.weight",
    r"model\.norm\.(weight|bias)": r"model.norm.\1",
    r"lm_head\.weight": "lm_head.weight",
}
FLA_RWKV6_TRANSPOSED = r"model\.layers\.\d+\.mixer\.time_decay_w[12]"


def _rwkv6_mix_layouts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla's ddlerp weights in zoo's layout and row order: ``time_maa [5, D]`` (fla ``x_bias``), ``time_maa_w1
    [D, 5 R]`` (fla ``x_proj.0.linear.weight [5 R, D]``), ``time_maa_w2 [5, R, D]`` (fla ``x_proj.2.weight [D, 5 R]``)."""
    out = dict(state)
    for key, tensor in state.items():
        if key.endswith(".mixer.time_maa"):
            out[key] = tensor[_RWKV6_ORDER]
        elif key.endswith(".mixer.time_maa_w1"):
            five_r, D = tensor.shape
            out[key] = tensor.view(5, five_r // 5, D)[_RWKV6_ORDER].reshape(five_r, D).T.contiguous()
        elif key.endswith(".mixer.time_maa_w2"):
            D, five_r = tensor.shape
            out[key] = tensor.view(D, 5, five_r // 5).permute(1, 2, 0)[_RWKV6_ORDER].contiguous()
    return out


def rwkv6_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an fla ``RWKV6Config``; unsupported features are an error, never ignored."""
    D = hf_config.hidden_size
    if getattr(hf_config, "attn", None):
        raise ValueError(f"attn={hf_config.attn}: fla RWKV-6 models with softmax-attention layers are not supported")
    if hf_config.expand_k != 1 or hf_config.expand_v != 1:
        raise ValueError(f"expand_k={hf_config.expand_k}, expand_v={hf_config.expand_v}: zoo's rwkv6 has key and value width d_model (1, 1)")
    if D % hf_config.num_heads:
        raise ValueError(f"hidden_size {D} is not a multiple of num_heads {hf_config.num_heads}")
    if hf_config.hidden_act != "sqrelu":
        raise ValueError(f"hidden_act '{hf_config.hidden_act}' is not supported (zoo's rwkv_cmix uses sqrelu)")
    if not hf_config.norm_bias:
        raise ValueError("norm_bias=False is not supported (zoo's layernorm has a bias)")
    intermediate = hf_config.intermediate_size
    if intermediate is None:
        intermediate = 32 * -(-int(D * (hf_config.hidden_ratio or 3.5)) // 32)  # fla's RWKV6FeedForward rounding
    spec = {
        "blocks": ["rwkv6"],
        "ffn": "rwkv_cmix",
        "norm": "layernorm",
        "norm_eps": hf_config.norm_eps,
        "embed_norm": bool(hf_config.norm_first),
        "rwkv6": {
            "head_dim": D // hf_config.num_heads,
            "decay_lora_rank": hf_config.gate_low_rank_dim,
            "mix_lora_rank": hf_config.proj_low_rank_dim,
            "group_norm_eps": hf_config.norm_eps,
        },
        "rwkv_cmix": {"hidden_size": intermediate},
    }
    return zoo_config(spec, hf_config, "rwkv6")


def convert_rwkv6_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fla RWKV-6 weights under zoo's names, layouts and mix order."""
    return _rwkv6_mix_layouts(convert_state_dict(state, FLA_RWKV6_KEY_MAP, "fla RWKV-6", transposed=FLA_RWKV6_TRANSPOSED))


def from_fla_rwkv6(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an fla ``RWKV6ForCausalLM``. zoo clamps the log-log decay at 3
    (``zoo.layers.rwkv6.MAX_LOG_LOG_DECAY``: decay <= 2e-9 either way); fla does not."""
    return converted_model(hf_model, rwkv6_config_to_zoo(hf_model.config), convert_rwkv6_state_dict, "fla RWKV-6")


FLA_RETNET_KEY_MAP = {
    r"model\.embeddings\.weight": "model.embed.weight",
    rf"{_LAYER}\.attn_norm\.weight": rf"{_ZOO}.mixer_norm.weight",
    rf"{_LAYER}\.mlp_norm\.weight": rf"{_ZOO}.ffn_norm.weight",
    rf"{_LAYER}\.attn\.([qkvgo])_proj\.weight": rf"{_ZOO}.mixer.\2_proj.weight",
    rf"{_LAYER}\.attn\.g_norm(_swish_gate)?\.weight": rf"{_ZOO}.mixer.norm_weight",  # fuse_norm: fused with the gate
    rf"{_LAYER}\.mlp\.(gate|up|down)_proj\.weight": rf"{_ZOO}.ffn.\2_proj.weight",
    r"model\.norm\.weight": "model.norm.weight",
    r"lm_head\.weight": "lm_head.weight",
}


def retnet_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an fla ``RetNetConfig``: zoo's ``retnet`` with ``rotary: neox`` and ``output_norm: rmsnorm``
    (fla's ``MultiScaleRetention``), a ``swiglu`` FFN (fla's ``GatedMLP``), RMSNorms; unsupported features are an error."""
    D, H = hf_config.hidden_size, hf_config.num_heads
    refused = {
        "attn": getattr(hf_config, "attn", None),
        "num_kv_heads": hf_config.num_kv_heads not in (None, H) and hf_config.num_kv_heads,
        "feature_map": hf_config.feature_map,
        "use_short_conv": hf_config.use_short_conv,
        "attnres_block_size": getattr(hf_config, "attnres_block_size", None),
    }
    for name, value in refused.items():
        if value:
            raise ValueError(f"{name}={value!r} is not supported by zoo's retnet block")
    if not hf_config.use_output_gate:
        raise ValueError("use_output_gate=False is not supported (zoo's retnet always gates its output)")
    if hf_config.hidden_act != "swish":
        raise ValueError(f"hidden_act '{hf_config.hidden_act}' is not supported (zoo's retnet gate and swiglu use swish)")
    if hf_config.expand_k != 1 or hf_config.expand_v != int(hf_config.expand_v) or hf_config.expand_v < 1:
        raise ValueError(f"expand_k={hf_config.expand_k}, expand_v={hf_config.expand_v}: zoo's retnet has expand_k 1 and an integer expand_v (value_factor)")
    intermediate = hf_config.intermediate_size
    if intermediate is None:
        intermediate = 256 * -(-int(D * (hf_config.hidden_ratio or 4) * 2 / 3) // 256)  # fla's GatedMLP rounding
    spec = {
        "blocks": ["retnet"],
        "ffn": "swiglu",
        "norm_eps": hf_config.norm_eps,
        "retnet": {
            "n_heads": H,
            "value_factor": int(hf_config.expand_v),
            "rope_theta": 10000.0,  # fla's MultiScaleRetention builds RotaryEmbedding with its default base
            "rotary": "neox",
            "output_norm": "rmsnorm",
            "group_norm_affine": bool(hf_config.elementwise_affine),
            "norm_eps": hf_config.norm_eps,
        },
        "swiglu": {"hidden_size": intermediate},
    }
    return zoo_config(spec, hf_config, "retnet")


def from_fla_retnet(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an fla ``RetNetForCausalLM``."""
    return converted_model(
        hf_model, retnet_config_to_zoo(hf_model.config),
        lambda state: convert_state_dict(state, FLA_RETNET_KEY_MAP, "fla RetNet"), "fla RetNet",
    )
