"""A paper roofline of zoo's Triton kernels (``python -m benchmarks.kernels --model``): lower bounds, not measurements.

Each op's benchmark call (``benchmarks.kernels.BENCHES[op].zoo["zoo triton"]``) is run on ``meta`` tensors with every
``@triton.jit`` kernel of the op's Triton module replaced by a recorder, forward and then backward through autograd. So
the grid, the constexpr tiles and every buffer a launch gets (checkpoints, scratch, partial sums) come from the
launchers' own code: a retuned tile size shows up here without editing this file.

Per launch it counts, with the conventions of :data:`NOTES`:

* HBM bytes: every tensor argument once, read or written (``WRITES``), by dtype; arguments switched off by their
  ``HAS_*`` flag are not touched. Scratch buffers count once (their size); their round trips are reported apart.
* FLOPs per kernel (``FLOPS``, read off the kernel bodies): ``tl.dot`` with tf32/bf16 operands on tensor cores,
  ``tl.dot(..., input_precision="ieee")`` and every elementwise / rank-1 / reduction op on the CUDA cores
  (a multiply-add is 2 FLOPs), plus ``exp`` calls (MUFU) apart.

The bound is ``max(bytes / HBM, tensor FLOPs / tensor peak, CUDA-core FLOPs / CUDA-core peak)`` on an H100 SXM; a
second bound also uses that one program runs on one SM, so a grid of ``n < 132`` programs gets ``n / 132`` of the
compute peaks. The PyTorch work around the launches (summing partial gradients, dtype casts) is not counted, so
both stay lower bounds.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

H100 = {
    "name": "H100 SXM",
    "sms": 132,
    "hbm_bytes_per_s": 3.35e12,
    "bf16_tensor_flops": 989e12,
    "tf32_tensor_flops": 494.7e12,  # dense TF32, half the bf16 rate (NVIDIA H100 SXM datasheet)
    "fp32_cuda_core_flops": 67e12,
}

# The Triton module(s) of each op: their @triton.jit kernels are the ones recorded.
TRITON_MODULES: dict[str, str | tuple[str, ...]] = {
    "selective_scan": "zoo.kernels.selective_scan.triton_scan",
    "ssd": "zoo.kernels.ssd.triton_ssd",
    "rwkv6": ("zoo.kernels.rwkv6.triton_rwkv6", "zoo.kernels.rwkv6.triton_chunk_parallel", "zoo.kernels.chunk_pass"),
    "rwkv7": ("zoo.kernels.rwkv7.triton_rwkv7", "zoo.kernels.rwkv7.triton_chunk_parallel"),
    "retention": ("zoo.kernels.retention.triton_retention", "zoo.kernels.retention.triton_chunk_parallel", "zoo.kernels.chunk_pass"),
}

# Arguments each kernel writes (everything else that is a tensor is read). Scratch is written and read back.
WRITES = {
    "_selective_scan_fwd_kernel": {"y_ptr", "hT_ptr", "ckpt_ptr"},
    "_selective_scan_bwd_kernel": {"du_ptr", "ddelta_ptr", "dz_ptr", "dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr", "dh0_ptr"},
    "_ssd_chunk_state_kernel": {"states_ptr", "aend_ptr"},
    "_ssd_state_passing_kernel": {"out_ptr", "final_ptr", "daend_ptr"},
    "_ssd_chunk_scan_kernel": {"y_ptr"},
    "_ssd_chunk_bwd_kernel": {"dx_ptr", "ddt_ptr", "dB_ptr", "dC_ptr", "dA_ptr", "dD_ptr"},
    "_rwkv6_fwd_kernel": {"o", "ckpt", "s_final"},
    "_rwkv6_bwd_kernel": {"dr", "dk", "dv", "dw", "du", "ds0"},
    "_rwkv7_fwd_kernel": {"o", "ckpt", "s_final"},
    "_rwkv7_bwd_kernel": {"dr", "dw", "dk", "dv", "da", "db", "ds0"},
    "_retention_fwd_kernel": {"o", "ckpt", "s_final"},
    "_retention_bwd_kernel": {"dq", "dk", "dv", "dg", "ds0"},
    "_retention_chunk_fwd_kernel": {"o", "ckpt", "s_final"},
    "_retention_chunk_bwd_kernel": {"dq", "dk", "dv", "dg", "ds0"},
    "_retention_cp_chunk_state_kernel": {"states"},
    "_chunk_pass_kernel": {"states"},
    "_retention_cp_output_kernel": {"o"},
    "_retention_cp_dstate_kernel": {"dstates"},
    "_retention_cp_grad_kernel": {"dq", "dk", "dv", "dg"},
    "_rwkv6_cp_chunk_state_kernel": {"states", "gl"},
    "_rwkv6_cp_output_kernel": {"o"},
    "_rwkv6_cp_dstate_kernel": {"dstates"},
    "_rwkv6_cp_grad_kernel": {"dr", "dk", "dv", "dw", "du"},
    "_rwkv7_cp_chunk_state_kernel": {"states", "trans"},
    "_rwkv7_cp_pass_kernel": {"states"},
    "_rwkv7_cp_output_kernel": {"o"},
}
# Arguments a kernel updates in place: read whole and written whole, so counted twice.
READ_WRITES = {"_chunk_pass_kernel": {"states"}, "_rwkv7_cp_pass_kernel": {"states"}}
# The chunk-parallel state passes read ``s_edge`` (the initial state, or the final state's gradient) only with HAS_EDGE.
CHUNK_PARALLEL_GUARDS = {"s_edge": "HAS_EDGE"}
SCRATCH = {"scratch", "scratch_ptr"}
# Pointer arguments only touched when a constexpr flag is set (otherwise a placeholder tensor is passed).
GUARDS = {
    "s0": "HAS_S0", "ds_final": "HAS_DS_FINAL", "h0_ptr": "HAS_H0", "dhT_ptr": "HAS_DHT", "D_ptr": "HAS_D",
    "z_ptr": "HAS_Z", "dz_ptr": "HAS_Z", "bias_ptr": "HAS_BIAS", "init_ptr": "HAS_INIT",
}


@dataclass
class Flops:
    """Work of one launch: tensor-core FLOPs (and their operand precision), CUDA-core FLOPs, exp calls."""

    tensor: float = 0.0
    cuda: float = 0.0
    exp: float = 0.0
    tensor_precision: str | None = None


def _recurrent(fwd_per_elem: int, bwd_per_elem: int, fwd_exp_per_k: int, bwd_exp_per_k: int):
    """The fused-recurrent kernels (rwkv6, rwkv7, retention ``recurrent``): per token, each program updates its
    ``[BK, BV]`` state tile with rank-1 products and reductions, all on CUDA cores. The backward recomputes each
    chunk's states (counted in ``bwd_per_elem``)."""

    def count(name: str, a: dict, programs: int) -> Flops:
        per_elem = bwd_per_elem if "bwd" in name else fwd_per_elem
        exp_per_k = bwd_exp_per_k if "bwd" in name else fwd_exp_per_k
        tile = a["BK"] * a["BV"]
        return Flops(cuda=per_elem * a["T"] * tile * programs, exp=exp_per_k * a["T"] * a["BK"] * programs)

    return count


