"""What every zoo Triton entry point shares: the check before launching (supported dtypes, one device, the head dim,
and, for CPU tensors, the Triton interpreter), the target its launcher picks tiles for, the recurrent tiles, the
``tl.dot`` precision, and the autograd ``Function`` around a forward and a backward launcher. Imported by the Triton
kernel files only (``import zoo`` never loads Triton)."""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from zoo.kernels.backends import CuSeqlens

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # kernels that hold a [K, BV] state in registers refuse larger head dims
MAX_GRID_YZ = 65535  # CUDA's limit of grid axes y and z (x allows 2^31 - 1)


def check_triton_call(op: str, kernel, *tensors: torch.Tensor | None, head_dim: int | None = None,
                      batch_heads: int | None = None) -> None:
    """Raise a ValueError prefixed with ``op`` unless every given tensor is fp32/bf16/fp16 on the first one's device,
    ``head_dim`` (when given) is at most :data:`MAX_HEAD_DIM`, ``batch_heads`` (B * H, when the op's grids put it in
    axis y or z) is at most :data:`MAX_GRID_YZ`, and CPU tensors run where ``kernel`` (any of the op's ``@triton.jit``
    kernels) is interpreted."""
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim K={head_dim} exceeds {MAX_HEAD_DIM} (the state is held in registers)")
    if batch_heads is not None and batch_heads > MAX_GRID_YZ:
        raise ValueError(f"{op}: B * H = {batch_heads:,} exceeds {MAX_GRID_YZ:,}, CUDA's limit of the launch grid's y "
                         f"and z axes, where these kernels put batch x heads; split the batch")
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: inputs must be float32, bfloat16 or float16, got {t.dtype}; use the torch backend")
        if t.device != device:
            raise ValueError(f"{op}: all inputs must be on {device}, got one on {t.device}")
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise ValueError(f"{op}: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported")


