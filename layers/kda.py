"""Kimi Delta Attention block (Kimi Team, "Kimi Linear", arXiv:2510.26692, 2025), as transformers' Kimi Linear layer.

Per head, with the state ``S [K, V]``: ``S_t = (I - beta_t k_t^T k_t) Diag(alpha_t) S_{t-1} + beta_t k_t^T v_t``,
``o_t = q_t S_t``: Gated DeltaNet with one decay per key channel. ``q``, ``k`` are L2-normalised (``q`` then scaled by
``K^-1/2``), ``beta_t = sigmoid(x_t W_b)``, and ``log alpha_t = -exp(A_log_h) * softplus(x_t W_fa W_fb + dt_bias)``
through a low-rank projection (``f_a_proj``, ``f_b_proj``; ``A_log`` per head, ``dt_bias`` per channel). q, k and v go
through one depthwise causal conv and SiLU; the readout is normalised per head and gated,
``RMSNorm(o) * sigmoid(x W_ga W_gb)`` (low rank too), then projected back to ``d_model``.

Matches transformers' ``KimiLinearDeltaAttention`` after :func:`weights_from_kimi_linear` (``tests/test_kda.py``). The
rule runs on :func:`zoo.kernels.dplr_delta_rule.kda_rule` (the generalized delta rule, or fla's ``chunk_kda``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.dplr_delta_rule.delta_rule import KDA_BACKENDS as BACKENDS
from zoo.kernels.dplr_delta_rule.delta_rule import kda_rule
from zoo.errors import ConfigError
from zoo.typed import bounded, checked

from .base import Documents, op_seqlens
from .gated_deltanet import DeltaRuleMixer, DeltaRuleState, HeadGatedRMSNorm, conv_qkv, l2norm
from .ops import at_least_fp32
from .registry import MIXERS


@dataclass
@checked
class KDAConfig:
    n_heads: int = bounded(4, ge=1)
    head_dim: int = bounded(32, ge=1)  # K = V, as Kimi Linear
    decay_rank: int = bounded(32, ge=1)  # rank of the per-channel decay's projection (Kimi Linear: head_dim)
    gate_rank: int = bounded(32, ge=1)  # rank of the output gate's projection (Kimi Linear: head_dim)
    d_conv: int = bounded(4, ge=1)  # taps of the causal conv over q, k, v
    norm_eps: float = bounded(1e-5, gt=0)  # the gated output norm's
    dt_min: float = bounded(0.001, gt=0)  # dt_bias init: softplus^-1 of dt log-uniform in [dt_min, dt_max]
    dt_max: float = bounded(0.1, gt=0)
    chunk_size: int = bounded(16, ge=1)
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.dplr_delta_rule.KDA_BACKENDS; auto runs torch

    def validate(self, d_model: int) -> None:
        if self.dt_min > self.dt_max:
            raise ConfigError("dt_min", f"need dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")


@MIXERS.register("kda", KDAConfig)
class KDA(DeltaRuleMixer):
    """qkv_proj -> causal conv -> SiLU -> (q, k, v); f_a_proj/f_b_proj (decay), b_proj (beta), g_a_proj/g_b_proj
    (output gate); the KDA rule per head; gated RMSNorm; out_proj."""

    def __init__(self, config: KDAConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.backend = BACKENDS.require(config.backend, "kda")
        self.state_heads = (config.n_heads, config.head_dim, config.head_dim)
        H = config.n_heads
        self.dim = H * config.head_dim
        self.conv_dim = 3 * self.dim
        self.qkv_proj = nn.Linear(d_model, self.conv_dim, bias=False)  # rows: q, k, v (head-major)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim, bias=False)
        self.f_a_proj = nn.Linear(d_model, config.decay_rank, bias=False)
        self.f_b_proj = nn.Linear(config.decay_rank, self.dim, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.dim))
        self.A_log = nn.Parameter(torch.empty(H))
        self.b_proj = nn.Linear(d_model, H, bias=False)
        self.g_a_proj = nn.Linear(d_model, config.gate_rank, bias=False)
        self.g_b_proj = nn.Linear(config.gate_rank, self.dim, bias=False)
        self.norm = HeadGatedRMSNorm(config.head_dim, config.norm_eps, "sigmoid")
        self.out_proj = nn.Linear(self.dim, d_model, bias=False)
        if self.A_log.device.type != "meta":  # usable on its own, not only inside a ZooForCausalLM
            self.init_parameters()

    def mix(self, x: torch.Tensor, state: DeltaRuleState | None, documents: Documents | None = None) -> tuple[torch.Tensor, DeltaRuleState]:
        """Packed ``documents``: the conv and the rule restart at each (``cu_seqlens``)."""
        c = self.config
        B, T, _ = x.shape
        heads = (B, T, c.n_heads, c.head_dim)
        state = state if state is not None else self.init_state(B, x.device, x.dtype)
        qkv, conv_state = conv_qkv(self, self.qkv_proj(x), state.conv, documents)
        q, k, v = qkv.split([self.dim] * 3, dim=-1)
        q, k = l2norm(q.view(heads)) * c.head_dim**-0.5, l2norm(k.view(heads))  # [B, T, H, K]
        beta = torch.sigmoid(at_least_fp32(self.b_proj(x)))  # [B, T, H]
        decay = F.softplus(at_least_fp32(self.f_b_proj(self.f_a_proj(x))) + self.dt_bias).view(heads)
        g = -at_least_fp32(self.A_log).exp()[:, None] * decay  # log alpha: [B, T, H, K]
        o, ssm = kda_rule(q, k, v.reshape(heads), g, beta, state.ssm if documents is None else None, chunk_size=c.chunk_size,
                          backend=self.backend, cu_seqlens=op_seqlens(documents))
        ssm = ssm if documents is None else ssm[-1:]  # the last document's
        y = self.norm(o, self.g_b_proj(self.g_a_proj(x)).view(heads))
        return self.out_proj(y.reshape(B, T, self.dim)), DeltaRuleState(conv_state, ssm.to(state.ssm.dtype))


def weights_from_kimi_linear(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This block's state dict from a ``KimiLinearDeltaAttention``'s (names relative to the layer): ``q_proj``,
    ``k_proj``, ``v_proj`` stacked into ``qkv_proj`` (the conv's channel order), the forget gate's ``f_a_proj``,
    ``f_b_proj``, ``dt_bias`` and ``A_log`` (``[1, 1, H, 1]`` there, ``[H]`` here) moved up from ``forget_gate.``,
    ``o_norm`` -> ``norm``, ``o_proj`` -> ``out_proj``; the rest copied as they are."""
    out = {"qkv_proj.weight": torch.cat([hf_state[f"{n}_proj.weight"] for n in "qkv"]),
           "A_log": hf_state["forget_gate.A_log"].reshape(-1), "norm.weight": hf_state["o_norm.weight"],
           "out_proj.weight": hf_state["o_proj.weight"]}
    for name in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias"):
        out[name] = hf_state[f"forget_gate.{name}"]
    for name in ("conv1d.weight", "b_proj.weight", "g_a_proj.weight", "g_b_proj.weight"):
        out[name] = hf_state[name]
    return out