def _retention_chunk(name: str, a: dict, programs: int) -> Flops:
    """Chunked retention: per chunk of BT tokens, [BT, BK] x [BK, BT] / [BT, BT] x [BT, BV] / [BK, BV] tl.dot tiles."""
    BT, BK, BV = a["BT"], a["BK"], a["BV"]
    if "bwd" in name:
        dots = 2 * BT * BT * (3 * BK + 2 * BV) + 10 * BT * BK * BV  # A, dA, dq, dk, dv and the state terms
        elementwise = 2 * BT * BT + 6 * BT * BK + 2 * BT * BV + 6 * BK * BV
    else:
        dots = 2 * BT * BT * (BK + BV) + 4 * BT * BK * BV  # Q K^T, A V, (Q xi) S, (K zeta)^T V
        elementwise = BT * BT + 2 * BT * BK + 2 * BK * BV
    chunks = a["NC"] * programs
    ieee = a["PRECISION"] == "ieee"
    return Flops(
        tensor=0.0 if ieee else dots * chunks,
        cuda=(dots if ieee else 0.0) * chunks + elementwise * chunks,
        exp=BT * BT * programs + 2 * BT * chunks,  # the decay mask once per program, in / out decays per chunk
        tensor_precision=None if ieee else a["PRECISION"],
    )