def device_guard(device: torch.device):
    """The context every launch runs in: ``device`` made the current CUDA device (Triton launches on the current
    device and its stream, not the tensors'), nothing for CPU (the interpreter) and meta tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# Segmented recompute (issue 26, finding 8): above S tokens a scan runs as consecutive segments of S tokens carrying
# the state, keeps only each segment's start state (plus its inputs) for the backward, and recomputes one segment's
# forward buffers just before that segment's backward, walking the segments in reverse. The op's own buffers then grow
# with S, not T. Why this S: at the long-context shape B = 1, H = 32, K = V = 128 (2^19 state elements) S = 2^33 /
# 2^19 = 16,384 tokens, where a segment's fp32 chunk states (a [K, V] state every 16 tokens) take 2 GiB and each
# [NV, B, S, H, K] partial gradient 1 GiB: every op's own buffers peak at 5-9 GiB, under the 16 GiB goal with room
# (benchmarks/results/kernels-memory-128k.md). Parallelism: a segmented launch has S / BT chunks per (V block, batch x
# head), 1,024 at that shape (131,072 programs per chunk launch) and at least 16 (S >= 1,024); the shape of the
# parallelism bar (B = 1, T = 16k, H = 16, K = V = 64: S = 131,072) and every benchmark shape are one segment, the
# path and launches of before. The cost: one more forward per segment.
SEGMENT_ELEMENTS = 2**33  # token x state elements of one segment: S * (the state's numel, batch included)
SEGMENT_MULTIPLE = 1024  # S is a multiple of it (so of every chunk length) and at least it
_forced_segment: list[int | None] = [None]


@contextlib.contextmanager
def forced_segment(tokens: int | None):
    """Run every scan in segments of ``tokens`` (None: never segment) inside the context, whatever its shape (tests,
    and the memory table's unsegmented column)."""
    saved, _forced_segment[0] = _forced_segment[0], tokens if tokens is not None else 2**62
    try:
        yield
    finally:
        _forced_segment[0] = saved


def segment_tokens(state_elements: int) -> int:
    """S, the tokens of a segment of a scan whose state (batch included) has ``state_elements`` entries:
    ``SEGMENT_ELEMENTS / state_elements`` rounded down to a multiple of ``SEGMENT_MULTIPLE``, at least that."""
    if _forced_segment[0] is not None:
        return _forced_segment[0]
    return max(SEGMENT_MULTIPLE, SEGMENT_ELEMENTS // max(state_elements, 1) // SEGMENT_MULTIPLE * SEGMENT_MULTIPLE)


def _token_slice(tensors: list, layout: str, s0: int, s1: int) -> list:
    """Tokens ``[s0, s1)`` of the per-token (``t``: ``[B, T, ...]``) tensors, contiguous; parameters (``p``) as given."""
    return [t[:, s0:s1].contiguous() if t is not None and kind == "t" else t for t, kind in zip(tensors, layout, strict=True)]


def _forward_segments(fwd: Callable, tensors: list, config: tuple, layout: str, bounds: list) -> tuple:
    """Run ``fwd`` segment after segment, each from the last one's final state. Returns ``(out [B, T, ...], final,
    starts)``; ``starts``: the state entering each segment (the first: the initial state, possibly None)."""
    *inputs, state = tensors
    out, starts = None, []
    for s0, s1 in bounds:
        starts.append(state)
        res = fwd(*_token_slice(inputs, layout, s0, s1), state, *config)
        piece, state = res[0], _contiguous(res[1])
        del res  # this segment's saved buffers: recomputed in the backward
        if out is None:
            out = piece.new_empty(piece.shape[0], inputs[0].shape[1], *piece.shape[2:])  # [B, T, ...]
        out[:, s0:s1] = piece
        del piece
    return out, state, starts


def _backward_segments(fwd: Callable, bwd: Callable, inputs: list, starts: list, d_out, d_final, config: tuple,
                       layout: str, bounds: list) -> list:
    """The segments in reverse: recompute one segment's forward from its start state, run ``bwd`` on it with the
    gradient of its final state (``d_final``, then the next segment's initial-state gradient), write its per-token
    gradients into full-length buffers in the inputs' dtypes and add up the parameters' (fp32). Returns the gradients
    of ``inputs`` then of the initial state (fp32)."""
    grads = [None if x is None else torch.empty_like(x) if kind == "t" else torch.zeros(x.shape, dtype=torch.float32, device=x.device)
             for x, kind in zip(inputs, layout, strict=True)]
    d_state = d_final
    for (s0, s1), state in zip(reversed(bounds), reversed(starts)):
        piece = _token_slice(inputs, layout, s0, s1)
        saved = fwd(*piece, state, *config)[2:]
        d_piece = bwd(*piece, _contiguous(d_out[:, s0:s1]), d_state, *saved, *config)
        del saved
        for g, d, kind in zip(grads, d_piece, layout):
            if g is not None and kind == "t":
                g[:, s0:s1] = d
            elif g is not None:
                g += d
        d_state = _contiguous(d_piece[-1])  # a launcher may return a view (a slot of its state gradients)
        del d_piece
    return [*grads, d_state]


def scan_function(fwd: Callable, bwd: Callable, n_config: int = 1, layout: str | None = None,
                  state_elements: Callable[..., int] | None = None) -> type[torch.autograd.Function]:
    """The autograd ``Function`` of a scan whose ``apply`` takes its tensors (the last one the initial state, each
    may be None) then ``n_config`` non-tensor arguments. ``fwd(*tensors, *config)`` returns ``(out, final_state,
    *saved)``; ``bwd(*tensors_but_the_state, d_out, d_final, *saved, *config)`` returns the fp32 gradients of every
    tensor, which come back in their inputs' dtypes (None for an absent input). Inputs are made contiguous; both
    launchers run under :func:`device_guard` of the first tensor's device.

    With ``layout`` (one letter per tensor but the state: ``t`` per-token ``[B, T, ...]``, ``p`` a parameter shared
    by every token) and ``state_elements(*tensors)`` (the state's numel, batch included), sequences longer than
    :func:`segment_tokens` run in segments (segmented recompute, above): the same outputs and gradients up to
    rounding, the op's buffers those of one segment. ``T <= S`` takes the one-launch-sequence path, the only one for
    packed documents (a :class:`~zoo.kernels.backends.CuSeqlens` among the config, passed to both launchers as is:
    the caller checks :func:`varlen_in_one_launch` first)."""
    if (layout is None) != (state_elements is None):
        raise ValueError("scan_function: give both layout and state_elements, or neither")

    class ScanFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            tensors, config = [_contiguous(t) for t in args[:-n_config]], args[-n_config:]
            # packed documents' boundaries copied to the device once, for the forward and the backward launch
            config = tuple(CuSeqlens(c.bounds, c.on(tensors[0].device)) if isinstance(c, CuSeqlens) else c for c in config)
            ctx.n_inputs, ctx.config, ctx.bounds = len(tensors) - 1, config, None
            ctx.dtypes = [None if t is None else t.dtype for t in tensors]
            T = tensors[0].shape[1]
            S = segment_tokens(state_elements(*tensors)) if layout is not None else T
            if T > S and any(isinstance(c, CuSeqlens) for c in config):
                raise ValueError(f"packed documents of {T} tokens exceed a segment of {S}: run each document alone")
            with device_guard(tensors[0].device):
                if T <= S:
                    out, final, *saved = fwd(*tensors, *config)
                else:
                    ctx.bounds = [(s0, min(s0 + S, T)) for s0 in range(0, T, S)]
                    out, final, saved = _forward_segments(fwd, tensors, config, layout, ctx.bounds)
            ctx.save_for_backward(*tensors[:-1], *saved)
            return out, final

        @staticmethod
        def backward(ctx, d_out, d_final):
            saved = ctx.saved_tensors
            inputs, rest = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
            with device_guard(inputs[0].device):
                if ctx.bounds is None:
                    grads = bwd(*inputs, _contiguous(d_out), _contiguous(d_final), *rest, *ctx.config)
                else:
                    grads = _backward_segments(fwd, bwd, list(inputs), list(rest), d_out, _contiguous(d_final), ctx.config,
                                               layout, ctx.bounds)
            return (*(None if dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), *[None] * n_config)

    return ScanFunction


class Target(NamedTuple):
    """What a launcher's tile choice and ``tl.dot`` precision depend on besides shape and dtype."""

    arch: int  # 10 * major + minor of the CUDA capability (80, 86, 89, 90, ...); 0: none of them
    tf32: bool = True  # NVIDIA tensor cores: tl.dot takes input_precision "tf32x3" (every CUDA target, no AMD one)
    tensor_cores: bool = True  # tl.dot takes bf16 / fp16 operands in their own dtype (every GPU; not the interpreter)


# The safe tiles (those of the GPUs without a table of their own) and exact fp32 products: CPU tensors (the
# interpreter, exact whatever the precision; its bf16 dots are wrong in Triton 3.9, so 16-bit inputs are multiplied
# as fp32, the same products) and ROCm, whose capabilities (9.0 for MI250, 9.4 for MI300) are not NVIDIA's and whose
# Triton front end refuses "tf32x3" (gfx942 takes "tf32" only, too coarse for fp32 states).
DEFAULT_TARGET = Target(0, tf32=False, tensor_cores=False)
ROCM_TARGET = Target(0, tf32=False)  # the default tiles, bf16 / fp16 operands on the matrix cores


def launch_target(device: torch.device) -> Target:
    """The target of a launch on ``device`` (the current device: launches run under :func:`device_guard`): its CUDA
    capability (what fla and mamba-ssm key their tiles on), :data:`ROCM_TARGET` on ROCm, or :data:`DEFAULT_TARGET`
    for CPU tensors."""
    if device.type == "cpu":
        return DEFAULT_TARGET
    if torch.version.hip:
        return ROCM_TARGET
    major, minor = torch.cuda.get_device_capability(device)
    return Target(10 * major + minor)


class Launch(NamedTuple):
    """The compile options of one kernel launch."""

    num_warps: int
    num_stages: int


class RecurrentTiles(NamedTuple):
    """Launch parameters of a fused-recurrent kernel pair (RWKV-6, RWKV-7, retention): each program holds a
    ``[BK, BV]`` state slice; forward and backward share BK and BV (the checkpoints are ``[BK, BV]`` blocks)."""

    BK: int
    BV: int
    launch: Launch


def recurrent_tiles(K: int, V: int, dtype: torch.dtype, target: Target) -> RecurrentTiles:
    """V blocks of at most 32 (more programs when B * H is small); 4 warps up to 2048 state entries per program (16 per
    thread), 8 above (at 4, RWKV-6's forward at head dim 128 spilled on sm_86 / sm_89). The same on every target and
    input dtype."""
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)
    return RecurrentTiles(BK, BV, Launch(num_warps=4 if BK * BV <= 2048 else 8, num_stages=3))


def _documents(B: int, T: int, cu_seqlens) -> tuple[int, int]:
    """``(N, longest)``: the sequences a recurrent launch walks and the longest one's tokens, ``(B, T)`` without
    packed documents, else from the host bounds of ``cu_seqlens`` (no device sync)."""
    if cu_seqlens is None:
        return B, T
    bounds = cu_seqlens.bounds
    return len(bounds) - 1, max(b - a for a, b in zip(bounds, bounds[1:]))


def recurrent_fwd(kernel, inputs: list[torch.Tensor], V: int, initial_state: torch.Tensor | None, chunk_size: int,
                  cu_seqlens=None):
    """Launch a fused-recurrent forward ``kernel(*inputs, s0, o, ckpt, s_final, cu, T, NC, **shapes)`` (the first input
    ``[B, T, H, K]``, contiguous) over N sequences: the B rows, or with ``cu_seqlens`` (a
    :class:`~zoo.kernels.backends.CuSeqlens` over ``B = 1``) the N packed documents, ``cu`` its int tensor (None
    without). Grid ``(cdiv(V, BV), N * H)``, a checkpoint every ``chunk_size`` tokens of each sequence, NC =
    ``cdiv(longest, chunk_size)`` slots per program. Returns fp32 ``(o [B, T, H, V], final_state [N, H, K, V],
    checkpoints [N * H * NV, NC, BK, BV])``."""
    B, T, H, K = inputs[0].shape
    N, longest = _documents(B, T, cu_seqlens)
    t = recurrent_tiles(K, V, inputs[0].dtype, launch_target(inputs[0].device))
    NV, NC = triton.cdiv(V, t.BV), triton.cdiv(longest, chunk_size)
    f32 = dict(dtype=torch.float32, device=inputs[0].device)
    o, s_final = torch.empty(B, T, H, V, **f32), torch.empty(N, H, K, V, **f32)
    ckpt = torch.empty(N * H * NV, NC, t.BK, t.BV, **f32)
    has_s0 = initial_state is not None
    cu = None if cu_seqlens is None else cu_seqlens.on(inputs[0].device)
    kernel[(NV, N * H)](
        *inputs, initial_state if has_s0 else s_final, o, ckpt, s_final, cu,
        T, NC, H=H, K=K, V=V, BK=t.BK, BV=t.BV, CH=chunk_size, HAS_S0=has_s0, IS_VARLEN=cu is not None,
        **t.launch._asdict(),
    )
    return o, s_final, ckpt


def recurrent_bwd(kernel, inputs: list[torch.Tensor], do, ds_final, ckpt, chunk_size: int, grads: str,
                  cu_seqlens=None) -> list[torch.Tensor]:
    """Launch a fused-recurrent backward ``kernel(*inputs, do, ds_final, ckpt, scratch, *grads, ds0, cu, T, NC, B,
    **shapes)`` over the forward's N sequences (``B`` = N) and grid; ``grads`` names the kernel's gradient buffers in
    order, one letter each: ``k`` ``[NV, B, T, H, K]`` and ``u`` ``[NV, N, H, K]`` / ``g`` ``[NV, N, H]`` (per-V-block
    and per-sequence partial sums, added up here), ``v`` ``[B, T, H, V]``. Returns fp32 ``[*grads,
    d_initial_state [N, H, K, V]]``."""
    B, T, H, K = inputs[0].shape
    N = _documents(B, T, cu_seqlens)[0]
    V = do.shape[-1]
    t = recurrent_tiles(K, V, inputs[0].dtype, launch_target(inputs[0].device))
    NV = triton.cdiv(V, t.BV)
    f32 = dict(dtype=torch.float32, device=inputs[0].device)
    shapes = {"k": (NV, B, T, H, K), "v": (B, T, H, V), "u": (NV, N, H, K), "g": (NV, N, H)}
    buffers = [torch.empty(shapes[g], **f32) for g in grads]
    ds0 = torch.empty(N, H, K, V, **f32)
    scratch = torch.empty(N * H * NV, chunk_size, t.BK, t.BV, **f32)
    has_ds = ds_final is not None
    cu = None if cu_seqlens is None else cu_seqlens.on(inputs[0].device)
    kernel[(NV, N * H)](
        *inputs, do, ds_final if has_ds else ds0, ckpt, scratch, *buffers, ds0, cu,
        T, ckpt.shape[1], N, H=H, K=K, V=V, BK=t.BK, BV=t.BV, CH=chunk_size, HAS_DS_FINAL=has_ds,
        IS_VARLEN=cu is not None, **t.launch._asdict(),
    )
    sums = {"k": (0,), "v": (), "u": (0, 1), "g": (0, 1)}
    out = []
    for g in grads:  # each partial buffer freed once added up: the peak holds one reduced gradient, not all
        b = buffers.pop(0)
        out.append(b.sum(sums[g]) if sums[g] else b)
        del b
    return out + [ds0]


@triton.jit
def state_or_zeros(p, mask, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A ``[BK, BV]`` fp32 state block loaded from pointers ``p`` (masked) when the kernel was given the state
    (``HAS``: an initial state, a final state's gradient), else zeros."""
    if HAS:
        b = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BK, BV], dtype=tl.float32)
    return b


@triton.jit
def state_block(buf, i_bh, i_v, slots, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers to slot 0 of program ``(i_v, i_bh)``'s ``[BK, BV]`` block (``i_v`` = program axis 0, the V blocks)
    in a padded fp32 buffer ``[B * H * NV, slots, BK, BV]``: the scans' checkpoints (``slots`` = the number of
    checkpoint chunks) or their per-step scratch (``slots`` = the checkpoint chunk length)."""
    block = i_bh * tl.num_programs(0) + i_v
    return buf + block * slots * BK * BV + tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]


@triton.jit
def sequence_span(cu, i_n, T, NC, CH: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(bos, L, N_C)`` of a fused-recurrent program's sequence ``i_n``: its tokens ``[bos, bos + L)`` and checkpoint
    chunks: document ``i_n`` of a packed row (``cu`` its int boundaries) with ``IS_VARLEN``, else row ``i_n`` of T
    tokens and NC chunks."""
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        L = (tl.load(cu + i_n + 1) - bos).to(tl.int32)
        N_C = tl.cdiv(L, CH)
    else:
        bos, L, N_C = i_n * T, T, NC
    return bos, L, N_C


@triton.jit
def chunk_span(chunk_indices, cu, i_t, t0, T, NT, H: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(t0, T_end, S_NT, S_t, G_NT, G_t)`` of a chunk-parallel program over chunk ``i_t`` (its program axis 0; ``t0 =
    i_t * BT`` computed by the kernel) of sequence ``i_b = i_bh // H``, head ``i_h``, for the kernels' index
    expressions: its tokens ``i_b * T + t0 + [0, min(BT, T_end - t0))``, its entering state at row ``i_bh * (S_NT +
    1) + S_t`` of the states buffer (the state after it: ``+ 1``), its row ``i_bh * G_NT + G_t`` of the per-chunk
    buffers (decay totals). Without ``IS_VARLEN`` (row i_b of T tokens in NT chunks, states ``[B * H, NT + 1]``):
    ``(t0, T, NT, i_t, NT, i_t)``, the arguments themselves (no op here), so those expressions are today's, op for
    op, in today's order. With it (``B = 1``: ``i_b = 0``, axis 2 the head h): chunk ``i_t`` of all documents'
    chunks is chunk ``c`` of document n, ``chunk_indices[i_t] = (n, c)`` (tokens ``[cu[n], cu[n + 1])``, ``NT_n``
    chunks, ``C_n = i_t - c`` chunks before it): ``t0 = cu[n] + c * BT``, ``T_end = cu[n + 1]``; document n, head h
    has its ``NT_n + 1`` state rows from ``H * (C_n + n) + h * (NT_n + 1)`` and its ``NT_n`` per-chunk rows from ``H
    * C_n + h * NT_n``."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_t).to(tl.int64)
        c = tl.load(chunk_indices + 2 * i_t + 1).to(tl.int64)
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        N_T = tl.cdiv(eos - bos, BT)
        C_n = i_t - c
        t0, T_end, S_NT, S_t, G_NT, G_t = bos + c * BT, eos, N_T, H * (C_n + i_n) + c, N_T, H * C_n + c
    else:
        T_end, S_NT, S_t, G_NT, G_t = T, NT, i_t, NT, i_t
    return t0, T_end, S_NT, S_t, G_NT, G_t


def varlen_in_one_launch(cu_seqlens, state_elements: int, chunk_size: int, heads: int) -> bool:
    """Whether a fused-recurrent scan runs packed documents ``cu_seqlens`` (a
    :class:`~zoo.kernels.backends.CuSeqlens`) in one launch sequence, each document's state having
    ``state_elements`` entries: when the N * H programs fit grid axis y and the checkpoint slots, N documents x
    ``cdiv(longest, chunk_size) * chunk_size`` tokens (every document gets the longest one's), fit one segment
    (:func:`segment_tokens`), so the buffers stay those of one segment. Otherwise the caller runs each document
    alone."""
    n, longest = _documents(1, 0, cu_seqlens)
    padded = n * triton.cdiv(longest, chunk_size) * chunk_size
    return n * heads <= MAX_GRID_YZ and padded <= segment_tokens(state_elements)


def dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The input dtype the ``tl.dot`` precision (:func:`dot_precision`), the operand dtype (:func:`operand_dtype`)
    and with them the tiles follow: fp32 when any tensor is fp32 or the 16-bit ones differ (bf16 with fp16), else
    their one 16-bit dtype."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def dot_precision(dtype: torch.dtype, target: Target) -> str:
    """The ``input_precision`` of the ``tl.dot`` products whose operands are fp32 (states S / dS, decayed or masked
    tiles, score matrices, products with dt, and fp32 inputs): fp32 accuracy everywhere. fp32 inputs: "ieee" (exact
    FMA products). bf16 / fp16 inputs: "tf32x3" (three tf32 tensor-core products, ~fp32 accurate; plain "tf32" keeps
    10 mantissa bits of an fp32 intermediate, too few for fp16 gradients at T = 1k) on NVIDIA targets, else "ieee"
    (ROCm; the interpreter, whose products are exact anyway). Dots of bf16 / fp16 inputs alone take
    their operands in the input dtype, exact on tensor cores at any precision."""
    return "tf32x3" if dtype != torch.float32 and target.tf32 else "ieee"


def operand_dtype(dtype: torch.dtype, target: Target):
    """The ``tl`` dtype the kernels give the operands of the ``tl.dot`` products of bf16 / fp16 inputs alone (``q k^T``,
    ``do v^T``, ``C B^T``: both operands loaded from 16-bit tensors, so casting them back is exact): the input dtype on
    GPUs, half the registers of fp32 operands and one tensor-core product instead of tf32x3's three, with the same
    exact products and fp32 accumulation; fp32 for fp32 inputs and in the interpreter (:data:`DEFAULT_TARGET`)."""
    if target.tensor_cores and dtype in (torch.bfloat16, torch.float16):
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return tl.float32

