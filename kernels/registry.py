"""One entry per kernel call: what every harness of zoo's kernels reads instead of describing the kernels again.

A :class:`KernelCall` is an op's public function with one backend of its ``BACKENDS`` table and fixed options. It
knows how to build the arguments zoo's layers pass (activations in the given dtype, parameters and log decays in
fp32), which ``@triton.jit`` kernels it launches (forward, then backward from the output's gradient, as in
training) and each one's launch grid as a formula of the sizes and tiles. ``benchmarks/kernels.py`` times the calls,
``benchmarks/kernel_resources.py`` compiles their Triton kernels for real GPU targets, and the tests check the
launches against the formulas and the parallelism bar (:func:`underfilled`). Importing this module loads no Triton.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from zoo.kernels.backends import BackendTable
from zoo.kernels.dplr_delta_rule import BACKENDS as DPLR_DELTA_RULE, dplr_delta_rule
from zoo.kernels.dplr_delta_rule.delta_rule import GATED_DELTA_BACKENDS, KDA_BACKENDS, gated_delta_rule, kda_rule
from zoo.kernels.retention import BACKENDS as RETENTION, retention
from zoo.kernels.rwkv6 import BACKENDS as RWKV6, rwkv6
from zoo.kernels.selective_scan import BACKENDS as SELECTIVE_SCAN, selective_scan
from zoo.kernels.ssd import BACKENDS as SSD, ssd_scan

H100_SMS = 132
MIN_PROGRAMS = 4 * H100_SMS  # the bar of every O(T) launch at batch 1 (issue 16): 4 programs per H100 SM


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- the arguments zoo's layers pass


def _selective_scan_inputs(d: dict, batch: int, T: int, device, dtype) -> dict:
    """layers/mamba.py: u, delta, B, C, z ``[B, T, D|N]`` activations; A ``[D, N]`` and D ``[D]`` fp32."""
    act = lambda *shape: torch.randn(batch, T, *shape, device=device, dtype=dtype)  # noqa: E731
    return {"u": act(d["D"]), "delta": act(d["D"]) * 0.5 - 2.0, "A": -torch.rand(d["D"], d["N"], device=device).add(0.5),
            "B": act(d["N"]), "C": act(d["N"]), "D": torch.ones(d["D"], device=device), "z": act(d["D"])}


def _ssd_inputs(d: dict, batch: int, T: int, device, dtype) -> dict:
    """layers/mamba2.py: x ``[B, T, H, P]``, dt ``[B, T, H]``, B, C ``[B, T, G, N]``; A, D, dt_bias ``[H]`` fp32 and
    always a state ``[B, H, P, N]`` fp32."""
    H, P, N, G = d["H"], d["P"], d["N"], d.get("G", 1)
    act = lambda *shape: torch.randn(batch, T, *shape, device=device, dtype=dtype)  # noqa: E731
    return {"x": act(H, P), "dt": act(H) * 0.5 - 2.0, "A": -torch.rand(H, device=device).add(0.5), "B": act(G, N),
            "C": act(G, N), "D": torch.ones(H, device=device), "dt_bias": torch.zeros(H, device=device),
            "initial_state": torch.zeros(batch, H, P, N, device=device)}


def _log_decays(batch: int, T: int, H: int, K: int, device) -> torch.Tensor:
    return -torch.exp(torch.randn(batch, T, H, K, device=device) - 1.0)  # fp32, <= 0


def _rwkv6_inputs(d: dict, batch: int, T: int, device, dtype) -> dict:
    """layers/rwkv6.py: r, k, v activations ``[B, T, H, K|V]``; the log decay ``[B, T, H, K]`` and the bonus ``[H, K]`` fp32."""
    H, K, V = d["H"], d["K"], d["V"]
    act = lambda n: torch.randn(batch, T, H, n, device=device, dtype=dtype)  # noqa: E731
    return {"r": act(K), "k": act(K) * K**-0.5, "v": act(V), "w_log": _log_decays(batch, T, H, K, device),
            "u": torch.randn(H, K, device=device) * 0.5}


def _dplr_inputs(d: dict, batch: int, T: int, device, dtype) -> dict:
    """layers/rwkv7.py (RWKV-7's block): r, k, v, a = -kk, b = kk * alpha activations; the log decay fp32."""
    H, K, V = d["H"], d["K"], d["V"]
    act = lambda n: torch.randn(batch, T, H, n, device=device, dtype=dtype)  # noqa: E731
    kk = F.normalize(torch.randn(batch, T, H, K, device=device), dim=-1)
    return {"r": act(K), "w_log": _log_decays(batch, T, H, K, device), "k": act(K) * K**-0.5, "v": act(V),
            "a": (-kk).to(dtype), "b": (kk * torch.rand(batch, T, H, K, device=device)).to(dtype)}


def _delta_rule_inputs(per_channel: bool) -> Callable[[dict, int, int, object, torch.dtype], dict]:
    """layers/gated_deltanet.py (``per_channel=False``) and layers/kda.py: q, k L2-normalised in fp32 (q then scaled
    by ``K^-1/2``), v activations; the log decay ``g <= 0`` fp32, ``[B, T, H]`` (Gated DeltaNet) or ``[B, T, H, K]``
    (KDA); ``beta = sigmoid(.)`` ``[B, T, H]`` fp32; the block's zero start state ``[B, H, K, V]`` fp32 (no gradient)."""

    def inputs(d: dict, batch: int, T: int, device, dtype) -> dict:
        H, K, V = d["H"], d["K"], d["V"]
        unit = lambda: F.normalize(torch.randn(batch, T, H, K, device=device), dim=-1)  # noqa: E731
        g = -torch.exp(torch.randn(batch, T, H, *((K,) if per_channel else ()), device=device) - 1.0)
        return {"q": unit() * K**-0.5, "k": unit(), "v": torch.randn(batch, T, H, V, device=device, dtype=dtype), "g": g,
                "beta": torch.sigmoid(torch.randn(batch, T, H, device=device)),
                "initial_state": torch.zeros(batch, H, K, V, device=device)}

    return inputs


def _retention_inputs(d: dict, batch: int, T: int, device, dtype) -> dict:
    """layers/retnet.py: q, k, v activations; RetNet's per-head log decays ``[H]`` fp32."""
    H, K, V = d["H"], d["K"], d["V"]
    act = lambda n: torch.randn(batch, T, H, n, device=device, dtype=dtype)  # noqa: E731
    log_decay = torch.log1p(-torch.exp2(-5.0 - torch.arange(H, device=device, dtype=torch.float32)))
    return {"q": act(K) * K**-0.5, "k": act(K) * K**-0.5, "v": act(V), "log_decay": log_decay}


@dataclass(frozen=True)
class Op:
    """An op: its public function, backend table and input builder; ``bench`` / ``smoke`` are the benchmark's sizes,
    ``models`` those of the ~125M models (d_model 768) the compile check uses, ``fill`` those of the parallelism bar."""

    name: str
    fn: Callable
    backends: BackendTable
    inputs: Callable[[dict, int, int, object, torch.dtype], dict]
    bench: dict
    smoke: dict
    models: tuple[dict, ...]
    fill: tuple[dict, ...]
    options: dict = field(default_factory=dict)  # what the layers pass besides the tensors

    def example(self, dims: dict, batch: int, T: int, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
        """The arguments at ``dims`` (deterministic for ``seed``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.inputs(dims, batch, T, torch.device(device), dtype)


HEADS = {"H": 16, "K": 64, "V": 64}
HEADS_SMOKE = {"H": 2, "K": 8, "V": 8}
RWKV_MODELS = ({"H": 12, "K": 64, "V": 64}, {"H": 6, "K": 128, "V": 128}, {"H": 3, "K": 256, "V": 256})  # K = 256: MAX_HEAD_DIM
OPS = {op.name: op for op in (
    Op("selective_scan", selective_scan, SELECTIVE_SCAN, _selective_scan_inputs, {"D": 2048, "N": 16}, {"D": 8, "N": 4},
       ({"D": 1536, "N": 16},), ({"D": 2048, "N": 16},), {"delta_softplus": True}),
    Op("ssd", ssd_scan, SSD, _ssd_inputs, {"H": 32, "P": 64, "N": 128}, {"H": 2, "P": 8, "N": 4},
       tuple({"H": 1536 // p, "P": p, "N": n} for p in (64, 128) for n in (64, 128)),
       ({"H": 16, "P": 64, "N": 64}, {"H": 16, "P": 64, "N": 128}), {"dt_softplus": True}),
    Op("rwkv6", rwkv6, RWKV6, _rwkv6_inputs, HEADS, HEADS_SMOKE, RWKV_MODELS, (HEADS,)),
    Op("dplr_delta_rule", dplr_delta_rule, DPLR_DELTA_RULE, _dplr_inputs, HEADS, HEADS_SMOKE, RWKV_MODELS, (HEADS,)),
    Op("retention", retention, RETENTION, _retention_inputs, HEADS, HEADS_SMOKE,  # RetNet's value_factor 2: V = 2 K
       ({"H": 12, "K": 64, "V": 128}, {"H": 6, "K": 128, "V": 256}, {"H": 3, "K": 256, "V": 512}), (HEADS,)),
    # the generalized delta rule's parametrisations (kernels/dplr_delta_rule/delta_rule.py): its kernels, or fla's own;
    # compiled at head dim 128 only (Qwen3-Next's and Kimi Linear's heads)
    Op("gated_delta_rule", gated_delta_rule, GATED_DELTA_BACKENDS, _delta_rule_inputs(False), HEADS, HEADS_SMOKE,
       ({"H": 6, "K": 128, "V": 128},), (HEADS,)),
    Op("kda", kda_rule, KDA_BACKENDS, _delta_rule_inputs(True), HEADS, HEADS_SMOKE, ({"H": 6, "K": 128, "V": 128},), (HEADS,)),
)}
DELTA_RULE_OPS = ("gated_delta_rule", "kda")
# Old names of ops, still accepted where a user names one (benchmarks' --ops): RWKV-7's for the generalized delta rule
# (issue 27; zoo.kernels.rwkv7 keeps its functions' old names too).
OP_ALIASES = {"rwkv7": "dplr_delta_rule"}


def op_name(name: str) -> str:
    """The registry's name for ``name``, an op or a call name ``op/backend[/step]`` (or a prefix of one): the op part
    through :data:`OP_ALIASES` (``"rwkv7/triton_chunk"`` -> ``"dplr_delta_rule/triton_chunk"``), the rest as given."""
    op, sep, rest = name.partition("/")
    return OP_ALIASES.get(op, op) + sep + rest


# ---------------------------------------------------------------- launch grids, as formulas of the sizes and tiles
# ``d``: the sizes (B, T and the op's dims), ``t``: the launch's constexpr tiles.


def heads_by_v(d, t):  # one program per (V block, batch * head): the fused-recurrent and chunk-serial kernels
    return (cdiv(d["V"], t["BV"]), d["B"] * d["H"])


def chunks_by_v(d, t):  # one program per (chunk, V block, batch * head): the chunk-parallel per-chunk kernels
    return (cdiv(d["T"], t["BT"]), cdiv(d["V"], t["BV"]), d["B"] * d["H"])


def state_blocks(d, t):  # the shared chunk pass (retention, RWKV-6): one program per block of the [K, V] state and batch * head
    return (cdiv(d["K"] * d["V"], t["BLOCK"]), d["B"] * d["H"])


def dplr_pass(d, t):  # the generalized delta rule's state passes: one program per V block of 16 and batch * head
    return (cdiv(d["V"], t["BVP"]), d["B"] * d["H"])


def selective_scan_grid(d, t):
    return (d["B"], cdiv(d["D"], t["BLOCK_D"]))


def ssd_chunks(d, t):
    return (cdiv(d["T"], t["L"]), d["B"] * d["H"], cdiv(d["P"], t["BLOCK_P"]))


def ssd_chunk_heads(d, t):
    return (cdiv(d["T"], t["L"]), d["B"] * d["H"])


def ssd_state_passing(d, t):
    return (cdiv(d["P"] * d["N"], t["BLOCK"]), d["B"] * d["H"])


# Packed documents (a :class:`KernelCall` with ``documents``; batch 1): ``d["cu_seqlens"]`` holds the documents' token
# bounds. The per-chunk kernels run all documents' chunks, each document's from its own start (``sum_n cdiv(len_n, BT)``),
# over the H heads; the state passes one program per document x head (and state block): kernels/chunk_pass.py.


def doc_chunks(d, BT: int) -> int:
    """All packed documents' chunks of ``BT`` tokens, each document's from its own start."""
    bounds = d["cu_seqlens"]
    return sum(cdiv(e - s, BT) for s, e in zip(bounds, bounds[1:]))


def doc_heads(d) -> int:
    """Documents x heads: the packed state passes' programs on grid axis y."""
    assert d["B"] == 1, "packed documents take a batch of one"
    return (len(d["cu_seqlens"]) - 1) * d["H"]


def packed_chunks_by_v(d, t):
    assert d["B"] == 1, "packed documents take a batch of one"
    return (doc_chunks(d, t["BT"]), cdiv(d["V"], t["BV"]), d["H"])


def packed_state_blocks(d, t):
    return (cdiv(d["K"] * d["V"], t["BLOCK"]), doc_heads(d))


def packed_dplr_pass(d, t):
    return (cdiv(d["V"], t["BVP"]), doc_heads(d))


def packed_ssd_chunks(d, t):
    assert d["B"] == 1, "packed documents take a batch of one"
    return (doc_chunks(d, t["L"]), d["H"], cdiv(d["P"], t["BLOCK_P"]))


def packed_ssd_chunk_heads(d, t):
    assert d["B"] == 1, "packed documents take a batch of one"
    return (doc_chunks(d, t["L"]), d["H"])


def packed_ssd_state_passing(d, t):
    return (cdiv(d["P"] * d["N"], t["BLOCK"]), doc_heads(d))


def ssd_step(d, t):
    return (d["B"] * d["H"], cdiv(d["P"], t["BLOCK_P"]))


class Kernel(NamedTuple):
    """One launch of a call: the ``@triton.jit`` kernel's name, its grid formula and whether it must reach
    :data:`MIN_PROGRAMS` at the op's ``fill`` sizes (False: a sequential launch whose docstring says why not)."""

    name: str
    grid: Callable[[dict, dict], tuple]
    fills: bool = True


@dataclass(frozen=True)
class KernelCall:
    """``op.fn(**inputs, **op.options, backend=backend)``. ``launches``: its Triton kernels in launch order, forward
    then backward; ``step``: a one-token decode call (T = 1, forward only); ``frozen``: inputs that get no gradient;
    ``peer``: another project's kernel behind zoo's adapter (timed when its package imports, on CUDA);
    ``documents``: packed documents (batch 1, ``cu_seqlens``), the lengths of the leading ones, the last document
    taking the rest of the T tokens (:meth:`bounds`), each with its own initial state where the op's inputs have one
    (the batch's, repeated). Its :attr:`name` is ``op/backend`` (``op/backend/step`` for the decode step,
    ``op/backend/packed`` with documents)."""

    op: Op
    backend: str
    launches: tuple[Kernel, ...] = ()
    step: bool = False
    frozen: tuple[str, ...] = ()
    peer: bool = False
    documents: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.op.name}/{self.backend}" + ("/step" if self.step else "") + ("/packed" if self.documents else "")

    def bounds(self, T: int) -> tuple[int, ...] | None:
        """The packed documents' token bounds ``0 < ... < T`` (``cu_seqlens``) at ``T`` tokens; None without documents."""
        if not self.documents:
            return None
        bounds = [0]
        for n in self.documents:
            bounds.append(bounds[-1] + n)
        if bounds[-1] >= T:
            raise ValueError(f"{self.name}: documents {self.documents} leave no tokens of T = {T} for the last one")
        return (*bounds, T)

    def available(self) -> bool:
        return self.op.backends.backends[self.op.backends.resolve(self.backend)].available()

    def prepare(self, inputs: dict) -> tuple[Callable[[], tuple], list[torch.Tensor]]:
        """``(run, leaves)``: ``run()`` calls the op on fresh leaf copies of ``inputs``; ``leaves`` get gradients."""
        fn, options = self.op.fn, {**self.op.options, "backend": self.backend}
        if self.documents:  # batch 1: cu_seqlens from the tokens' T, the initial state repeated per document
            bounds = self.bounds(next(iter(inputs.values())).shape[1])
            options["cu_seqlens"] = bounds
            if inputs.get("initial_state") is not None:
                state = inputs["initial_state"]
                inputs = {**inputs, "initial_state": state.expand(len(bounds) - 1, *state.shape[1:]).contiguous()}
        leaves = {k: v.detach().clone().requires_grad_(k not in self.frozen) for k, v in inputs.items()}
        return (lambda: fn(**leaves, **options)), [v for k, v in leaves.items() if k not in self.frozen]

    def grid(self, kernel: str, dims: dict, tiles: dict) -> tuple[int, int, int]:
        """The launch grid of ``kernel`` by this call's formula, padded to three axes like a CUDA launch."""
        formula = next(k.grid for k in self.launches if k.name == kernel)
        if self.documents:
            dims = {**dims, "cu_seqlens": self.bounds(dims["T"])}
        return (*formula(dims, tiles), 1, 1)[:3]


def _kernels(*spec) -> tuple[Kernel, ...]:
    return tuple(s if isinstance(s, Kernel) else Kernel(*s) for s in spec)


def _recurrent(prefix: str) -> tuple[Kernel, ...]:
    return _kernels((f"{prefix}_fwd_kernel", heads_by_v, False), (f"{prefix}_bwd_kernel", heads_by_v, False))


def _chunk_parallel(prefix: str) -> tuple[Kernel, ...]:
    state, pass_ = (f"{prefix}_chunk_state_kernel", chunks_by_v), ("_chunk_pass_kernel", state_blocks)  # kernels/chunk_pass.py
    return _kernels(state, pass_, (f"{prefix}_output_kernel", chunks_by_v), (f"{prefix}_dstate_kernel", chunks_by_v),
                    pass_, (f"{prefix}_grad_kernel", chunks_by_v))


# the state passes (cdiv(V, BVP), B * H) run fewer programs: kernels/dplr_delta_rule/triton_chunk_parallel.py and
# triton_chunk_bwd.py say why
_DPLR_CHUNK = _kernels(
    ("_dplr_cp_chunk_state_kernel", chunks_by_v), ("_dplr_cp_pass_kernel", dplr_pass, False),
    ("_dplr_cp_output_kernel", chunks_by_v), ("_dplr_cpb_dstate_kernel", chunks_by_v),
    ("_dplr_cpb_pass_kernel", dplr_pass, False), ("_dplr_cpb_du_kernel", chunks_by_v),
    ("_dplr_cpb_grad_kernel", chunks_by_v))
_SSD_FWD = (("_ssd_chunk_state_kernel", ssd_chunks), ("_ssd_state_passing_kernel", ssd_state_passing))
# The packed calls' documents: a partial last chunk in every document at every chunk size (1000 and T - 1001 tokens;
# 1047 at the compile table's T = 2048) and a one-token document between them.
PACKED = (1000, 1)
_PACKED_GRIDS = {chunks_by_v: packed_chunks_by_v, state_blocks: packed_state_blocks, dplr_pass: packed_dplr_pass,
                 ssd_chunks: packed_ssd_chunks, ssd_chunk_heads: packed_ssd_chunk_heads,
                 ssd_state_passing: packed_ssd_state_passing}


def _packed(launches: tuple[Kernel, ...]) -> tuple[Kernel, ...]:
    """The same launches over packed documents: each grid by its packed formula, ``fills`` as declared."""
    return tuple(k._replace(grid=_PACKED_GRIDS[k.grid]) for k in launches)


_SSD_CHUNK = _kernels(*_SSD_FWD, ("_ssd_chunk_scan_kernel", ssd_chunks), *_SSD_FWD, ("_ssd_chunk_bwd_kernel", ssd_chunk_heads))

# Every call, in the order of benchmarks/results/kernels-resources.md; torch forms and peers last.
CALLS: tuple[KernelCall, ...] = (
    KernelCall(OPS["selective_scan"], "triton_recurrent", _kernels(
        ("_selective_scan_fwd_kernel", selective_scan_grid), ("_selective_scan_bwd_kernel", selective_scan_grid))),
    # decode steps (T = 1): one program per block of the state, no time loop to fill the GPU with
    KernelCall(OPS["selective_scan"], "triton_recurrent", _kernels(
        ("_selective_scan_step_kernel", selective_scan_grid, False)), step=True),
    KernelCall(OPS["ssd"], "triton_chunk", _SSD_CHUNK),
    KernelCall(OPS["ssd"], "triton_chunk", _kernels(("_ssd_step_kernel", ssd_step, False)), step=True),
    KernelCall(OPS["rwkv6"], "triton_recurrent", _recurrent("_rwkv6")),
    KernelCall(OPS["dplr_delta_rule"], "triton_recurrent", _recurrent("_dplr")),
    KernelCall(OPS["retention"], "triton_chunk_serial", _kernels(
        ("_retention_chunk_fwd_kernel", heads_by_v, False), ("_retention_chunk_bwd_kernel", heads_by_v, False))),
    KernelCall(OPS["retention"], "triton_recurrent", _recurrent("_retention")),
    KernelCall(OPS["retention"], "triton_chunk", _chunk_parallel("_retention_cp")),
    KernelCall(OPS["rwkv6"], "triton_chunk", _chunk_parallel("_rwkv6_cp")),
    KernelCall(OPS["dplr_delta_rule"], "triton_chunk", _DPLR_CHUNK),
    # the chunk-parallel kernels over packed documents (IS_VARLEN): one launch sequence for all of them
    KernelCall(OPS["ssd"], "triton_chunk", _packed(_SSD_CHUNK), documents=PACKED),
    KernelCall(OPS["retention"], "triton_chunk", _packed(_chunk_parallel("_retention_cp")), documents=PACKED),
    KernelCall(OPS["rwkv6"], "triton_chunk", _packed(_chunk_parallel("_rwkv6_cp")), documents=PACKED),
    KernelCall(OPS["dplr_delta_rule"], "triton_chunk", _packed(_DPLR_CHUNK), documents=PACKED),
    # Gated DeltaNet and KDA: dplr_delta_rule's kernels on the parametrised inputs (chunk-parallel first: the layers train with
    # it); the zero start state gets no gradient, as in the layers
    *(KernelCall(OPS[op], backend, launches, frozen=("initial_state",)) for op in DELTA_RULE_OPS
      for backend, launches in (("triton_chunk", _DPLR_CHUNK), ("triton_recurrent", _recurrent("_dplr")))),
    *(KernelCall(op, "torch", frozen=("initial_state",) if op.name in DELTA_RULE_OPS else ()) for op in OPS.values()),
    KernelCall(OPS["selective_scan"], "mamba_ssm", peer=True),  # selective_scan_fn
    KernelCall(OPS["ssd"], "mamba_ssm", peer=True),  # mamba_chunk_scan_combined
    KernelCall(OPS["rwkv6"], "fla", peer=True),  # chunk_rwkv6
    KernelCall(OPS["dplr_delta_rule"], "fla", peer=True),  # chunk_rwkv7
    KernelCall(OPS["retention"], "fla", frozen=("log_decay",), peer=True),  # chunk_simple_gla: constant decays
    KernelCall(OPS["gated_delta_rule"], "fla", frozen=("initial_state",), peer=True),  # chunk_gated_delta_rule
    KernelCall(OPS["kda"], "fla", frozen=("initial_state",), peer=True),  # chunk_kda
)
CALLS_BY_NAME = {call.name: call for call in CALLS}
TRITON_CALLS = tuple(call for call in CALLS if call.launches)


def shape_label(dims: dict) -> str:
    """``{"H": 12, "K": 64, "V": 64}`` -> ``"H=12 K=V=64"`` (the compile table's shape column)."""
    if dims.get("K") is not None and dims.get("K") == dims.get("V"):
        dims = {("K=V" if k == "K" else k): v for k, v in dims.items() if k != "V"}
    return " ".join(f"{k}={v}" for k, v in dims.items())


def run_call(call: KernelCall, inputs: dict, backward: bool = True) -> None:
    """The call forward and, unless it is a decode step, backward from the output's gradient only (as in training)."""
    run, _ = call.prepare(inputs)
    if call.step or not backward:
        with torch.no_grad():
            run()
        return
    out = run()[0]
    out.backward(torch.empty_like(out))


# ---------------------------------------------------------------- launches recorded without a GPU


class Buffer(NamedTuple):
    """One distinct buffer of a launch: the kernel arguments it is passed as, and its largest view's shape, dtype and bytes."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    bytes: int


class Launch(NamedTuple):
    """One recorded launch: the kernel, its grid (three axes), its upper-case integer / string arguments (tiles) and
    the bytes of the distinct buffers it gets (a buffer passed twice, or as a placeholder, counts once), and those
    buffers."""

    kernel: str
    grid: tuple[int, int, int]
    constants: dict
    bytes: int
    buffers: tuple[Buffer, ...] = ()

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@contextlib.contextmanager
def recording(arch: int):
    """Every ``@triton.jit`` kernel of ``zoo.kernels`` replaced by a recorder, and torch.cuda answering as a GPU of
    capability ``arch`` (the launchers pick their tiles for it); yields the list the launches go to."""
    import importlib
    import pkgutil

    import zoo.kernels
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for info in pkgutil.walk_packages(zoo.kernels.__path__, "zoo.kernels."):
        importlib.import_module(info.name)
    launches: list[Launch] = []

    class Recorder:
        """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records a :class:`Launch`."""

        def __init__(self, jit):
            self.name, self.arg_names = jit.fn.__name__, list(jit.arg_names)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.arg_names, args), **kwargs)
                g = grid(named) if callable(grid) else grid
                g = tuple(int(n) for n in (g if isinstance(g, tuple) else (g,)))
                constants = {k: v for k, v in named.items() if k.isupper() and isinstance(v, (int, str))}
                buffers: dict[int, Buffer] = {}  # storage (its C pointer: meta tensors have no data pointer) -> buffer
                for arg, t in ((k, v) for k, v in named.items() if torch.is_tensor(v)):
                    key, size = t.untyped_storage()._cdata, t.numel() * t.element_size()
                    seen = buffers.get(key, Buffer((), (), "", -1))
                    largest = seen if seen.bytes >= size else Buffer((), tuple(t.shape), str(t.dtype).removeprefix("torch."), size)
                    buffers[key] = largest._replace(names=(*seen.names, arg))
                launches.append(Launch(self.name, (*g, 1, 1)[:3], constants, sum(b.bytes for b in buffers.values()),
                                       tuple(buffers.values())))

            return launch

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("zoo.kernels.") and m is not None]
    kernels = {(m, n): f for m in modules for n, f in list(vars(m).items()) if isinstance(f, (JITFunction, InterpretedFunction))}
    saved = {name: getattr(torch.cuda, name) for name in ("get_device_capability", "get_device_properties")}
    try:
        torch.cuda.get_device_capability = lambda *args, **kwargs: divmod(arch, 10)
        torch.cuda.get_device_properties = lambda *args, **kwargs: SimpleNamespace(shared_memory_per_block_optin=232448)
        for (module, name), jit in kernels.items():
            setattr(module, name, Recorder(jit))
        yield launches
    finally:
        for (module, name), jit in kernels.items():
            setattr(module, name, jit)
        for name, query in saved.items():
            setattr(torch.cuda, name, query)


def launches(call: KernelCall, dims: dict, T: int, batch: int = 1, dtype=torch.bfloat16, arch: int = 90,
             backward: bool = True) -> list[Launch]:
    """The Triton launches of ``call`` (forward, then backward) at these sizes on a GPU of capability ``arch``, from the
    launchers' own code run on ``meta`` tensors: nothing is compiled or computed (needs triton, not a GPU)."""
    inputs = call.op.example(dims, batch, 1 if call.step else T, "meta", dtype)
    with recording(arch) as recorded:
        run_call(call, inputs, backward)
    return recorded


def underfilled(name: str | KernelCall, T: int = 16384) -> list[str]:
    """What breaks the parallelism bar of call ``name`` (e.g. ``"rwkv6/triton_chunk"``) at batch 1, ``T`` tokens and
    each of its op's ``fill`` sizes on an H100: a launch other than the call's declared ones, a grid other than its
    formula, or a launch marked ``fills`` with fewer than :data:`MIN_PROGRAMS` programs. Empty when all hold."""
    call = CALLS_BY_NAME[op_name(name)] if isinstance(name, str) else name
    name, out = call.name, []
    for dims in call.op.fill:
        recorded = launches(call, dims, T)
        if [r.kernel for r in recorded] != [k.name for k in call.launches]:
            out.append(f"{name} {dims}: launched {[r.kernel for r in recorded]}, declared {[k.name for k in call.launches]}")
            continue
        for kernel, r in zip(call.launches, recorded):
            expected = call.grid(r.kernel, {**dims, "B": 1, "T": T}, r.constants)
            if r.grid != expected:
                out.append(f"{name} {dims} {r.kernel}: grid {r.grid}, formula {expected}")
            elif kernel.fills and r.programs < MIN_PROGRAMS:
                out.append(f"{name} {dims} {r.kernel}: {r.programs} programs < {MIN_PROGRAMS}")
    return out