def _retention_chunk_parallel(name: str, a: dict, programs: int) -> Flops:
    """Chunk-parallel retention: one chunk of BT tokens per program, [BT, BK] / [BT, BV] / [BK, BV] tl.dot tiles; every
    program builds its own [BT, BT] decay mask (output and gradient kernels)."""
    BT, BK, BV = a["BT"], a["BK"], a["BV"]
    if "grad" in name:  # dA, A, dq, dk, dv and their state terms
        dots = 2 * BT * BT * (3 * BK + 2 * BV) + 6 * BT * BK * BV
        elementwise = 2 * BT * BT + 6 * BT * BK + 2 * BT * BV + 2 * BK * BV
        exps = BT * BT + 2 * BT
    elif "output" in name:  # Q K^T, A V, (Q xi) S
        dots = 2 * BT * BT * (BK + BV) + 2 * BT * BK * BV
        elementwise = BT * BT + BT * BK
        exps = BT * BT + BT
    else:  # chunk_state (K zeta)^T V, dstate (Q xi)^T dO
        dots = 2 * BT * BK * BV
        elementwise = BT * BK
        exps = BT
    ieee = a["PRECISION"] == "ieee"
    return Flops(
        tensor=0.0 if ieee else dots * programs,
        cuda=((dots if ieee else 0.0) + elementwise) * programs,
        exp=exps * programs,
        tensor_precision=None if ieee else a["PRECISION"],
    )


def _chunk_pass(name: str, a: dict, programs: int) -> Flops:
    """The state passes of retention and RWKV-6 (kernels/chunk_pass.py): per chunk and state entry about 8 FLOPs (a
    work-efficient scan of the affine maps over G chunks, two combines of 3 FLOPs, then applying the map) and one exp
    (its row's decay)."""
    return Flops(cuda=8 * a["BLOCK"] * a["NT"] * programs, exp=a["BLOCK"] * a["NT"] * programs)


def _rwkv6_chunk_parallel(name: str, a: dict, programs: int) -> Flops:
    """Chunk-parallel RWKV-6, one chunk of BT tokens per program: the intra-chunk weights are built one key token at a
    time from [BT, BK] tiles (about 7 FLOPs and 1 exp per element and token in the output kernel, 13 and 2 in the
    gradient kernel, all CUDA cores); the products with V, S and dS are tl.dot tiles."""
    BT, BK, BV = a["BT"], a["BK"], a["BV"]
    if "grad" in name:  # da, a^T dO, the two state terms of dr / dk, (K decay) dS
        dots = 4 * BT * BT * BV + 6 * BT * BK * BV
        elementwise = 13 * BT * BT * BK + 12 * BT * BK + 2 * BK * BV
        exps = 2 * BT * BT * BK + 2 * BT * BK
    elif "output" in name:  # a V, (R exp(A')) S
        dots = 2 * BT * BT * BV + 2 * BT * BK * BV
        elementwise = 7 * BT * BT * BK + 4 * BT * BK + 2 * BT * BV
        exps = BT * BT * BK + BT * BK
    else:  # chunk_state (K exp(A_L - A))^T V, dstate (R exp(A'))^T dO
        dots = 2 * BT * BK * BV
        elementwise = 3 * BT * BK
        exps = BT * BK
    ieee = a["PRECISION"] == "ieee"
    return Flops(
        tensor=0.0 if ieee else dots * programs,
        cuda=((dots if ieee else 0.0) + elementwise) * programs,
        exp=exps * programs,
        tensor_precision=None if ieee else a["PRECISION"],
    )


def _rwkv7_state_pass(name: str, a: dict, programs: int) -> Flops:
    """RWKV-7's state pass: per chunk one ``[BK, BK] @ [BK, BVP]`` product in fp32 (``ieee``, CUDA cores) plus ``h``."""
    return Flops(cuda=(2 * a["BK"] * a["BK"] + 1) * a["BVP"] * a["NT"] * programs)


