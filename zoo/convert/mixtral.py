"""Hugging Face Mixtral -> zoo ``attention`` + ``moe`` model.

transformers 5 keeps Mixtral's experts stacked: ``mlp.experts.gate_up_proj [E, 2I, D]`` (w1 rows then w3 rows,
``out x in``) and ``mlp.experts.down_proj [E, D, I]`` (w2). zoo's ``moe`` stacks ``x @ w`` weights instead
(``w_gate/w_up [E, D, I]``, ``w_down [E, I, D]``), so after the key renaming the expert tensors are split and
transposed by :func:`stack_experts`.
"""
from __future__ import annotations

import re

import torch

from zoo.convert import convert_state_dict, converted_model, zoo_config
from zoo.convert.llama import LLAMA_KEY_MAP, llama_config_to_zoo
from zoo.modeling import ZooConfig, ZooForCausalLM

MIXTRAL_KEY_MAP = {
    **LLAMA_KEY_MAP,  # embeddings, norms, attention, lm_head (its dense-MLP pattern matches no Mixtral key)
    r"model\.layers\.(\d+)\.mlp\.gate\.weight": r"model.layers.\1.ffn.gate.weight",
    # Renamed here, reshaped by stack_experts: [E, 2I, D] -> w_gate, w_up [E, D, I]; [E, D, I] -> w_down [E, I, D].
    r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj": r"model.layers.\1.ffn.gate_up_proj",
    r"model\.layers\.(\d+)\.mlp\.experts\.down_proj": r"model.layers.\1.ffn.down_proj",
}

_GATE_UP = re.compile(r"(model\.layers\.\d+\.ffn\.)gate_up_proj")
_DOWN = re.compile(r"(model\.layers\.\d+\.ffn\.)down_proj")


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral's ``gate_up_proj``/``down_proj`` (``out x in`` per expert) -> zoo's ``w_gate``/``w_up``/``w_down``."""
    out = {}
    for key, tensor in state.items():
        if m := _GATE_UP.fullmatch(key):
            gate, up = tensor.chunk(2, dim=1)  # [E, I, D] each
            out[m.group(1) + "w_gate"] = gate.transpose(1, 2).contiguous()  # [E, D, I]
            out[m.group(1) + "w_up"] = up.transpose(1, 2).contiguous()
        elif m := _DOWN.fullmatch(key):
            out[m.group(1) + "w_down"] = tensor.transpose(1, 2).contiguous()  # [E, I, D]
        else:
            out[key] = tensor
    return out


def mixtral_config_to_zoo(hf_config) -> ZooConfig:
    """The zoo config of an HF MixtralConfig; unsupported features are an error, never ignored."""
    base = llama_config_to_zoo(hf_config).model_config().to_dict()
    base.pop("swiglu")
    spec = {
        **base,
        "ffn": "moe",
        "moe": {
            "num_experts": hf_config.num_local_experts,
            "top_k": hf_config.num_experts_per_tok,
            "expert_hidden": hf_config.intermediate_size,
            "router": "softmax_topk",
            "aux_loss_coef": float(hf_config.router_aux_loss_coef),
            "z_loss_coef": 0.0,  # Mixtral trains without a router z-loss
        },
    }
    if getattr(hf_config, "router_jitter_noise", 0.0):
        raise ValueError("router_jitter_noise > 0 is not supported: Mixtral jitters the expert input too, zoo only the router's")
    return zoo_config(spec, hf_config, "mixtral")


def from_mixtral(hf_model) -> ZooForCausalLM:
    """A zoo model holding the weights of an HF ``MixtralForCausalLM``."""
    return converted_model(
        hf_model, mixtral_config_to_zoo(hf_model.config),
        lambda state: stack_experts(convert_state_dict(state, MIXTRAL_KEY_MAP, "Mixtral")), "Mixtral",
    )
