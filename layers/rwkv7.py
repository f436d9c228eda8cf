"""RWKV-7 "Goose" time mixing (Peng et al. 2025, arXiv:2503.14456, Sec. 4), following the RWKV-LM x070 code.

Equations of the paper (v1 numbering) and where they are in :meth:`RWKV7.mix`; the paper's in-context learning rate
``a_t`` is ``alpha`` here and its replacement-rate booster ``alpha`` is ``k_a``:

- Eq. 3, token shift ``x^s_t = lerp(x_t, x_{t-1}, mu_s)`` for s in r, w, k, v, a, g (``x_mix``);
- Eq. 4, in-context learning rate ``a_t = sigmoid(loramlp_a(x^a_t))`` (``a0``, ``a1``, ``a2``);
- Eq. 5, key ``k_t = x^k_t W_k``; Eq. 13, receptance ``r_t = x^r_t W_r``;
- Eq. 6, removal key ``kappa_t = k_t * xi`` (``k_k``); Eq. 15, ``kappa_hat_t = kappa_t / ||kappa_t||`` per head;
- Eq. 7, replacement key ``k~_t = k_t * lerp(1, a_t, alpha)`` (``k_a``);
- Eqs. 11-12, decay ``d_t = loramlp_d(x^w_t)``, ``w_t = exp(-e^{-0.5} sigmoid(d_t))``, in [0.545, 1] (``w0``-``w2``);
- Eq. 14, output gate ``g_t = loramlp_g(x^g_t)`` with a sigmoid inside (``g1``, ``g2``);
- Eqs. 16-17, the state evolution ``wkv_t = wkv_{t-1} (diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t)) + v_t^T k~_t``,
  passed to the kernel as ``a = -kappa_hat``, ``b = kappa_hat * a_t`` (reference: ``zoo.kernels.dplr_delta_rule.naive``);
- Eq. 20, the bonus ``(r_t . (rho * k~_t)) v_t`` per head (``r_k``); Eq. 21, GroupNorm of the readout ``wkv_t r_t^T``
  plus the bonus; Eq. 22, output ``(p_t * g_t) W_o``.

- Eqs. 8-10, the value residual (``value_residual``, on by default): the first RWKV-7 layer of the stack keeps its
  values ``v_t = x^v_t W_v`` and shares them as ``v_first`` (the model's per-forward ``shared`` dict, see
  ``zoo.modeling.assign_shared_roles``); every later RWKV-7 layer mixes them into its own,
  ``v_t = lerp(x^v_t W_v, v_first_t, sigmoid(v0 + (x^v_t v1) v2))`` (``v0``, ``v1``, ``v2``). ``v_first`` is per
  token: at decode it is the current token's first-layer value, as in RWKV-LM and fla's ``RWKV7Model``. With
  ``value_residual: false`` every layer uses its own values (saved configs without the key load that way, see
  :attr:`RWKV7Config.SAVED_DEFAULTS`).

The equation numbers are the ones annotated in public implementations written from the paper (two of them agree on
Eq. 17); each formula above is checked against the RWKV-LM x070 code, which this block matches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from zoo.errors import ConfigError
from zoo.typed import bounded, checked
from zoo.kernels.dplr_delta_rule import BACKENDS, dplr_delta_rule

from .registry import MIXERS
from .base import Documents, SequenceMixer, op_seqlens
from .ops import WKVState, token_shift


@dataclass
@checked
class RWKV7Config:
    head_dim: int = bounded(64, ge=1)
    decay_lora_rank: int = bounded(64, ge=1)
    a_lora_rank: int = bounded(64, ge=1)
    gate_lora_rank: int = bounded(128, ge=1)
    chunk_size: int = bounded(16, ge=1)
    backend: BACKENDS.Name = "auto"  # a name in zoo.kernels.dplr_delta_rule.BACKENDS; auto runs torch
    value_residual: bool = True  # Eqs. 8-10: later RWKV-7 layers mix the first one's values into theirs
    value_lora_rank: int = bounded(32, ge=1)  # rank of the value-residual gate's LoRA (v1, v2)
    group_norm_eps: float = bounded(64e-5, gt=0)  # eps of the readout's GroupNorm (ln_x); RWKV-LM: head_dim * 1e-5
    # What a saved config (a checkpoint's module_args) written before a key existed meant: zoo.modeling.ZooConfig
    # fills these in for keys such a config lacks, so old checkpoints keep their behaviour.
    SAVED_DEFAULTS: ClassVar[dict] = {"value_residual": False}

    def validate(self, d_model: int) -> None:
        if d_model % self.head_dim:
            raise ConfigError("head_dim", f"d_model={d_model} must be a positive multiple of head_dim={self.head_dim}")


RWKV7State = WKVState  # exported as zoo.layers.RWKV7State


@MIXERS.register("rwkv7", RWKV7Config)
class RWKV7(SequenceMixer):
    """Goose time mixing. Parameter names follow the RWKV-LM x070 code (``x_r``, ``w0``/``w1``/``w2``, ``k_k``, ...)."""

    def __init__(self, config: RWKV7Config, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        D = d_model
        self.head_dim = config.head_dim
        self.n_heads = D // config.head_dim
        self.backend = BACKENDS.require(config.backend, "rwkv7")
        self.x_mix = nn.Parameter(torch.empty(6, D))  # lerp weights of r, w, k, v, a, g
        self.w0 = nn.Parameter(torch.empty(D))
        self.w1 = nn.Parameter(torch.empty(D, config.decay_lora_rank))
        self.w2 = nn.Parameter(torch.empty(config.decay_lora_rank, D))
        self.a0 = nn.Parameter(torch.empty(D))
        self.a1 = nn.Parameter(torch.empty(D, config.a_lora_rank))
        self.a2 = nn.Parameter(torch.empty(config.a_lora_rank, D))
        self.g1 = nn.Parameter(torch.empty(D, config.gate_lora_rank))
        self.g2 = nn.Parameter(torch.empty(config.gate_lora_rank, D))
        self.k_k = nn.Parameter(torch.empty(D))
        self.k_a = nn.Parameter(torch.empty(D))
        self.r_k = nn.Parameter(torch.empty(self.n_heads, self.head_dim))
        self.receptance = nn.Linear(D, D, bias=False)
        self.key = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.output = nn.Linear(D, D, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, D, eps=config.group_norm_eps)
        self.shared_tensor = "rwkv7.v_first" if config.value_residual else None
        self.reads_v_first = False  # set by set_shared_role: a later RWKV-7 layer, with the v0/v1/v2 gate
        self.init_parameters()

    def set_shared_role(self, producer: bool) -> None:
        """The first RWKV-7 layer shares its values; a later one gets the value-residual gate ``v0``/``v1``/``v2``."""
        if producer or self.reads_v_first:
            return
        D, rank = self.d_model, self.config.value_lora_rank
        device = self.w0.device
        self.v0 = nn.Parameter(torch.empty(D, device=device))
        self.v1 = nn.Parameter(torch.empty(D, rank, device=device))
        self.v2 = nn.Parameter(torch.empty(rank, D, device=device))
        self.reads_v_first = True
        if device.type != "meta":
            self.init_value_gate()

    def init_value_gate(self) -> None:
        """RWKV-LM x070: ``v0 = 1`` (a gate of sigmoid(1) = 0.73 towards ``v_first``), ``v1 = 0``, small ``v2``."""
        init.ones_(self.v0)
        init.zeros_(self.v1)
        init.uniform_(self.v2, -0.1 / math.sqrt(self.v2.shape[0]), 0.1 / math.sqrt(self.v2.shape[0]))

    def init_parameters(self) -> None:
        """RWKV-LM x070 init with the layer-depth ratios fixed at 0.5 (a block does not know the model depth);
        the LoRA up-projections get small uniform values instead of scaled orthogonal ones."""
        D = self.d_model
        dev = self.w0.device
        ratio = 0.5
        ddd = torch.arange(D, device=dev, dtype=torch.float32) / D
        n = torch.arange(D, device=dev, dtype=torch.float32) / max(D - 1, 1)
        powers = torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2], device=dev)[:, None] * ratio  # r, w, k, v, a, g
        init.copy_(self.x_mix, 1 - ddd[None, :].pow(powers))
        init.copy_(self.w0, -7 + 5 * n.pow(0.85 + ratio**0.5) + 0.5)
        for lora_down, lora_up in ((self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)):
            init.zeros_(lora_down)
            init.uniform_(lora_up, -0.1 / math.sqrt(lora_up.shape[0]), 0.1 / math.sqrt(lora_up.shape[0]))
        init.zeros_(self.a0)
        init.constant_(self.k_k, 0.85)
        init.ones_(self.k_a)
        init.constant_(self.r_k, -0.04)
        if getattr(self, "reads_v_first", False):
            self.init_value_gate()

    def init_state(self, batch_size, device=None, dtype=None) -> WKVState:
        device, dtype = device or self.key.weight.device, dtype or self.key.weight.dtype
        return WKVState.zeros(batch_size, self.d_model, self.n_heads, self.head_dim, device, dtype)

    def state_size(self) -> int:
        return WKVState.size(self.d_model, self.n_heads, self.head_dim)

    packs_documents = True

    def mix(self, x: torch.Tensor, state: WKVState | None, shared: dict[str, torch.Tensor] | None = None,
            documents: Documents | None = None):
        """Packed ``documents``: the token shift and the WKV scan restart at each (``cu_seqlens``)."""
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        xx = token_shift(x, None if state is None else state.shift, documents) - x  # [B, T, D]
        xr, xw, xk, xv, xa, xg = (x + xx * self.x_mix[i] for i in range(6))
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)  # [B, T, D]
        if self.reads_v_first:
            gate = torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2).to(v.dtype)  # fp32 under autocast (v0 is fp32)
            v = torch.lerp(v, self._v_first(shared, v).to(v.dtype), gate)  # Eq. 10
        elif self.shared_tensor is not None and shared is not None:
            shared[self.shared_tensor] = v
        d = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # [B, T, D]
        w_log = -math.exp(-0.5) * torch.sigmoid(d.float())  # log decay in [-e^-0.5, 0]
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, K), dim=-1)  # kappa_hat: [B, T, H, K]
        k = k * (1 + (alpha - 1) * self.k_a)
        r, k, v, alpha = (t.view(B, T, H, K) for t in (r, k, v, alpha))
        wkv0 = None if state is None else state.wkv
        o, wkv = dplr_delta_rule(
            r, w_log.view(B, T, H, K), k, v, -kk, kk * alpha, wkv0, chunk_size=self.config.chunk_size,
            backend=self.backend, cu_seqlens=op_seqlens(documents),
        )  # wkv: [B, H, K, K], or [N, H, K, K] for N documents
        wkv = wkv if documents is None else wkv[-1:]  # the last document's
        o = self.ln_x(o.reshape(B * T, D).to(x.dtype)).view(B, T, D)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # [B, T, H, K]
        y = self.output((o + bonus.reshape(B, T, D)) * g)
        wkv = wkv if state is None else wkv.to(state.wkv.dtype)  # fp32 (or fp64) unless a state says otherwise
        return y, WKVState(x[:, -1], wkv)

    def _v_first(self, shared: dict[str, torch.Tensor] | None, v: torch.Tensor) -> torch.Tensor:
        """The first RWKV-7 layer's values ``[B, T, D]`` for these tokens, from the forward's ``shared`` dict."""
        v_first = None if shared is None else shared.get(self.shared_tensor)
        if v_first is None:
            raise ValueError(
                f"rwkv7 block (layer {self.layer_idx}) mixes in the first RWKV-7 layer's values (value_residual): run it "
                "in a model, or pass shared={'rwkv7.v_first': v [B, T, D]} from that layer"
            )
        if v_first.shape != v.shape:
            raise ValueError(f"rwkv7 block (layer {self.layer_idx}): shared v_first has shape {list(v_first.shape)}, expected {list(v.shape)}")
        return v_first
