"""Mamba-1 block (Gu & Dao 2023): gated selective SSM with a short causal depthwise convolution."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ConfigError
from zoo.typed import bounded, checked
from zoo.kernels.selective_scan import BACKENDS, selective_scan

from .base import Documents, SequenceMixer, op_seqlens
from .ops import at_least_fp32, causal_conv, init_causal_conv, inverse_softplus_dt
from .registry import MIXERS


@dataclass
@checked
class MambaConfig:
    d_state: int = bounded(16, ge=1)
    d_conv: int = bounded(4, ge=1)
    expand: int = bounded(2, ge=1)
    dt_rank: int | None = bounded(None, ge=1, note="or null for ceil(d_model/16)")
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    dt_min: float = 0.001
    dt_max: float = 0.1
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.selective_scan.BACKENDS; auto runs torch

    def validate(self, d_model: int) -> None:
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError("dt_min", f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")

    def resolved_dt_rank(self, d_model: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)


class MambaState(NamedTuple):
    conv: torch.Tensor  # [B, d_inner, d_conv - 1]: the last inputs of the causal conv
    ssm: torch.Tensor  # [B, d_inner, d_state]


@MIXERS.register("mamba", MambaConfig)
class Mamba(SequenceMixer):
    """in_proj -> (x, z); x -> causal conv -> SiLU -> selective scan (dt, B, C from x) + D x; * SiLU(z) -> out_proj.

    Parameter names follow Hugging Face's ``MambaMixer``."""

    def __init__(self, config: MambaConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.backend = BACKENDS.require(config.backend, "mamba")
        self.d_inner = config.expand * d_model
        self.d_state = config.d_state
        self.dt_rank = config.resolved_dt_rank(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, config.d_conv, groups=self.d_inner, bias=config.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.bias)
        if self.A_log.device.type != "meta":  # usable on its own, not only inside a ZooForCausalLM
            self.init_parameters()

    def init_parameters(self) -> None:
        from transformers import initialization as init

        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device).expand(self.d_inner, -1)
        init.copy_(self.A_log, torch.log(A))  # S4D-real: A = -(1..N)
        init.ones_(self.D)
        dt_std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        init.copy_(self.dt_proj.bias, inverse_softplus_dt(self.d_inner, self.config.dt_min, self.config.dt_max, self.dt_proj.bias.device))
        init_causal_conv(self.conv1d.weight, self.conv1d.bias)

    def init_state(self, batch_size, device=None, dtype=None) -> MambaState:
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        conv = torch.zeros(batch_size, self.d_inner, self.config.d_conv - 1, device=device, dtype=dtype)
        # The recurrent state stays in fp32 (or wider) whatever the activations' dtype.
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.promote_types(dtype, torch.float32))
        return MambaState(conv, ssm)

    def state_size(self) -> int:
        return self.d_inner * (self.config.d_conv - 1 + self.d_state)

    packs_documents = True

    def mix(self, x: torch.Tensor, state: MambaState | None, documents: Documents | None = None):
        """Packed ``documents``: the conv and the scan restart at each (``cu_seqlens``)."""
        batch = x.shape[0]
        fresh = state is None  # the scan then starts from zeros without being handed a state
        if fresh:
            state = self.init_state(batch, x.device, x.dtype)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, Di] each
        conv_out, conv_state = causal_conv(xs.transpose(1, 2), state.conv, self.conv1d.weight, self.conv1d.bias, documents)  # [B, Di, T]
        u = F.silu(conv_out).transpose(1, 2)  # [B, T, Di]
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt)  # [B, T, Di], bias included (a module call, so a LoRA adapter on dt_proj applies)
        A = -torch.exp(at_least_fp32(self.A_log))  # [Di, N]
        y, ssm = selective_scan(
            u, delta, A, B, C, self.D, z=z, delta_softplus=True,
            initial_state=None if fresh else state.ssm,
            backend=self.backend, cu_seqlens=op_seqlens(documents),
        )  # ssm: [B, Di, N], or [N_docs, Di, N]
        return self.out_proj(y), MambaState(conv_state, ssm if documents is None else ssm[-1:])