def _rwkv7_chunk_parallel(name: str, a: dict, programs: int) -> Flops:
    """Chunk-parallel RWKV-7 forward, one chunk of BT tokens per program. The WY terms ``L_ab, L_ak`` are built one key
    token at a time from [BT, BK] tiles (about 8 FLOPs and 1 exp per element and key token, CUDA cores), ``X`` by
    forward substitution (``2 BT^3``); the output kernel builds ``M_rb, M_rk`` the same way. Products among the
    [BT, BT] matrices and with ``X`` are ``ieee`` (CUDA cores); those with the state or V / K tiles use PRECISION.
    The chunk-state kernel's ``M_c`` products run once per chunk (its ``i_v = 0`` programs)."""
    BT, BK, BV = a["BT"], a["BK"], a["BV"]
    per_chunk = programs // -(-a["V"] // BV)
    wy = 8 * BT * BT * BK + 2 * BT * BT * BT
    if "output" in name:  # (a e^A') S, (r e^A) S; L_ak V, X u, M_rb u, M_rk V
        dots, ieee_dots = 4 * BT * BK * BV, 8 * BT * BT * BV
        elementwise, exps = 2 * wy + 6 * BT * BK, 2 * BT * BT * BK + 2 * BT * BK
        once = 0
    else:  # h = (b tail)^T Q + (k tail)^T V; L_ak V, X (L_ak V); once per chunk X (a e^A'), (b tail)^T P
        dots, ieee_dots = 4 * BT * BK * BV, 4 * BT * BT * BV
        elementwise, exps = wy + 5 * BT * BK, BT * BT * BK + 2 * BT * BK
        once = 2 * BT * BT * BK + 2 * BT * BK * BK
    ieee = a["PRECISION"] == "ieee"
    return Flops(
        tensor=0.0 if ieee else dots * programs,
        cuda=((dots if ieee else 0.0) + ieee_dots + elementwise) * programs + once * per_chunk,
        exp=exps * programs,
        tensor_precision=None if ieee else a["PRECISION"],
    )


def _selective_scan(name: str, a: dict, programs: int) -> Flops:
    """Per token each program updates its ``[BLOCK_D, BLOCK_N]`` state: decay ``exp(dt A)``, rank-1 input, the
    ``C`` readout (forward: 6 FLOPs + 1 exp per element; backward: recompute 4 + adjoint 18, 2 exp)."""
    tile = a["BLOCK_D"] * a["BLOCK_N"]
    per_elem, exps = (22, 2) if "bwd" in name else (6, 1)
    return Flops(cuda=per_elem * a["T"] * tile * programs, exp=exps * a["T"] * tile * programs)


def _ssd_dots(a: dict, dots: float, elementwise: float, exps: float, programs: int) -> Flops:
    """One SSD chunk per program: ``tl.dot`` FLOPs on tensor cores (tf32) or CUDA cores (``ieee``)."""
    ieee = a["PRECISION"] == "ieee"
    return Flops(
        tensor=0.0 if ieee else dots * programs,
        cuda=((dots if ieee else 0.0) + elementwise) * programs,
        exp=exps * programs,
        tensor_precision=None if ieee else a["PRECISION"],
    )


