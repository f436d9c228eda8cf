"""Mixture-of-experts feed-forward (dropless top-k routing over SwiGLU experts, Mixtral / Switch / ST-MoE).

Parameters (names matter for PEFT targeting and converters):

- ``gate``: ``nn.Linear(D, E, bias=False)``, the router (``gate.weight [E, D]``, Mixtral's ``mlp.gate.weight``).
- ``w_gate [E, D, H]``, ``w_up [E, D, H]``, ``w_down [E, H, D]``: every expert's SwiGLU weights stacked,
  applied as ``x @ w`` (expert ``e`` computes ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``).
- ``shared`` (only with ``shared_experts > 0``): a :class:`~zoo.layers.ffn.SwiGLU` of hidden size
  ``shared_experts * H`` that every token goes through (the sum of that many always-on experts).
- ``shared_gate`` (only with ``shared_expert_gate``): ``nn.Linear(D, 1, bias=False)``; the shared output is then
  scaled per token by ``sigmoid(shared_gate(x))`` (Qwen2-MoE / Qwen3-Next's ``shared_expert_gate``).

Each forward keeps its routing decisions until :meth:`MoE.pop_stats` turns everything since the last pop into one
:class:`RouterStats` (the model does that after every forward to form the auxiliary losses). Pooling the calls makes
a left-padded batch, whose rows the model runs one by one without their padding, count the same tokens as a padded
batch with a ``token_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from zoo.errors import ConfigError
from zoo.typed import bounded, checked

from .layer import is_replaying
from .ffn import SwiGLU, SwiGLUConfig
from .registry import FFNS


@dataclass
@checked
class MoEConfig:
    num_experts: int = bounded(8, ge=1)
    top_k: int = 2
    expert_hidden: int | None = bounded(None, ge=1)  # None: like swiglu, 8/3 * d_model rounded up to a multiple of `multiple_of`
    multiple_of: int = bounded(64, ge=1)
    shared_experts: int = bounded(0, ge=0)  # always-on SwiGLU experts of size expert_hidden
    shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(x @ w), w [D, 1] (Qwen3-Next)
    router: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    router_jitter: float = bounded(0.0, ge=0, lt=1)  # multiplicative uniform noise on the router input, training only
    aux_loss_coef: float = bounded(0.01, ge=0)  # load-balancing loss weight (Switch / Mixtral)
    z_loss_coef: float = bounded(0.001, ge=0)  # router z-loss weight (ST-MoE)
    dispatch: Literal["grouped", "loop"] = "grouped"

    def validate(self, d_model: int) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.shared_expert_gate and not self.shared_experts:
            raise ConfigError("shared_expert_gate", "gates the shared experts' output: set shared_experts >= 1")

    def resolved_expert_hidden(self, d_model: int) -> int:
        return SwiGLUConfig(self.expert_hidden, self.multiple_of).resolved_hidden_size(d_model)

    def resolved_hidden_size(self, d_model: int) -> int:
        """The FFN hidden size every FFN config states: here each expert's (Mixtral's ``intermediate_size``)."""
        return self.resolved_expert_hidden(d_model)


class RouterStats(NamedTuple):
    """One MoE forward's router statistics over its counted (non-padding) tokens."""

    router_logits: torch.Tensor  # [N, E] (all tokens, as HF's router_logits)
    load_balancing_loss: torch.Tensor  # scalar, E * sum_e f_e * P_e (equals top_k when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean_i logsumexp(logits_i)^2
    weighted_loss: torch.Tensor  # aux_loss_coef * load_balancing_loss + z_loss_coef * z_loss
    expert_load: torch.Tensor  # [E] fraction of the routed (token, slot) pairs each expert got; sums to 1, detached


