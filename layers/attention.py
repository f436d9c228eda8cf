"""Causal multi-head attention with RoPE and grouped-query heads; the KV cache is its state.

Options of the Qwen3 / Qwen3-Next attention (each off by default; ``tests/test_attention_options.py``):
``output_gate`` (Qiu et al. 2025, "Gated Attention for LLMs": q_proj also gives a per-channel gate ``g``, and the
heads' output is ``o * sigmoid(g)`` before o_proj; q_proj's rows are per head ``[query Dh | gate Dh]``, as
transformers' ``Qwen3NextAttention``), ``qk_norm`` (a norm of ``zoo.layers.NORMS`` over each head's Dh channels of q
and k before RoPE: Qwen3's ``rmsnorm``, Qwen3-Next's ``rmsnorm_zero_centred``) and ``partial_rotary_factor`` (RoPE on
the first ``factor * Dh`` channels of each head only; the rest pass through).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import BackendUnavailableError, ConfigError
from zoo.typed import bounded, checked

from .base import Documents, SequenceMixer
from .norm import NORMS
from .registry import MIXERS

BACKENDS = ("auto", "sdpa", "flash_attn", "eager")


@dataclass
@checked
class AttentionConfig:
    n_heads: int = bounded(4, ge=1)
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = bounded(10000.0, gt=0)
    backend: str = "auto"  # auto | sdpa | flash_attn | eager
    bias: bool = False
    causal: bool = True  # False: every query sees every key (bidirectional denoisers, e.g. masked diffusion)
    output_gate: bool = False  # o * sigmoid(g) before o_proj, g from a doubled q_proj (Qwen3-Next's gated attention)
    qk_norm: str | None = None  # a name in zoo.layers.NORMS: per-head norm of q and k before RoPE (Qwen3); None: none
    qk_norm_eps: float = bounded(1e-6, gt=0)
    partial_rotary_factor: float = bounded(1.0, gt=0, le=1)  # RoPE on the first factor * head_dim channels

    def validate(self, d_model: int) -> None:
        if self.head_dim is None and d_model % self.n_heads:
            raise ConfigError("n_heads", f"d_model={d_model} is not divisible by n_heads={self.n_heads}; set head_dim or change one")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError("head_dim", f"must be an even number >= 2 for RoPE, got {self.head_dim}")
        if self.head_dim is None and (d_model // self.n_heads) % 2:
            raise ConfigError("n_heads", f"head dim d_model/n_heads = {d_model // self.n_heads} must be even for RoPE")
        rotary = self.rotary_dim(d_model)
        if rotary < 2 or rotary % 2:
            raise ConfigError(
                "partial_rotary_factor",
                f"{self.partial_rotary_factor} * head_dim {self.head_dim or d_model // self.n_heads} gives {rotary} rotary channels; need an even number >= 2",
            )
        if self.qk_norm is not None and self.qk_norm not in NORMS:
            raise ConfigError("qk_norm", f"unknown norm {self.qk_norm!r}; norms: {', '.join(NORMS)}, or null for none")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ConfigError("n_kv_heads", f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"unknown attention backend '{self.backend}'; choose one of {', '.join(BACKENDS)}")

    def rotary_dim(self, d_model: int) -> int:
        """Channels of each head that RoPE rotates (transformers' ``int(head_dim * partial_rotary_factor)``)."""
        return int((self.head_dim or d_model // self.n_heads) * self.partial_rotary_factor)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def _attn_implementation(self) -> str:
        """transformers' name of this backend (its tests read ``module.config._attn_implementation``)."""
        return hf_name(self.backend)


# transformers' ``attn_implementation`` name of each backend; ``auto`` reports the one it runs (see :func:`hf_name`).
HF_NAMES = {"sdpa": "sdpa", "flash_attn": "flash_attention_2", "eager": "eager"}


def hf_name(backend: str) -> str:
    """transformers' name of what ``backend`` runs (``auto``: flash-attn where it is installed, else SDPA)."""
    if backend == "auto":
        backend = "flash_attn" if flash_attn_available() else "sdpa"
    return HF_NAMES[backend]


def backend_for(hf_implementation: str) -> str:
    """The backend transformers' ``attn_implementation`` name stands for."""
    for backend, name in HF_NAMES.items():
        if name == hf_implementation:
            return backend
    raise ValueError(
        f"attn_implementation={hf_implementation!r}: zoo's attention runs {', '.join(map(repr, HF_NAMES.values()))} "
        f"(model.attention.backend {', '.join(HF_NAMES)})"
    )


class AttentionState(NamedTuple):
    """KV cache: keys and values of every token seen so far, grown by :meth:`append` (a new state each call).

    ``key_mask`` is set only for a batch of left-padded rows (see :meth:`Attention.stack_row_states`): False at the
    padding slots, which no query attends to and which do not count as RoPE positions. ``AttentionState(None, None)``
    is the empty cache of a first call.
    """

    k: torch.Tensor | None  # [B, H_kv, S, Dh]
    v: torch.Tensor | None  # [B, H_kv, S, Dh]
    key_mask: torch.Tensor | None = None  # [B, S] bool; None: every slot is a real token
    is_kv_cache = True

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """RoPE positions of the next ``T`` tokens: ``[T]``, or ``[B, T]`` per row when padding slots are skipped."""
        steps = torch.arange(T, device=device)
        if self.k is None:
            return steps
        if self.key_mask is None:
            return steps + self.k.shape[2]
        return self.key_mask.sum(-1, keepdim=True) + steps  # [B, T]

    def append(self, k: torch.Tensor, v: torch.Tensor, causal: bool = True):
        """``(state, k_all, v_all, mask)``: this cache with ``k, v [B, Hkv, T, Dh]`` concatenated, every key and value
        so far, and the keys each query may see (``[B, 1, T, S]`` bool; None: all, or causal by position)."""
        if self.k is None:
            return AttentionState(k, v), k, v, None
        k_all = torch.cat((self.k.to(k.dtype), k), dim=2)  # [B, Hkv, S, Dh]
        v_all = torch.cat((self.v.to(v.dtype), v), dim=2)
        if self.key_mask is None:
            return AttentionState(k_all, v_all), k_all, v_all, None
        B, _, T, _ = k.shape
        key_mask = torch.cat((self.key_mask, self.key_mask.new_ones(B, T)), dim=1)  # [B, S]
        mask = key_mask[:, None, None, :]  # [B, 1, 1, S]
        if causal:
            mask = mask & causal_mask(T, k_all.shape[2], k.device)  # [B, 1, T, S]
        return AttentionState(k_all, v_all, key_mask), k_all, v_all, mask

    def crop(self, keep: int) -> "AttentionState":
        """The cache of the first ``keep`` slots (a rollback, e.g. of rejected draft tokens in assisted decoding)."""
        key_mask = None if self.key_mask is None else self.key_mask[:, :keep]
        return AttentionState(self.k[:, :, :keep], self.v[:, :, :keep], key_mask)


class StaticAttentionState(NamedTuple):
    """A preallocated KV cache for static decoding (:mod:`zoo.decoding`), the one state zoo updates in place.

    New keys/values are written at slot ``length`` and the counters advance on the device, so a decode step has a
    fixed shape, no host synchronization and no allocation: it can be captured in a CUDA graph and replayed.
    Built from a prefilled :class:`AttentionState` by :meth:`Attention.static_state`.
    """

    k: torch.Tensor  # [B, H_kv, L, Dh], L = the longest sequence it can hold
    v: torch.Tensor  # [B, H_kv, L, Dh]
    key_mask: torch.Tensor  # [B, L] bool: True at slots holding a real token
    length: torch.Tensor  # [] int64: the next free slot (shared by all rows)
    next_positions: torch.Tensor  # [B] int64: each row's RoPE position of its next token (left padding skipped)
    is_kv_cache = True

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return self.next_positions[:, None] + torch.arange(T, device=device)  # [B, T]

    def append(self, k: torch.Tensor, v: torch.Tensor, causal: bool = True):
        """Write ``k, v [B, Hkv, T, Dh]`` at slot ``length`` in place and advance the counters; returns the same state,
        the whole buffers and the slots each query may see (``[B, 1, T, L]``)."""
        T, L = k.shape[2], self.k.shape[2]
        slots = self.length + torch.arange(T, device=k.device)  # [T]
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        self.key_mask.index_fill_(1, slots, True)
        mask = self.key_mask[:, None, None, :]  # [B, 1, 1, L]
        if causal:
            mask = mask & (torch.arange(L, device=k.device)[None, :] <= slots[:, None])  # [B, 1, T, L]
        self.length.add_(T)
        self.next_positions.add_(T)
        return self, self.k.to(k.dtype), self.v.to(v.dtype), mask

    def map_rows(self, fn) -> "StaticAttentionState":
        """``fn`` applied to every batch-first tensor (the shared slot counter ``length`` has no batch)."""
        return self._replace(k=fn(self.k), v=fn(self.v), key_mask=fn(self.key_mask), next_positions=fn(self.next_positions))


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def auto_attention_backend(device_type: str, dtype: torch.dtype) -> str:
    """What ``backend: auto`` runs for inputs on ``device_type`` in ``dtype``: flash-attn for CUDA fp16/bf16 where it
    is installed, else SDPA (which picks its own FlashAttention/cuDNN/memory-efficient kernel)."""
    use_flash = device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    return "flash_attn" if use_flash else "sdpa"


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions [T]`` (or per row, ``[B, T]``) in fp32, each ``[..., T, head_dim]``
    (halves repeated, Llama layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [..., T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, Dh]
    return emb.cos(), emb.sin()


def signed_rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_cos_sin` in ``dtype`` with sin's first half negated, the form :func:`apply_rope` takes."""
    cos, sin = rope_cos_sin(positions, head_dim, theta)
    half = head_dim // 2
    return cos.to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(dtype)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`signed_rope_tables` of positions ``0 .. L - 1`` (``L >= length``, ``[L, Dh]`` each), computed once per
    (head_dim, theta, device, dtype) and regrown by doubling: every attention layer of every step slices or indexes
    it instead of recomputing its tables (the same values: each entry is computed the same way). Ordinary tensors
    even under inference mode, so training may use them after a ``generate``."""
    key = (head_dim, float(theta), device, dtype)
    tables = _ROPE_TABLES.get(key)
    if tables is None or tables[0].shape[0] < length:
        size = max(256, 1 << (length - 1).bit_length())
        with torch.inference_mode(False), torch.no_grad():
            tables = signed_rope_tables(torch.arange(size, device=device), head_dim, theta, dtype)
        _ROPE_TABLES[key] = tables
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, Dh]`` by the tables ``[T, Dh]`` or ``[B, 1, T, Dh]`` of :func:`signed_rope_tables` in x's
    dtype: ``x cos + rotate_half(x) sin`` (HF Llama's rotate-half convention, the same values) with
    ``rotate_half(x) sin = roll(x, Dh/2) signed_sin``, one op instead of chunk, negation and concatenation."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def check_flash_attn_inputs(q: torch.Tensor) -> None:
    """flash-attn takes CUDA fp16 / bf16 tensors only."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise BackendUnavailableError(f"attention backend 'flash_attn' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}")


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[q_len, k_len]`` mask, True where query i (at position k_len - q_len + i) may see key j."""
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_pos


@MIXERS.register("attention", AttentionConfig)
class Attention(SequenceMixer):
    """Self-attention, causal unless ``causal: false``: RoPE, GQA, SDPA / flash-attn / eager backends, KV-cache state."""

    state_can_roll_back = True
    layer_type = "full_attention"
    # Set by the model for calls that return attention maps (``output_attentions``): such a call attends through the
    # eager path and leaves its softmax probabilities ``[B, H, T, S]`` in ``attention_weights``.
    record_weights = False
    attention_weights: torch.Tensor | None = None

    @classmethod
    def bidirectional(cls, config: AttentionConfig, d_model: int, layer_idx: int) -> "Attention":
        """Attention sees both directions by dropping its causal mask (no second instance needed)."""
        return cls(dataclasses.replace(config, causal=False), d_model, layer_idx)

    def __init__(self, config: AttentionConfig, d_model: int, layer_idx: int):
        super().__init__(config, d_model, layer_idx)
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim or d_model // config.n_heads
        self.rotary_dim = config.rotary_dim(d_model)
        self.set_backend(config.backend)
        q_width = self.n_heads * self.head_dim * (2 if config.output_gate else 1)  # per head [query | gate]
        self.q_proj = nn.Linear(d_model, q_width, bias=config.bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=config.bias)
        if config.qk_norm is not None:
            self.q_norm = NORMS[config.qk_norm](self.head_dim, config.qk_norm_eps)
            self.k_norm = NORMS[config.qk_norm](self.head_dim, config.qk_norm_eps)

    @classmethod
    def hf_attributes(cls, config: AttentionConfig, d_model: int) -> dict:
        """transformers' standard config attributes this block's section gives (heads, KV heads, head size, RoPE base)."""
        return {"num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
                "head_dim": config.head_dim or d_model // config.n_heads, "rope_theta": config.rope_theta}

    def set_backend(self, backend: str) -> None:
        """Use ``backend`` (one of ``BACKENDS``, checked by :meth:`AttentionConfig.validate`) from now on; flash_attn
        must be installed."""
        if backend == "flash_attn" and not flash_attn_available():
            raise BackendUnavailableError(
                "attention backend 'flash_attn' was asked for but the flash-attn package is not installed "
                "(pip install 'zoo[cuda]' on a CUDA machine, or use backend: sdpa)"
            )
        self.backend = backend

    def init_state(self, batch_size, device=None, dtype=None) -> AttentionState:
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty.clone())

    def state_size_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    def static_state(self, state: AttentionState | None, max_length: int) -> StaticAttentionState:
        """``state`` (a prefilled KV cache, or None) copied into buffers holding ``max_length`` tokens."""
        if state is None:
            raise ValueError(f"attention block (layer {self.layer_idx}): static decoding starts from a prefilled state")
        B, H, S, Dh = state.k.shape
        if S > max_length:
            raise ValueError(f"attention block (layer {self.layer_idx}): {S} cached tokens exceed max_length={max_length}")
        k = state.k.new_zeros(B, H, max_length, Dh)
        v = state.v.new_zeros(B, H, max_length, Dh)
        k[:, :, :S], v[:, :, :S] = state.k, state.v
        real = state.key_mask if state.key_mask is not None else state.k.new_ones(B, S, dtype=torch.bool)
        key_mask = F.pad(real, (0, max_length - S), value=False)  # [B, L]
        length = torch.tensor(S, dtype=torch.long, device=k.device)
        return StaticAttentionState(k, v, key_mask, length, real.sum(-1).long())

    packs_documents = True

    def mix(self, x: torch.Tensor, state: AttentionState | StaticAttentionState | None, documents: Documents | None = None):
        """Project (-> q/k norm) -> rotate (RoPE at the state's next positions) -> append to the state -> attend
        (-> output gate). Packed ``documents``: RoPE at each token's position in its document, attention within each
        document (block-diagonal mask; flash-attn's varlen function on that backend); the state: the last document's
        keys and values."""
        B, T, _ = x.shape
        state = AttentionState(None, None) if state is None else state
        q = self.q_proj(x).view(B, T, self.n_heads, -1)  # [B, T, H, Dh], or [B, T, H, 2 Dh] with the output gate
        gate = None
        if self.config.output_gate:
            q, gate = q.chunk(2, dim=-1)  # [B, T, H, Dh] each
            gate = gate.reshape(B, T, self.n_heads * self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, Dh]
        if self.config.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Dh], [B, Hkv, T, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        if documents is None:
            cos, sin = self._rope_tables(state, T, x)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            state, k, v, mask = state.append(k, v, self.config.causal)
            y = self._attend(q, k, v, mask)
        else:
            cos, sin = rope_table(T, self.rotary_dim, self.config.rope_theta, x.device, x.dtype)
            cos, sin = cos[documents.positions], sin[documents.positions]  # [T, Dh]
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            state = AttentionState(k[:, :, documents.last_start :], v[:, :, documents.last_start :])
            y = self._attend_documents(q, k, v, documents)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*Dh]
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.o_proj(y), state

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:func:`apply_rope` on the first ``rotary_dim`` channels of ``x [B, H, T, Dh]`` (all of them by default)."""
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin)
        return torch.cat((apply_rope(x[..., : self.rotary_dim], cos, sin), x[..., self.rotary_dim :]), dim=-1)

    def _rope_tables(self, state: AttentionState | StaticAttentionState, T: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the next ``T`` positions of ``state`` in x's dtype: ``[T, Dh]`` shared by the rows, or
        ``[B, 1, T, Dh]``. Eager calls slice (a cache without padding: no op at all) or index the shared
        :func:`rope_table`; traced ones (torch.compile, export, tensor subclasses) compute them."""
        theta = self.config.rope_theta
        if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
            positions = state.positions(T, x.device)  # [T] or [B, T]
            cos, sin = signed_rope_tables(positions, self.rotary_dim, theta, x.dtype)
        else:
            past = 0 if state.k is None else state.k.shape[2]  # positions (and a static cache's slots) are below past + T
            cos, sin = rope_table(past + T, self.rotary_dim, theta, x.device, x.dtype)
            if isinstance(state, AttentionState) and state.key_mask is None:
                return cos[past : past + T], sin[past : past + T]
            positions = state.positions(T, x.device)  # [B, T]
            cos, sin = cos[positions], sin[positions]
        return (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos, sin)  # [B, 1, T, Dh]

    def stack_row_states(self, states: list[AttentionState]) -> AttentionState:
        """Left-pad single-row KV caches of different lengths to the longest; ``key_mask`` marks the real slots."""
        length = max(s.k.shape[2] for s in states)
        ks, vs, masks = [], [], []
        for s in states:
            pad = length - s.k.shape[2]
            real = s.key_mask if s.key_mask is not None else s.k.new_ones(1, s.k.shape[2], dtype=torch.bool)
            ks.append(F.pad(s.k, (0, 0, pad, 0)))  # [1, Hkv, length, Dh], zeros before the tokens
            vs.append(F.pad(s.v, (0, 0, pad, 0)))
            masks.append(F.pad(real, (pad, 0), value=False))  # [1, length]
        return AttentionState(torch.cat(ks), torch.cat(vs), torch.cat(masks))

    def _attend_documents(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents) -> torch.Tensor:
        """Attention of packed documents, ``q [1, H, T, Dh]`` over ``k, v [1, Hkv, T, Dh]``: each query sees its own
        document's keys (up to itself when causal). flash-attn: ``flash_attn_varlen_func`` on the documents'
        ``cu_seqlens``; otherwise :meth:`_attend` per document (a block-diagonal mask over the whole row would cost
        ``T^2``: 2.9x the concatenated step in ``benchmarks/results/packing-*.md``)."""
        backend = auto_attention_backend(q.device.type, q.dtype) if self.backend == "auto" else self.backend
        if backend != "flash_attn":
            return torch.cat([self._attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None) for a, b in documents.spans()], dim=2)
        check_flash_attn_inputs(q)
        from flash_attn import flash_attn_varlen_func

        cu = documents.cu_seqlens.to(torch.int32)
        longest = max(b - a for a, b in documents.spans())
        y = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, longest, longest,
                                   causal=self.config.causal)  # [T, H, Dh]
        return y.transpose(0, 1)[None]  # [1, H, T, Dh]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``q [B, H, T, Dh]`` over ``k, v [B, Hkv, S, Dh]``. ``mask`` (broadcast to ``[B, H, T, S]``,
        True: visible) as the state gave it; None: every key, causal (queries are the last T of S) unless
        ``config.causal`` is False. Eager (the reference, which keeps the probabilities when ``record_weights``),
        flash-attn (no explicit mask) or SDPA."""
        T, S = q.shape[2], k.shape[2]
        causal = self.config.causal
        backend = auto_attention_backend(q.device.type, q.dtype) if self.backend == "auto" else self.backend
        if mask is None and (backend == "eager" or self.record_weights):
            mask = causal_mask(T, S, q.device) if causal else q.new_ones(T, S, dtype=torch.bool)  # [T, S]
        if backend == "eager" or self.record_weights:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, Dh]
            scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim**0.5  # [B, H, T, S]
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            if self.record_weights:
                self.attention_weights = probs.to(q.dtype)
            return (probs @ v.float()).to(q.dtype)
        gqa = self.n_heads != self.n_kv_heads
        if mask is not None:  # flash_attn_func takes no per-row key mask: SDPA with the explicit mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if backend == "flash_attn":
            check_flash_attn_inputs(q)
            from flash_attn import flash_attn_func

            # flash-attn aligns the causal mask bottom-right, which is what a KV cache needs.
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)  # [B, T, H, Dh]
            return y.transpose(1, 2)
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        if T == S:
            # A Python bool even when T is symbolic (torch.export): one query over one key is causal too.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = None if T == 1 else causal_mask(T, S, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
