"""Gated DeltaNet block (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", ICLR 2025), as Qwen3-Next's layer.

Per value head ``h``, with the state ``S [K, V]``:
``S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``, ``o_t = q_t S_t`` where ``q``, ``k`` are
L2-normalised (``q`` then scaled by ``K^-1/2``), ``beta_t = sigmoid(x_t W_b)`` and
``log alpha_t = -exp(A_log) * softplus(x_t W_a + dt_bias)`` (Mamba-2's decay, one per head). q, k and v go through one
depthwise causal conv and SiLU; each query/key head serves ``n_v_heads / n_k_heads`` consecutive value heads. The
readout is normalised per head and gated, ``RMSNorm(o) * silu(x W_z)``, then projected back to ``d_model``.

Matches transformers' ``Qwen3NextGatedDeltaNet`` after :func:`weights_from_qwen3_next` (``tests/test_gated_deltanet.py``).
The rule runs on :func:`zoo.kernels.dplr_delta_rule.gated_delta_rule` (the generalized delta rule, or fla's kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ConfigError
from zoo.kernels.dplr_delta_rule.delta_rule import GATED_DELTA_BACKENDS as BACKENDS
from zoo.kernels.dplr_delta_rule.delta_rule import gated_delta_rule
from zoo.typed import bounded, checked

from .base import Documents, SequenceMixer, op_seqlens
from .ops import at_least_fp32, causal_conv, init_causal_conv, inverse_softplus_dt
from .registry import MIXERS


@dataclass
@checked
class GatedDeltaNetConfig:
    n_k_heads: int = bounded(2, ge=1)  # query/key heads
    n_v_heads: int = bounded(4, ge=1)  # value heads, a multiple of n_k_heads: one [K, V] state each
    head_k_dim: int = bounded(32, ge=1)
    head_v_dim: int = bounded(32, ge=1)
    d_conv: int = bounded(4, ge=1)  # taps of the causal conv over q, k, v
    norm_eps: float = bounded(1e-6, gt=0)  # the gated output norm's
    dt_min: float = bounded(0.001, gt=0)  # dt_bias init: softplus^-1 of dt log-uniform in [dt_min, dt_max]
    dt_max: float = bounded(0.1, gt=0)
    chunk_size: int = bounded(16, ge=1)
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.dplr_delta_rule.GATED_DELTA_BACKENDS; auto runs torch

    def validate(self, d_model: int) -> None:
        if self.n_v_heads % self.n_k_heads:
            raise ConfigError("n_v_heads", f"must be a multiple of n_k_heads={self.n_k_heads}, got {self.n_v_heads}")
        if self.dt_min > self.dt_max:
            raise ConfigError("dt_min", f"need dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")


class DeltaRuleState(NamedTuple):
    """The state of the Gated DeltaNet and KDA blocks."""

    conv: torch.Tensor  # [B, conv_dim, d_conv - 1]: the last inputs of the causal conv over (q, k, v)
    ssm: torch.Tensor  # [B, H_v, K, V]

    @classmethod
    def zeros(cls, batch_size: int, conv_dim: int, d_conv: int, heads: int, k: int, v: int, device, dtype) -> "DeltaRuleState":
        """The state before any token; the recurrent state in fp32 or wider."""
        conv = torch.zeros(batch_size, conv_dim, d_conv - 1, device=device, dtype=dtype)
        return cls(conv, torch.zeros(batch_size, heads, k, v, device=device, dtype=torch.promote_types(dtype, torch.float32)))

    @staticmethod
    def size(conv_dim: int, d_conv: int, heads: int, k: int, v: int) -> int:
        """Numbers per sequence."""
        return conv_dim * (d_conv - 1) + heads * k * v


class HeadGatedRMSNorm(nn.Module):
    """``RMSNorm(o) * act(gate)`` over each head's last dimension ``[..., dim]``, in fp32 (HF ``*RMSNormGated``: norm
    first, then the gate; ``silu`` for Qwen3-Next, ``sigmoid`` for Kimi Linear)."""

    def __init__(self, dim: int, eps: float, activation: str):
        super().__init__()
        self.eps = eps
        self.activation = {"silu": F.silu, "sigmoid": torch.sigmoid}[activation]
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = at_least_fp32(o)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h * self.activation(at_least_fp32(gate))).to(gate.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dimension, in fp32 or wider (fla's and transformers' l2norm)."""
    x = at_least_fp32(x)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def conv_qkv(block: nn.Module, qkv: torch.Tensor, prev: torch.Tensor, documents: Documents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of ``block.conv1d`` (depthwise, causal, no bias) over ``qkv [B, T, C]`` from the carried window ``prev``
    (packed ``documents``: restarting at each); returns ``[B, T, C]`` and the new window."""
    out, window = causal_conv(qkv.transpose(1, 2), prev, block.conv1d.weight, None, documents)  # [B, C, T]
    return F.silu(out).transpose(1, 2), window


def init_decay(block: nn.Module, dt_min: float, dt_max: float) -> None:
    """Mamba-2's decay init: ``A = U(1, 16)`` per head (``A_log = log A``), ``dt_bias = softplus^-1(dt)``, dt
    log-uniform in ``[dt_min, dt_max]``; the conv's taps as PyTorch's default."""
    from transformers import initialization as init

    init.uniform_(block.A_log, 1.0, 16.0)
    init.copy_(block.A_log, torch.log(block.A_log.detach()))
    init.copy_(block.dt_bias, inverse_softplus_dt(block.dt_bias.numel(), dt_min, dt_max, block.dt_bias.device).view_as(block.dt_bias))
    init_causal_conv(block.conv1d.weight, None)


class DeltaRuleMixer(SequenceMixer):
    """What the Gated DeltaNet and KDA blocks share: Mamba-2's decay init, a :class:`DeltaRuleState` (the conv's
    last inputs and ``state_heads = (heads, K, V)``, set by the block: that many recurrent states ``[K, V]``), packed
    documents natively."""

    packs_documents = True
    state_heads: tuple[int, int, int]

    def init_parameters(self) -> None:
        init_decay(self, self.config.dt_min, self.config.dt_max)

    def init_state(self, batch_size, device=None, dtype=None) -> DeltaRuleState:
        return DeltaRuleState.zeros(batch_size, self.conv_dim, self.config.d_conv, *self.state_heads,
                                    device or self.out_proj.weight.device, dtype or self.out_proj.weight.dtype)

    def state_size(self) -> int:
        return DeltaRuleState.size(self.conv_dim, self.config.d_conv, *self.state_heads)


@MIXERS.register("gated_deltanet", GatedDeltaNetConfig)
class GatedDeltaNet(DeltaRuleMixer):
    """qkv_proj -> causal conv -> SiLU -> (q, k, v); z_proj (output gate), b_proj (beta), a_proj (decay); the gated
    delta rule per value head; gated RMSNorm; out_proj."""

    def __init__(self, config: GatedDeltaNetConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.backend = BACKENDS.require(config.backend, "gated_deltanet")
        self.state_heads = (config.n_v_heads, config.head_k_dim, config.head_v_dim)
        self.key_dim = config.n_k_heads * config.head_k_dim
        self.value_dim = config.n_v_heads * config.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.qkv_proj = nn.Linear(d_model, self.conv_dim, bias=False)  # rows: q, k (head-major), v
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim, bias=False)
        self.z_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.b_proj = nn.Linear(d_model, config.n_v_heads, bias=False)
        self.a_proj = nn.Linear(d_model, config.n_v_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(config.n_v_heads))
        self.A_log = nn.Parameter(torch.empty(config.n_v_heads))
        self.norm = HeadGatedRMSNorm(config.head_v_dim, config.norm_eps, "silu")
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)
        if self.A_log.device.type != "meta":  # usable on its own, not only inside a ZooForCausalLM
            self.init_parameters()

    def mix(self, x: torch.Tensor, state: DeltaRuleState | None, documents: Documents | None = None) -> tuple[torch.Tensor, DeltaRuleState]:
        """Packed ``documents``: the conv and the rule restart at each (``cu_seqlens``)."""
        c = self.config
        B, T, _ = x.shape
        state = state if state is not None else self.init_state(B, x.device, x.dtype)
        qkv, conv_state = conv_qkv(self, self.qkv_proj(x), state.conv, documents)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        rep = c.n_v_heads // c.n_k_heads  # value heads per query/key head
        q = (l2norm(q.view(B, T, c.n_k_heads, c.head_k_dim)) * c.head_k_dim**-0.5).repeat_interleave(rep, dim=2)
        k = l2norm(k.view(B, T, c.n_k_heads, c.head_k_dim)).repeat_interleave(rep, dim=2)  # [B, T, H_v, K]
        beta = torch.sigmoid(at_least_fp32(self.b_proj(x)))  # [B, T, H_v]
        g = -at_least_fp32(self.A_log).exp() * F.softplus(at_least_fp32(self.a_proj(x)) + self.dt_bias)  # log alpha
        o, ssm = gated_delta_rule(
            q, k, v.reshape(B, T, c.n_v_heads, c.head_v_dim), g, beta, state.ssm if documents is None else None,
            chunk_size=c.chunk_size, backend=self.backend, cu_seqlens=op_seqlens(documents),
        )  # o: [B, T, H_v, V]; ssm: [B, H_v, K, V], or [N, H_v, K, V] for N documents
        ssm = ssm if documents is None else ssm[-1:]  # the last document's
        y = self.norm(o, self.z_proj(x).view(B, T, c.n_v_heads, c.head_v_dim))
        return self.out_proj(y.reshape(B, T, self.value_dim)), DeltaRuleState(conv_state, ssm.to(state.ssm.dtype))


def weights_from_qwen3_next(hf_state: dict[str, torch.Tensor], config: GatedDeltaNetConfig) -> dict[str, torch.Tensor]:
    """This block's state dict from a ``Qwen3NextGatedDeltaNet``'s (names relative to the layer).

    transformers fuses ``in_proj_qkvz`` per query/key head: for each of the ``n_k_heads`` groups, rows
    ``[q (K), k (K), v (rep * V), z (rep * V)]`` with ``rep = n_v_heads / n_k_heads``; and ``in_proj_ba`` per group
    ``[b (rep), a (rep)]``. zoo keeps ``qkv_proj`` as ``[all q, all k, all v]`` (the conv's channel order, which
    ``conv1d`` already has), ``z_proj``, ``b_proj`` and ``a_proj``. ``conv1d``, ``dt_bias``, ``A_log``, ``norm`` and
    ``out_proj`` are copied as they are."""
    Hk, K, V = config.n_k_heads, config.head_k_dim, config.head_v_dim
    rep = config.n_v_heads // Hk
    qkvz = hf_state["in_proj_qkvz.weight"].view(Hk, 2 * K + 2 * rep * V, -1)  # [groups, rows per group, D]
    q, k, v, z = qkvz.split([K, K, rep * V, rep * V], dim=1)
    b, a = hf_state["in_proj_ba.weight"].view(Hk, 2 * rep, -1).split([rep, rep], dim=1)
    D = qkvz.shape[-1]
    out = {"qkv_proj.weight": torch.cat([q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)]), "z_proj.weight": z.reshape(-1, D),
           "b_proj.weight": b.reshape(-1, D), "a_proj.weight": a.reshape(-1, D)}
    for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
        out[name] = hf_state[name]
    return out