def router_losses(
    logits: torch.Tensor, probs: torch.Tensor, top_idx: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load-balancing loss, z-loss and expert load from ``logits``/``probs [N, E]`` and ``top_idx [N, k]``.

    Load balancing (Switch Transformer eqs. 4-6, top-k form as in HF Mixtral): ``E * sum_e f_e P_e`` with
    ``f_e`` = top-k assignments to expert e per token and ``P_e`` = mean router probability of e.
    Z-loss (ST-MoE eq. 5): ``mean_i (logsumexp_j logits_ij)^2``. ``token_mask [N]`` (True = counted) drops padding.
    """
    n, e = probs.shape
    dtype = torch.promote_types(probs.dtype, torch.float32)
    weight = torch.ones(n, device=probs.device, dtype=dtype) if token_mask is None else token_mask.to(dtype)
    total = weight.sum().clamp_min(1.0)
    counts = torch.zeros(e, device=probs.device, dtype=dtype)
    counts = counts.scatter_add(0, top_idx.reshape(-1), weight.repeat_interleave(top_idx.shape[1]))  # [E]
    f = counts / total
    p = (probs.to(dtype) * weight[:, None]).sum(0) / total  # [E]
    load_balancing = e * (f * p).sum()
    z = (torch.logsumexp(logits.to(dtype), dim=-1).square() * weight).sum() / total
    return load_balancing, z, (counts / counts.sum().clamp_min(1.0)).detach()


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` runs here: bf16 on CPU or on CUDA sm90+, 16-byte aligned matrix sizes."""
    if dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm") or any(d % 8 for d in dims):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


def _expert_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


@FFNS.register("moe", MoEConfig)
class MoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts; ``forward(x [B, T, D]) -> [B, T, D]``.

    Routers: ``softmax_topk`` (Mixtral: softmax over all experts, keep the top k, renormalize them to sum 1) or
    ``topk_softmax`` (softmax over the top-k logits); both give the same weights up to rounding, and with ``top_k=1``
    the weight is always 1, so the router then learns from the auxiliary losses only. Dispatch ``grouped`` sorts the (token, slot) pairs by expert
    and runs one grouped matmul (``torch._grouped_mm`` where supported, else one matmul per contiguous expert
    segment); ``loop`` is the plain per-expert reference. Jitter multiplies the router input only (as in Switch).
    """

    def __init__(self, config: MoEConfig, d_model: int, layer_idx: int):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        hidden = config.resolved_expert_hidden(d_model)
        self.expert_hidden = hidden
        self.gate = nn.Linear(d_model, config.num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(config.num_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(config.num_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(config.num_experts, hidden, d_model))
        self.shared = None
        if config.shared_experts:
            self.shared = SwiGLU(SwiGLUConfig(hidden_size=config.shared_experts * hidden), d_model, layer_idx)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if config.shared_expert_gate else None
        self.pending_routes: list[tuple] = []  # (logits, probs, top_idx, token mask or None) per call

    def init_parameters(self) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            init.normal_(w, mean=0.0, std=0.02)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [N, D]`` -> (logits [N, E], probs [N, E], top-k weights [N, k], top-k experts [N, k]); fp32 or wider."""
        if self.training and self.config.router_jitter > 0:
            j = self.config.router_jitter
            h = h * torch.empty_like(h).uniform_(1.0 - j, 1.0 + j)
        logits = self.gate(h)
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # router math in fp32 at least
        probs = torch.softmax(logits32, dim=-1)
        if self.config.router == "softmax_topk":
            top_w, top_idx = torch.topk(probs, self.top_k, dim=-1)
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        else:
            top_logits, top_idx = torch.topk(logits32, self.top_k, dim=-1)
            top_w = torch.softmax(top_logits, dim=-1)
        return logits, probs, top_w, top_idx

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``token_mask [B, T]`` (True = real token) only decides which tokens the auxiliary losses count."""
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, D]
        logits, probs, top_w, top_idx = self.route(h)
        mask = None if token_mask is None else token_mask.reshape(-1).to(device=h.device, dtype=torch.bool)  # [N]
        if not is_replaying():  # activation checkpointing's recomputation: the forward already recorded these routes
            self.pending_routes.append((logits, probs, top_idx, mask))
        if self.config.dispatch == "grouped":
            y = self._grouped(h, top_w, top_idx)
        else:
            y = self._loop(h, top_w, top_idx)
        if self.shared is not None:
            shared = self.shared(h)  # [N, D]
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(h)) * shared  # [N, 1] gate per token
            y = y + shared
        return y.reshape(shape)

    def pop_stats(self) -> RouterStats | None:
        """Router statistics over every forward since the last pop (None if there was none), then forgotten here
        so that the module keeps no graph alive."""
        if not self.pending_routes:
            return None
        logits, probs, top_idx, masks = zip(*self.pending_routes)
        self.pending_routes = []
        mask = None  # every token counts, unless some call had a token mask
        if any(m is not None for m in masks):
            mask = torch.cat([m if m is not None else torch.ones(len(l), dtype=torch.bool, device=l.device) for m, l in zip(masks, logits)])
        logits, probs, top_idx = torch.cat(logits), torch.cat(probs), torch.cat(top_idx)
        load_balancing, z, load = router_losses(logits, probs, top_idx, mask)
        weighted = self.config.aux_loss_coef * load_balancing + self.config.z_loss_coef * z
        return RouterStats(logits, load_balancing, z, weighted, load)

    def discard_stats(self) -> None:
        """Forget the pending routing decisions without computing losses (decoding loops)."""
        self.pending_routes = []

    def _grouped(self, h: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        n, k = top_idx.shape
        flat = top_idx.reshape(-1)  # [N*k] expert of each (token, slot)
        order = torch.argsort(flat, stable=True)  # slots sorted by expert
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        xs = h[order // k]  # [N*k, D], grouped by expert
        w_gate, w_up, w_down = self.w_gate, self.w_up, self.w_down
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        # Without gradients, torch's CPU grouped matmul also runs fp32 (its CPU backward does not: training keeps the
        # per-expert matmuls); one call instead of one per expert, as Hugging Face's Mixtral decodes.
        forward_only_fp32 = dtype == torch.float32 and h.device.type == "cpu" and not torch.is_grad_enabled()
        if grouped_mm_supported(torch.bfloat16 if forward_only_fp32 else dtype, h.device, self.d_model, self.expert_hidden):
            xs, w_gate, w_up, w_down = (t.to(dtype) for t in (xs, w_gate, w_up, w_down))
            offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end of each expert's rows
            a = F.silu(torch._grouped_mm(xs, w_gate, offs=offs)) * torch._grouped_mm(xs, w_up, offs=offs)  # [N*k, H]
            ys = torch._grouped_mm(a, w_down, offs=offs)  # [N*k, D]
        else:
            sizes = counts.tolist()
            segments = xs.split(sizes)  # one [n_e, D] block per expert
            experts = zip(segments, w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0))  # unbind: one stacked grad
            ys = torch.cat([_expert_ffn(*args) for args, size in zip(experts, sizes) if size])  # experts with tokens only
        ys = ys[torch.argsort(order)].reshape(n, k, -1)  # back to [N, k, D] in (token, slot) order
        return (ys * top_w.unsqueeze(-1).to(ys.dtype)).sum(1).to(h.dtype)

    def _loop(self, h: torch.Tensor, top_w: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(h)
        experts = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        for e, (w_gate, w_up, w_down) in enumerate(experts):
            token, slot = torch.where(top_idx == e)
            out = _expert_ffn(h[token], w_gate, w_up, w_down)  # [n_e, D]
            y = y.index_add(0, token, out * top_w[token, slot, None].to(out.dtype))
        return y


def moe_modules(layers: Any) -> list[MoE]:
    """The MoE FFNs of a model's residual ``layers``, also inside wrappers (PEFT's ``target_parameters`` wraps an MoE
    FFN in ParamWrappers). Only the FFNs are walked: the whole tree, every decode step, costs more than some small
    models' step."""
    ffns = [getattr(layer, "ffn", layer) for layer in layers]
    return [module for ffn in ffns if ffn is not None for module in ffn.modules() if isinstance(module, MoE)]


def discard_router_stats(layers: Any) -> bool:
    """Forget the pending routing decisions of every MoE FFN in ``layers`` (decoding); False when there is none."""
    moes = moe_modules(layers)
    for module in moes:
        module.discard_stats()
    return bool(moes)


def router_stats(layers: Any) -> dict[str, Any] | None:
    """The last forward's router statistics, taken off the MoE FFNs of ``layers`` (so no graph stays alive on them):
    ``router_loss``, ``aux_loss``, ``z_loss`` (per-layer losses averaged over the MoE layers; with one MoE layer,
    ``aux_loss`` equals Mixtral's), ``expert_load [n_moe_layers, E]`` and ``router_logits`` (per layer); None when
    no MoE FFN routed since the last call."""
    stats = [s for s in (module.pop_stats() for module in moe_modules(layers)) if s is not None]
    if not stats:
        return None
    return {
        "router_loss": torch.stack([s.weighted_loss for s in stats]).mean(),
        "aux_loss": torch.stack([s.load_balancing_loss for s in stats]).mean(),
        "z_loss": torch.stack([s.z_loss for s in stats]).mean(),
        "expert_load": torch.stack([s.expert_load for s in stats]),
        "router_logits": tuple(s.router_logits for s in stats),
    }
