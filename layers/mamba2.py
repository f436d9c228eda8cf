"""Mamba-2 block (Dao & Gu 2024): multi-head SSD with scalar decay per head, grouped B/C and a gated RMSNorm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ConfigError
from zoo.typed import bounded, checked
from zoo.kernels.ssd import BACKENDS, ssd_scan

from .base import Documents, SequenceMixer, op_seqlens
from .ops import at_least_fp32, causal_conv, init_causal_conv, inverse_softplus_dt
from .registry import MIXERS


@dataclass
@checked
class Mamba2Config:
    d_state: int = bounded(64, ge=1)
    d_conv: int = bounded(4, ge=1)
    expand: int = bounded(2, ge=1)
    head_dim: int = bounded(64, ge=1)
    n_groups: int = bounded(1, ge=1)  # groups of heads sharing B and C (and the gated norm's statistics)
    chunk_size: int = bounded(64, ge=1)
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    norm_eps: float = bounded(1e-5, gt=0)  # gated RMSNorm
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_limit_min: float = 0.0  # dt is clamped to [dt_limit_min, dt_limit_max] after the softplus
    dt_limit_max: float | None = None  # None: no upper limit
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.ssd.BACKENDS; auto runs torch

    def validate(self, d_model: int) -> None:
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            raise ConfigError("head_dim", f"d_inner = expand * d_model = {d_inner} is not divisible by head_dim={self.head_dim}")
        heads = d_inner // self.head_dim
        if heads % self.n_groups:
            raise ConfigError("n_groups", f"the number of heads {heads} (d_inner/head_dim) is not divisible by n_groups={self.n_groups}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError("dt_min", f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_limit_max is not None and self.dt_limit_max <= self.dt_limit_min:
            raise ConfigError("dt_limit_max", f"must be > dt_limit_min={self.dt_limit_min}, got {self.dt_limit_max}")


class Mamba2State(NamedTuple):
    conv: torch.Tensor  # [B, conv_dim, d_conv - 1]: the last inputs of the causal conv over (x, B, C)
    ssm: torch.Tensor  # [B, H, head_dim, d_state]


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z))`` with statistics over groups of ``group_size`` channels, in fp32 (HF ``MambaRMSNormGated``)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = at_least_fp32(y) * F.silu(at_least_fp32(z))
        g = h.unflatten(-1, (-1, self.group_size))  # [..., groups, group_size]
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


@MIXERS.register("mamba2", Mamba2Config)
class Mamba2(SequenceMixer):
    """in_proj -> (z, xBC, dt); xBC -> causal conv -> SiLU -> (x, B, C); SSD per head + D x; gated norm with z;
    out_proj. Parameter names follow Hugging Face's ``Mamba2Mixer``."""

    def __init__(self, config: Mamba2Config, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.backend = BACKENDS.require(config.backend, "mamba2")
        self.d_inner = config.expand * d_model
        self.head_dim = config.head_dim
        self.n_heads = self.d_inner // config.head_dim
        self.d_state = config.d_state
        self.n_groups = config.n_groups
        self.conv_dim = self.d_inner + 2 * config.n_groups * config.d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=config.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // config.n_groups, config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.bias)
        if self.A_log.device.type != "meta":  # usable on its own, not only inside a ZooForCausalLM
            self.init_parameters()

    def init_parameters(self) -> None:
        from transformers import initialization as init

        init.uniform_(self.A_log, 0.0, 1.0)
        init.copy_(self.A_log, torch.log(1 + 15 * self.A_log.detach()))  # A = -U(1, 16), as the reference Mamba-2
        init.ones_(self.D)
        init.copy_(self.dt_bias, inverse_softplus_dt(self.n_heads, self.config.dt_min, self.config.dt_max, self.dt_bias.device))
        init_causal_conv(self.conv1d.weight, self.conv1d.bias)

    def init_state(self, batch_size, device=None, dtype=None) -> Mamba2State:
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        conv = torch.zeros(batch_size, self.conv_dim, self.config.d_conv - 1, device=device, dtype=dtype)
        ssm_dtype = torch.promote_types(dtype, torch.float32)  # the recurrent state stays in fp32 or wider
        ssm = torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state, device=device, dtype=ssm_dtype)
        return Mamba2State(conv, ssm)

    def state_size(self) -> int:
        return self.conv_dim * (self.config.d_conv - 1) + self.n_heads * self.head_dim * self.d_state

    packs_documents = True

    def mix(self, x: torch.Tensor, state: Mamba2State | None, documents: Documents | None = None):
        """Packed ``documents``: the conv and the scan restart at each (``cu_seqlens``)."""
        batch, T, _ = x.shape
        if state is None:
            state = self.init_state(batch, x.device, x.dtype)
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        conv_out, conv_state = causal_conv(xbc.transpose(1, 2), state.conv, self.conv1d.weight, self.conv1d.bias, documents)  # [B, conv_dim, T]
        xbc = F.silu(conv_out).transpose(1, 2)  # [B, T, conv_dim]
        gn = self.n_groups * self.d_state
        xs, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        limit_max = self.config.dt_limit_max if self.config.dt_limit_max is not None else float("inf")
        y, ssm = ssd_scan(
            xs.reshape(batch, T, self.n_heads, self.head_dim),  # [B, T, H, P]
            dt,
            -torch.exp(at_least_fp32(self.A_log)),
            B.reshape(batch, T, self.n_groups, self.d_state),  # [B, T, G, N]
            C.reshape(batch, T, self.n_groups, self.d_state),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=(self.config.dt_limit_min, limit_max),
            initial_state=state.ssm if documents is None else None,
            chunk_size=self.config.chunk_size,
            backend=self.backend, cu_seqlens=op_seqlens(documents),
        )  # ssm: [B, H, P, N], or [N_docs, H, P, N]
        y = self.norm(y.reshape(batch, T, self.d_inner), z)
        return self.out_proj(y), Mamba2State(conv_state, ssm if documents is None else ssm[-1:])
