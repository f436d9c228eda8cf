"""RetNet block: gated multi-scale retention (Sun et al. 2023, "Retentive Network", arXiv:2307.08621, Sec. 2.2).

``MSR(X) = (swish(X W_G) ⊙ GroupNorm_h(Retention_h(X))) W_O`` (Eq. 8), with per-head fixed decays
``gamma_h = 1 - 2^(-5 - h)`` (Eq. 8; torchscale's ``RetNetRelPos``: ``log(1 - 2 ** (-5 - arange(H)))``) and the
``e^{i n theta}`` rotation of q and k (Eq. 5) in torchscale's interleaved layout,
``theta = 1 / 10000^linspace(0, 1, K/2)``. k is scaled by ``K^-0.5`` as in torchscale.

Two options reproduce fla's ``MultiScaleRetention`` instead (``zoo.convert.fla``): ``rotary: neox`` pairs
channel i with i + K/2 (half-split) and uses ``theta_i = 1 / rope_theta^(2i/K)`` (fla's ``RotaryEmbedding``), and
``output_norm: rmsnorm`` normalizes each head's output by its RMS, scaled by one weight ``[V]`` shared by the heads.

The state is the retention state ``S [B, H, K, V]`` kept in the rotation frame of the next token: since the rotation
is relative (``(R_n q)^T (R_m k) = q^T R_{m-n} k``), rotating the state's key axis by ``-T theta`` after a call of T
tokens lets every call number its tokens from 0. No position counter is needed, and states of different rows stay
independent of how many tokens each row has seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from zoo.errors import ConfigError
from zoo.typed import bounded, checked
from zoo.kernels.retention import BACKENDS, retention

from .base import Documents, SequenceMixer, op_seqlens
from .registry import MIXERS


@dataclass
@checked
class RetNetConfig:
    n_heads: int = bounded(4, ge=1)
    value_factor: int = bounded(2, ge=1)  # value (and gate) width per head = value_factor * key head dim (the paper uses 2)
    chunk_size: int = bounded(64, ge=1)  # chunk length of the chunkwise form (Eq. 7)
    rope_theta: float = bounded(10000.0, gt=0)
    group_norm_affine: bool = False  # learnable per-channel scale/shift after the per-head norm (rmsnorm: a scale [V])
    norm_eps: float = bounded(1e-6, gt=0)
    rotary: Literal["torchscale", "neox"] = "torchscale"  # pairing and frequencies of the q/k rotation (ROTARY)
    output_norm: Literal["groupnorm", "rmsnorm"] = "groupnorm"  # per-head norm of the retention output
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.retention.BACKENDS; auto runs torch

    def validate(self, d_model: int) -> None:
        if d_model % self.n_heads:
            raise ConfigError("n_heads", f"d_model={d_model} is not divisible by n_heads={self.n_heads}")
        if (d_model // self.n_heads) % 2:
            raise ConfigError("n_heads", f"key head dim d_model/n_heads = {d_model // self.n_heads} must be even for the rotation")


class RetNetState(NamedTuple):
    """Retention state, in the rotation frame of the next token."""

    kv: torch.Tensor  # [B, H, K, V]


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` on the last axis: multiplication by i per pair."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(a, b) -> (-b, a)`` on the halves of the last axis: multiplication by i per pair (i, i + K/2)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def torchscale_angles(K: int, base: float) -> torch.Tensor:
    """``theta = 1 / base^linspace(0, 1, K/2)``, each repeated for its (even, odd) pair: ``[K]`` in fp64."""
    return (1.0 / base ** torch.linspace(0, 1, K // 2, dtype=torch.float64)).repeat_interleave(2)


def neox_angles(K: int, base: float) -> torch.Tensor:
    """``theta_i = 1 / base^(2i/K)`` for i < K/2, repeated for the second half: ``[K]`` in fp64."""
    theta = 1.0 / base ** (torch.arange(0, K, 2, dtype=torch.float64) / K)
    return torch.cat((theta, theta))


# rotary name -> (angles [K] for a key head dim and base, multiplication by i in that pairing)
ROTARY = {"torchscale": (torchscale_angles, rotate_every_two), "neox": (neox_angles, rotate_half)}


@MIXERS.register("retnet", RetNetConfig)
class RetNet(SequenceMixer):
    """Gated multi-scale retention; trains with the chunkwise form, the same call decodes token by token."""

    def __init__(self, config: RetNetConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.backend = BACKENDS.require(config.backend, "retnet")
        self.n_heads = config.n_heads
        self.key_dim = d_model // config.n_heads
        self.value_dim = self.key_dim * config.value_factor
        H = self.n_heads
        self.q_proj = nn.Linear(d_model, H * self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, H * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, H * self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, H * self.value_dim, bias=False)
        self.o_proj = nn.Linear(H * self.value_dim, d_model, bias=False)
        self.rms_norm = config.output_norm == "rmsnorm"
        self.rotate = ROTARY[config.rotary][1]
        self.norm_weight = self.norm_bias = None
        if config.group_norm_affine:
            self.norm_weight = nn.Parameter(torch.ones(self.value_dim if self.rms_norm else H * self.value_dim))
            if not self.rms_norm:
                self.norm_bias = nn.Parameter(torch.zeros(H * self.value_dim))

    def init_parameters(self) -> None:
        if self.norm_weight is not None:
            init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            init.zeros_(self.norm_bias)

    def log_decay(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``log gamma_h = log(1 - 2^(-5 - h))`` for h = 0..H-1 (Eq. 8), shape [H]."""
        h = torch.arange(self.n_heads, device=device, dtype=torch.float64)
        return torch.log1p(-torch.exp2(-5.0 - h)).to(dtype)

    def angles(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rotation frequencies ``theta`` [K], each repeated for its (even, odd) pair."""
        return ROTARY[self.config.rotary][0](self.key_dim, self.config.rope_theta).to(device=device, dtype=dtype)

    def init_state(self, batch_size, device=None, dtype=None) -> RetNetState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        return RetNetState(torch.zeros(batch_size, self.n_heads, self.key_dim, self.value_dim, device=device, dtype=dtype))

    def state_size(self) -> int:
        return self.n_heads * self.key_dim * self.value_dim

    packs_documents = True

    def mix(self, x: torch.Tensor, state: RetNetState | None, documents: Documents | None = None):
        """Packed ``documents``: rotations from each token's position in its document, retention restarted at each
        (``cu_seqlens``); the state is the last document's."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.key_dim, self.value_dim
        dtype = torch.promote_types(x.dtype, torch.float32)
        theta = self.angles(x.device, dtype)  # [K]
        positions = torch.arange(T, device=x.device) if documents is None else documents.positions  # [T]
        phase = positions.to(dtype)[:, None] * theta  # [T, K]
        cos, sin = phase.cos()[:, None], phase.sin()[:, None]  # [T, 1, K]
        q = self.q_proj(x).view(B, T, H, K).to(dtype)  # [B, T, H, K]
        k = self.k_proj(x).view(B, T, H, K).to(dtype)
        v = self.v_proj(x).view(B, T, H, V).to(dtype)  # [B, T, H, V]
        q = q * cos + self.rotate(q) * sin
        k = (k * cos + self.rotate(k) * sin) * K**-0.5
        o, kv = retention(
            q, k, v, self.log_decay(x.device, dtype), None if state is None else state.kv, "chunk", self.config.chunk_size,
            backend=self.backend, cu_seqlens=op_seqlens(documents),
        )  # kv: [B, H, K, V], or [N, H, K, V] for N documents
        length = T if documents is None else T - documents.last_start  # of the sequence the state ends
        kv = kv if documents is None else kv[-1:]  # the last document's
        # Move the state to the frame of the next call's token 0: rotate its key axis by -length theta.
        end = length * theta  # [K]
        kv_t = kv.transpose(-1, -2)  # [B, H, V, K]
        kv = (kv_t * end.cos() - self.rotate(kv_t) * end.sin()).transpose(-1, -2)  # [B, H, K, V]
        if self.rms_norm:  # o: [B, T, H, V], one RMS per head; the weight [V] is shared by the heads
            o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.config.norm_eps)
            if self.norm_weight is not None:
                o = o * self.norm_weight.to(dtype)
            o = o.reshape(B, T, H * V)
        else:
            o = F.layer_norm(o, (V,), eps=self.config.norm_eps).reshape(B, T, H * V)  # GroupNorm with one group per head
            if self.norm_weight is not None:
                o = o * self.norm_weight.to(dtype) + self.norm_bias.to(dtype)
        y = F.silu(self.g_proj(x)) * o.to(x.dtype)
        return self.o_proj(y), RetNetState(kv)
