"""RWKV-6 "Finch" time mixing (Peng et al. 2024, "Eagle and Finch", arXiv:2404.05892, Sec. 4).

Token shift with data-dependent interpolation (ddlerp, low-rank LoRA mixing; Eqs. 14-16), data-dependent decay
``w_t = exp(-exp(d_t))`` with ``d_t`` from a LoRA (Eqs. 17-18), per-head bonus ``u`` (Eq. 19), a multi-head matrix
state ``S [B, H, K, V]``, per-head GroupNorm on the output, SiLU gate and output projection (Eq. 20).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from zoo.errors import ConfigError
from zoo.typed import bounded, checked
from zoo.kernels.rwkv6 import BACKENDS, rwkv6

from .base import Documents, SequenceMixer, op_seqlens
from .ops import WKVState, token_shift
from .registry import MIXERS


# d_t is clamped here before w_log = -exp(d_t): decay exp(-exp(3)) ~ 2e-9 is already "forget everything", and a
# bounded log decay keeps the chunked kernel's fp32 cumulative sums precise.
MAX_LOG_LOG_DECAY = 3.0


@dataclass
@checked
class RWKV6Config:
    head_dim: int = bounded(64, ge=1)
    decay_lora_rank: int = bounded(64, ge=1)
    mix_lora_rank: int = bounded(32, ge=1)
    chunk_size: int = bounded(16, ge=1)
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.rwkv6.BACKENDS; auto runs torch
    group_norm_eps: float = bounded(64e-5, gt=0)  # eps of the readout's GroupNorm (ln_x); fla uses its norm_eps

    def validate(self, d_model: int) -> None:
        if d_model % self.head_dim:
            raise ConfigError("head_dim", f"d_model={d_model} must be a positive multiple of head_dim={self.head_dim}")


RWKV6State = WKVState  # exported as zoo.layers.RWKV6State


@MIXERS.register("rwkv6", RWKV6Config)
class RWKV6(SequenceMixer):
    """Finch time mixing. Parameter names follow the RWKV-LM v6 code (``time_maa_*``, ``time_decay*``, ``time_faaaa``)."""

    def __init__(self, config: RWKV6Config, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        D, R, Rd = d_model, config.mix_lora_rank, config.decay_lora_rank
        self.head_dim = config.head_dim
        self.n_heads = D // config.head_dim
        self.backend = BACKENDS.require(config.backend, "rwkv6")
        self.time_maa_x = nn.Parameter(torch.empty(D))
        self.time_maa = nn.Parameter(torch.empty(5, D))  # lambda of the w, k, v, r, g mixes
        self.time_maa_w1 = nn.Parameter(torch.empty(D, 5 * R))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, R, D))
        self.time_decay = nn.Parameter(torch.empty(D))
        self.time_decay_w1 = nn.Parameter(torch.empty(D, Rd))
        self.time_decay_w2 = nn.Parameter(torch.empty(Rd, D))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_heads, self.head_dim))  # bonus u
        self.receptance = nn.Linear(D, D, bias=False)
        self.key = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.gate = nn.Linear(D, D, bias=False)
        self.output = nn.Linear(D, D, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, D, eps=config.group_norm_eps)
        self.init_parameters()

    def init_parameters(self) -> None:
        """RWKV-LM v6 init with the layer-depth ratios fixed at 0.5 (a block does not know the model depth)."""
        D = self.d_model
        dev = self.time_decay.device
        ratio = 0.5
        ddd = torch.arange(D, device=dev, dtype=torch.float32) / D
        n = torch.arange(D, device=dev, dtype=torch.float32) / max(D - 1, 1)
        init.copy_(self.time_maa_x, 1 - ddd.pow(ratio))
        mix = torch.stack([1 - ddd.pow(ratio), 1 - ddd.pow(ratio), 1 - (ddd.pow(ratio) + 0.3 * ratio),
                           1 - ddd.pow(0.5 * ratio), 1 - ddd.pow(0.5 * ratio)])  # w, k, v, r, g
        init.copy_(self.time_maa, mix)
        init.zeros_(self.time_maa_w1)
        init.uniform_(self.time_maa_w2, -0.01, 0.01)
        init.copy_(self.time_decay, -6 + 5 * n.pow(0.7 + 1.3 * ratio))
        init.zeros_(self.time_decay_w1)
        init.uniform_(self.time_decay_w2, -0.01, 0.01)
        zigzag = (torch.arange(D, device=dev) + 1) % 3 - 1
        init.copy_(self.time_faaaa, (ratio * (1 - n) + 0.1 * zigzag).view(self.n_heads, self.head_dim))

    def init_state(self, batch_size, device=None, dtype=None) -> WKVState:
        device, dtype = device or self.key.weight.device, dtype or self.key.weight.dtype
        return WKVState.zeros(batch_size, self.d_model, self.n_heads, self.head_dim, device, dtype)

    def state_size(self) -> int:
        return WKVState.size(self.d_model, self.n_heads, self.head_dim)

    packs_documents = True

    def mix(self, x: torch.Tensor, state: WKVState | None, documents: Documents | None = None):
        """Packed ``documents``: the token shift and the WKV scan restart at each (``cu_seqlens``)."""
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        xx = token_shift(x, None if state is None else state.shift, documents) - x  # [B, T, D]
        xxx = x + xx * self.time_maa_x
        lora = torch.tanh(xxx @ self.time_maa_w1).view(B, T, 5, -1)  # [B, T, 5, R]
        lora = torch.einsum("btfr,frd->fbtd", lora, self.time_maa_w2)  # [5, B, T, D]
        xw, xk, xv, xr, xg = (x + xx * (self.time_maa[i] + lora[i]) for i in range(5))
        r = self.receptance(xr).view(B, T, H, K)
        k = self.key(xk).view(B, T, H, K)
        v = self.value(xv).view(B, T, H, K)
        g = F.silu(self.gate(xg))
        d = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # [B, T, D]
        w_log = -d.float().clamp(max=MAX_LOG_LOG_DECAY).exp().view(B, T, H, K)
        wkv0 = None if state is None else state.wkv
        o, wkv = rwkv6(
            r, k, v, w_log, self.time_faaaa, wkv0, chunk_size=self.config.chunk_size,
            backend=self.backend, cu_seqlens=op_seqlens(documents),
        )  # o: [B, T, H, K]; wkv: [B, H, K, K], or [N, H, K, K] for N documents
        wkv = wkv if documents is None else wkv[-1:]  # the last document's
        o = self.ln_x(o.reshape(B * T, D).to(x.dtype)).view(B, T, D)
        y = self.output(o * g)
        wkv = wkv if state is None else wkv.to(state.wkv.dtype)  # fp32 (or fp64) unless a state says otherwise
        return y, WKVState(x[:, -1], wkv)