def _ssd_state_width(a: dict) -> int:
    """d_state as the chunk kernels see it: ``cdiv(N, BLOCK_N)`` blocks of ``BLOCK_N``."""
    return -(-a["N"] // a["BLOCK_N"]) * a["BLOCK_N"]


def _ssd_chunk_state(name: str, a: dict, programs: int) -> Flops:
    """``(src * w)^T @ mat``: one ``[BLOCK_P, L] x [L, BLOCK_N]`` product, the ``[L, L]`` masked cumsum of the log-decays."""
    L, P, N = a["L"], a["BLOCK_P"], _ssd_state_width(a)
    return _ssd_dots(a, 2 * L * P * N, 2 * L * L + L * P, L, programs)


def _ssd_chunk_scan(name: str, a: dict, programs: int) -> Flops:
    """``C B^T``, ``scores @ (dt x)``, ``C @ h^T``; the ``[L, L]`` cumsum, decay mask and scaling; ``[L, P]`` terms."""
    L, P, N = a["L"], a["BLOCK_P"], _ssd_state_width(a)
    return _ssd_dots(a, 2 * L * L * (N + P) + 2 * L * P * N, 4 * L * L + 5 * L * P, L * L + L, programs)


def _ssd_chunk_bwd(name: str, a: dict, programs: int) -> Flops:
    """Eight products: ``C B^T``, ``dY dx^T``, ``dCB @ B``, ``dCB^T @ C`` (``[L, L]`` with ``N`` or ``P``), ``(CB * seg)^T @ dY``,
    ``dY @ h``, ``xd @ dh``, ``B @ dh^T`` (``[L, P] x [P, N]``), exact; about nine ``[L, L]``, eight ``[L, N]`` and
    ten ``[L, P]`` elementwise / reduction terms (small beside the products)."""
    L, P, N = a["L"], a["BLOCK_P"], _ssd_state_width(a)
    dots = 6 * L * L * N + 4 * L * L * P + 6 * L * P * N
    return _ssd_dots(a, dots, 9 * L * L + 8 * L * N + 10 * L * P, L * L + 3 * L, programs)


def _ssd_state_passing(name: str, a: dict, programs: int) -> Flops:
    """Per chunk and state entry: ``exp(a_end) h + S`` (2 FLOPs), in reverse also ``<dh_end, h_start>`` (2 more)."""
    per_entry = 4 if a["REVERSE"] else 2
    return Flops(cuda=per_entry * a["BLOCK"] * a["n_chunks"] * programs, exp=a["n_chunks"] * programs)


FLOPS: dict[str, Callable[[str, dict, int], Flops]] = {
    "_selective_scan_fwd_kernel": _selective_scan,
    "_selective_scan_bwd_kernel": _selective_scan,
    "_ssd_chunk_state_kernel": _ssd_chunk_state,
    "_ssd_state_passing_kernel": _ssd_state_passing,
    "_ssd_chunk_scan_kernel": _ssd_chunk_scan,
    "_ssd_chunk_bwd_kernel": _ssd_chunk_bwd,
    # per state element per token: see the kernel bodies (fwd / bwd incl. recompute); exp per K-row per token
    "_rwkv6_fwd_kernel": _recurrent(7, 14, 1, 2),
    "_rwkv6_bwd_kernel": _recurrent(7, 14, 1, 2),
    "_rwkv7_fwd_kernel": _recurrent(9, 33, 1, 2),
    "_rwkv7_bwd_kernel": _recurrent(9, 33, 1, 2),
    "_retention_fwd_kernel": _recurrent(5, 17, 0, 0),
    "_retention_bwd_kernel": _recurrent(5, 17, 0, 0),
    "_retention_chunk_fwd_kernel": _retention_chunk,
    "_retention_chunk_bwd_kernel": _retention_chunk,
    "_retention_cp_chunk_state_kernel": _retention_chunk_parallel,
    "_chunk_pass_kernel": _chunk_pass,
    "_retention_cp_output_kernel": _retention_chunk_parallel,
    "_retention_cp_dstate_kernel": _retention_chunk_parallel,
    "_retention_cp_grad_kernel": _retention_chunk_parallel,
    "_rwkv6_cp_chunk_state_kernel": _rwkv6_chunk_parallel,
    "_rwkv6_cp_output_kernel": _rwkv6_chunk_parallel,
    "_rwkv6_cp_dstate_kernel": _rwkv6_chunk_parallel,
    "_rwkv6_cp_grad_kernel": _rwkv6_chunk_parallel,
    "_rwkv7_cp_chunk_state_kernel": _rwkv7_chunk_parallel,
    "_rwkv7_cp_pass_kernel": _rwkv7_state_pass,
    "_rwkv7_cp_output_kernel": _rwkv7_chunk_parallel,
}

NOTES = [
    "Lower bounds computed on paper from the kernels' code, not measurements.",
    "bytes: every tensor argument of a launch once (read, or written), by dtype; scratch counted once at its size,"
    " its per-step round trips listed apart (they may stay in L2).",
    "Chunk-parallel retention and RWKV-6: their in-place state passes read and write the [B*H, NT+1, K, V] fp32"
    " state buffer (counted twice); the output and gradient kernels read it, counted once, though neighbouring chunks"
    " share slots. Chunk-parallel RWKV-7 also writes each chunk's [K, K] transition (fp32) and its backward is the"
    " fused-recurrent kernel.",
    "FLOPs: a multiply-add is 2; reductions and rank-1 updates on [BK, BV] / [BLOCK_D, BLOCK_N] state tiles are"
    " CUDA-core FLOPs; vector-sized (per row) work is left out except exp calls.",
    "tl.dot with input_precision='ieee' runs as fp32 FMA on CUDA cores; zoo's chunked retention and SSD kernels upcast"
    " bf16 to fp32 and use tf32 tensor cores (494.7 TFLOP/s dense), not bf16 (989).",
    "Atomic adds (selective scan dB / dC, SSD dB / dC / ddt) count their buffer once, like a write.",
    "The PyTorch work around the launches (summing per-block partial gradients, casts to the input dtype) is not counted.",
]


@dataclass
class Launch:
    """One recorded kernel launch: its name, grid and named arguments (tensors, scalars and constexprs)."""

    kernel: str
    grid: tuple[int, ...]
    args: dict = field(default_factory=dict)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records a :class:`Launch`."""

    def __init__(self, jit, launches: list[Launch]):
        self.name = jit.fn.__name__
        self.arg_names = list(jit.arg_names)
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.arg_names, args), **kwargs)
            g = grid(named) if callable(grid) else grid
            g = tuple(int(n) for n in (g if isinstance(g, tuple) else (g,)))
            self.launches.append(Launch(self.name, g, named))

        return launch


H100_CAPABILITY = (9, 0)
H100_SHARED_PER_BLOCK = 232448  # bytes, the opt-in maximum per block


@contextlib.contextmanager
def recording(op: str):
    """Replace the op's ``@triton.jit`` kernels by recorders; yields the list the launches go to."""
    from triton.runtime.jit import JITFunction
    from triton.runtime.interpreter import InterpretedFunction

    names = TRITON_MODULES[op]
    modules = [importlib.import_module(name) for name in ((names,) if isinstance(names, str) else names)]
    kernels = {(m, n): f for m in modules for n, f in vars(m).items() if isinstance(f, (JITFunction, InterpretedFunction))}
    launches: list[Launch] = []
    # The launchers pick tiles for the device's capability (kernels.triton_checks.launch_target): answer as an H100.
    cuda_queries = {name: getattr(torch.cuda, name) for name in ("get_device_capability", "get_device_properties")}
    try:
        torch.cuda.get_device_capability = lambda *args, **kwargs: H100_CAPABILITY
        torch.cuda.get_device_properties = lambda *args, **kwargs: SimpleNamespace(shared_memory_per_block_optin=H100_SHARED_PER_BLOCK)
        for (module, name), jit in kernels.items():
            setattr(module, name, _Recorder(jit, launches))
        yield launches
    finally:
        for (module, name), jit in kernels.items():
            setattr(module, name, jit)
        for name, query in cuda_queries.items():
            setattr(torch.cuda, name, query)


def record(op: str, prepare, make_inputs, shapes: dict, T: int, batch: int, dtype=torch.bfloat16) -> tuple[list[Launch], list[Launch]]:
    """The launches of the benchmark's call (``prepare``) on meta tensors: (forward ones, backward ones)."""
    inputs = make_inputs(batch, T, shapes, torch.device("meta"), dtype)
    with recording(op) as launches:
        run, _ = prepare(inputs)
        outputs = [o for o in run() if torch.is_tensor(o) and o.is_floating_point()]
        n_fwd = len(launches)
        torch.autograd.backward(outputs, [torch.empty_like(o) for o in outputs])
    return launches[:n_fwd], launches[n_fwd:]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def launch_model(launch: Launch) -> dict:
    """Bytes (by dtype and direction), FLOPs and grid of one launch."""
    a = launch.args
    if launch.kernel not in WRITES or launch.kernel not in FLOPS:
        raise KeyError(f"benchmarks/roofline.py has no model of kernel {launch.kernel}: add it to WRITES and FLOPS")
    writes = WRITES[launch.kernel]
    if not writes <= set(a):
        raise KeyError(f"{launch.kernel} no longer has the arguments {sorted(writes - set(a))}: update WRITES in benchmarks/roofline.py")
    read: dict[str, int] = {}
    written: dict[str, int] = {}
    scratch_traffic = 0
    for name, value in a.items():
        guard = GUARDS.get(name, CHUNK_PARALLEL_GUARDS.get(name))
        if not torch.is_tensor(value) or (guard is not None and not a.get(guard, True)):
            continue
        dtype = str(value.dtype).removeprefix("torch.")
        target = written if name in writes or name in SCRATCH else read
        target[dtype] = target.get(dtype, 0) + _bytes(value)
        if name in READ_WRITES.get(launch.kernel, ()):
            read[dtype] = read.get(dtype, 0) + _bytes(value)
        if name in SCRATCH:  # one state tile per step per program, written and read back
            states = a["CH"] if name == "scratch" else a["chunk"] + 1  # states it holds per program
            scratch_traffic += 2 * a["T"] * _bytes(value) // states
    flops = FLOPS[launch.kernel](launch.kernel, a, launch.programs)
    constexprs = {k: v for k, v in a.items() if isinstance(v, (int, str)) and k.isupper() and not k.startswith("HAS_")}
    return {
        "kernel": launch.kernel,
        "grid": list(launch.grid),
        "programs": launch.programs,
        "programs_per_sm": launch.programs / H100["sms"],
        "constants": constexprs,
        "bytes_read": read,
        "bytes_written": written,
        "scratch_round_trip_bytes": scratch_traffic,
        "tensor_flops": flops.tensor,
        "tensor_precision": flops.tensor_precision,
        "cuda_core_flops": flops.cuda,
        "exp_calls": flops.exp,
    }


def bound_ms(launches: list[dict], gpu: dict = H100) -> dict:
    """Each roofline term in ms summed over launches that run one after another, and two bounds: the sum over
    launches of the largest term, and the same with a grid of ``n < SMs`` programs getting ``n / SMs`` of the
    compute peaks (one program runs on one SM)."""
    terms = {"hbm_ms": 0.0, "tensor_ms": 0.0, "cuda_core_ms": 0.0, "bound_ms": 0.0, "bound_sm_limited_ms": 0.0}
    for m in launches:
        moved = sum(m["bytes_read"].values()) + sum(m["bytes_written"].values())
        peak = gpu["tf32_tensor_flops"] if m["tensor_precision"] == "tf32" else gpu["bf16_tensor_flops"]
        share = min(1.0, m["programs"] / gpu["sms"])
        t_hbm = moved / gpu["hbm_bytes_per_s"] * 1e3
        t_tensor = m["tensor_flops"] / peak * 1e3
        t_cuda = m["cuda_core_flops"] / gpu["fp32_cuda_core_flops"] * 1e3
        terms["hbm_ms"] += t_hbm
        terms["tensor_ms"] += t_tensor
        terms["cuda_core_ms"] += t_cuda
        terms["bound_ms"] += max(t_hbm, t_tensor, t_cuda)
        terms["bound_sm_limited_ms"] += max(t_hbm, t_tensor / share, t_cuda / share)
    return terms


PEERS_SOURCE = "/work/shared/PEERS.md, 'Peer numbers measured on one H100 80GB HBM3 (2026-11-23)', bf16, fwd+bwd ms, CUDA-event mean of 10 after 3 warm-ups"
# Measured fwd+bwd ms by T (B = 16384 / T), copied with the line they come from.
PEERS = {
    "selective_scan": ("| mamba-ssm selective_scan_fn (d_inner 2048, N 16) | 3.08 | 3.24 | 3.78 |", {1024: 3.08, 4096: 3.24, 16384: 3.78}),
    "ssd": ("| mamba-ssm mamba_chunk_scan_combined (32 heads × 64, N 128, chunk 256) | 3.74 | 4.03 | 4.62 |", {1024: 3.74, 4096: 4.03, 16384: 4.62}),
    "retention": ("| fla chunk_retention (16 heads × 64) | 1.92 | 1.80 | 2.12 |", {1024: 1.92, 4096: 1.80, 16384: 2.12}),
    "rwkv6": ("| fla chunk_rwkv6 (16 heads × 64) | 2.23 | 2.29 | 3.06 |", {1024: 2.23, 4096: 2.29, 16384: 3.06}),
}


def _total(models: list[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in models:
        for dtype, n in m[key].items():
            out[dtype] = out.get(dtype, 0) + n
    return out


def _summary(models: list[dict]) -> dict:
    return {
        "launches": models,
        "bytes_read": _total(models, "bytes_read"),
        "bytes_written": _total(models, "bytes_written"),
        "scratch_round_trip_bytes": sum(m["scratch_round_trip_bytes"] for m in models),
        "tensor_flops": sum(m["tensor_flops"] for m in models),
        "cuda_core_flops": sum(m["cuda_core_flops"] for m in models),
        "exp_calls": sum(m["exp_calls"] for m in models),
        **bound_ms(models),
    }


def model_report(benches: dict, sizes, ops=None) -> dict:
    """The roofline of every ``zoo triton*`` implementation of ``benches`` at ``sizes`` ((T, batch) pairs)."""
    report = {"kind": "paper roofline (lower bounds computed from the kernels' code, not measured)",
              "gpu": H100, "dtype": "bfloat16", "notes": NOTES, "peers_source": PEERS_SOURCE, "ops": {}}
    for op in ops or benches:
        bench = benches[op]
        peer_line, peer_ms = PEERS.get(op, (None, {}))
        runs = []
        for impl, prepare in bench.zoo.items():
            if not impl.startswith("zoo triton"):
                continue
            for T, batch in sizes:
                fwd, bwd = record(op, prepare, bench.make_inputs, bench.shapes, T, batch)
                fwd_models = [launch_model(launch) for launch in fwd]
                all_models = fwd_models + [launch_model(launch) for launch in bwd]
                runs.append({"impl": impl, "T": T, "batch": batch, "fwd": _summary(fwd_models),
                             "fwd_bwd": _summary(all_models), "peer_fwd_bwd_ms_measured": peer_ms.get(T)})
        report["ops"][op] = {"shapes": bench.shapes, "peer_line": peer_line, "runs": runs}
    return report


def _mb(counts: dict[str, int]) -> str:
    return " + ".join(f"{n / 1e6:.1f} {dtype}" for dtype, n in sorted(counts.items())) or "0"


def _gf(flops: float) -> str:
    return f"{flops / 1e9:.1f}"


def model_markdown(report: dict) -> str:
    gpu = report["gpu"]
    lines = [
        f"# Paper roofline of zoo's Triton kernels on an {gpu['name']} (lower bounds, NOT measurements)",
        "",
        f"Computed by `python -m benchmarks.kernels --model` from the kernels' code at the benchmark shapes, {report['dtype']} inputs. "
        f"Peaks: HBM {gpu['hbm_bytes_per_s'] / 1e12} TB/s, tensor {gpu['bf16_tensor_flops'] / 1e12:.0f} TFLOP/s bf16 "
        f"({gpu['tf32_tensor_flops'] / 1e12} tf32), CUDA cores {gpu['fp32_cuda_core_flops'] / 1e12:.0f} TFLOP/s fp32, {gpu['sms']} SMs.",
        "Bound = sum over launches of max(HBM, tensor, CUDA-core time); SM-limited bound: a grid of n < 132 programs "
        "gets n/132 of the compute peaks. Peer column: measured fwd+bwd ms (not a bound), from "
        f"{report['peers_source']}.",
        "",
        *[f"- {note}" for note in report["notes"]],
    ]
    for op, entry in report["ops"].items():
        lines += [
            "",
            f"## {op}: {', '.join(f'{k} {v}' for k, v in entry['shapes'].items())}",
            "",
            "| impl | T | B | pass | HBM MB read | HBM MB written | scratch MB (L2?) | tensor GFLOP | CUDA-core GFLOP | exp G | "
            "HBM ms | tensor ms | CUDA ms | bound ms | SM-limited bound ms | peer fwd+bwd ms (measured) |",
            "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in entry["runs"]:
            for key, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
                s = r[key]
                peer = r["peer_fwd_bwd_ms_measured"] if key == "fwd_bwd" and r["peer_fwd_bwd_ms_measured"] else "-"
                lines.append(
                    f"| {r['impl']} | {r['T']} | {r['batch']} | {label} | {_mb(s['bytes_read'])} | {_mb(s['bytes_written'])} | "
                    f"{s['scratch_round_trip_bytes'] / 1e6:.0f} | {_gf(s['tensor_flops'])} | {_gf(s['cuda_core_flops'])} | "
                    f"{s['exp_calls'] / 1e9:.2f} | {s['hbm_ms']:.3f} | {s['tensor_ms']:.3f} | {s['cuda_core_ms']:.3f} | "
                    f"{s['bound_ms']:.3f} | {s['bound_sm_limited_ms']:.3f} | {peer} |"
                )
        lines += ["", "Launches (grid from the launchers' own code):", "",
                  "| impl | T | B | kernel | grid | programs | programs / SM | launch constants |", "|---|---:|---:|---|---|---:|---:|---|"]
        for r in entry["runs"]:
            for m in r["fwd_bwd"]["launches"]:
                tiles = ", ".join(f"{k}={v}" for k, v in m["constants"].items())
                lines.append(f"| {r['impl']} | {r['T']} | {r['batch']} | {m['kernel']} | {tuple(m['grid'])} | {m['programs']} | "
                             f"{m['programs_per_sm']:.2f} | {tiles} |")
        if entry["peer_line"]:
            lines += ["", f"Peer source line: `{entry['peer_line']}`"]
        else:
            lines += ["", "No peer timing for this op in PEERS.md."]
    return "\n".join(lines) + "\n"
