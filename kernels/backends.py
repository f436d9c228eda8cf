"""Each op's backends, declared once beside its code (``BACKENDS`` in ``kernels/<op>/__init__.py``): a name -> the
function that runs it and the package it needs. One table answers every question a block or a caller asks:
which names exist, whether one can run here, and what ``auto`` runs.

A name means one algorithm on every op: ``torch`` (zoo's PyTorch forms), ``triton_recurrent`` (one program walks the
tokens with its state slice in registers), ``triton_chunk_serial`` (one program walks the chunks), ``triton_chunk``
(chunk-parallel: chunk-local work in parallel over chunks, states passed between chunks by a small sequential
kernel), and the peers' packages (``fla``, ``mamba_ssm``). Old names stay as aliases that run the kernel they ran
before and warn once (:data:`FutureWarning`) with the name to use.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import torch

from zoo.errors import BackendUnavailableError, ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """``fn`` takes the op's arguments (without ``backend``): a function, or its import path ``"module:name"``,
    imported on the first call (so ``import zoo`` never loads Triton; CPU tensors need ``TRITON_INTERPRET=1`` set
    before that first call). ``package`` must import for it to run (None: always)."""

    fn: Callable[..., Any] | str
    package: str | None = None
    varlen: bool = False  # fn takes cu_seqlens= itself (packed documents in one call)

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def load(self) -> Callable[..., Any]:
        """The function (a path is imported on the first call; later calls find the module in ``sys.modules``)."""
        if not isinstance(self.fn, str):
            return self.fn
        module, _, name = self.fn.partition(":")
        return getattr(importlib.import_module(module), name)


class CuSeqlens(NamedTuple):
    """Packed documents' boundaries ``0 = b_0 < ... < b_N = T`` both as Python ints (``bounds``: what a per-document
    loop and a launcher read, no device sync) and as an int tensor on the tokens' device (``tensor``: what a varlen
    kernel reads; fla's ``cu_seqlens`` beside its ``cu_seqlens_cpu``), or None until one is needed."""

    bounds: tuple[int, ...]
    tensor: torch.Tensor | None = None

    def on(self, device: torch.device) -> torch.Tensor:
        """The boundaries as an int64 tensor on ``device`` (``tensor`` when it is there already)."""
        if self.tensor is not None and self.tensor.device == device:
            return self.tensor
        return torch.tensor(self.bounds, dtype=torch.int64, device=device)

    def host(self) -> torch.Tensor:
        """The boundaries as a CPU int64 tensor, built from ``bounds`` (fla's ``cu_seqlens_cpu``)."""
        return torch.tensor(self.bounds, dtype=torch.int64)


def fla_varlen(cu_seqlens: CuSeqlens | None, device: torch.device) -> dict:
    """fla's keyword arguments for packed documents: ``cu_seqlens`` on ``device`` and ``cu_seqlens_cpu`` built from
    the host boundaries, so fla does not read the device tensor back (none without documents)."""
    return {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens.on(device), "cu_seqlens_cpu": cu_seqlens.host()}


def check_cu_seqlens(op: str, cu_seqlens, tokens: torch.Tensor) -> CuSeqlens:
    """``cu_seqlens`` of the packed documents of ``tokens [1, T, ...]``: the cumulative lengths ``0 < ... < T`` (every
    document at least one token) as a 1-D int32/int64 tensor (read to the host here: one device sync), a sequence of
    ints or a :class:`CuSeqlens` (no sync). Returns them as a :class:`CuSeqlens`."""
    if isinstance(cu_seqlens, CuSeqlens):
        bounds, tensor = cu_seqlens
    elif isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or len(cu_seqlens) < 2:
            raise ValueError(f"{op}: cu_seqlens must be a 1-D int32/int64 tensor of the documents' cumulative lengths "
                             f"[0, ..., T], got {cu_seqlens!r}")
        bounds, tensor = cu_seqlens.tolist(), cu_seqlens
    elif isinstance(cu_seqlens, (list, tuple)) and all(isinstance(b, int) and not isinstance(b, bool) for b in cu_seqlens):
        bounds, tensor = cu_seqlens, None
    else:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D int32/int64 tensor, a sequence of ints or a CuSeqlens of the "
                         f"documents' cumulative lengths [0, ..., T], got {cu_seqlens!r}")
    if tokens.shape[0] != 1:
        raise ValueError(f"{op}: packed documents (cu_seqlens) take a batch of one [1, T, ...], got batch {tokens.shape[0]}")
    T = tokens.shape[1]
    bounds = tuple(bounds)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{op}: cu_seqlens must rise strictly from 0 to T = {T} (no empty document), got {list(bounds)}")
    return CuSeqlens(bounds, tensor)


class BackendTable:
    """The backends of op ``op``, ``torch`` first, and ``aliases`` (old name -> the name of the same kernel now).
    ``auto`` is ``torch`` on every device for now: zoo's Triton kernels passed their interpreter tests on CPU, not yet
    their GPU tests (``pytest -m gpu``; Triton 3.4-3.7.0 miscompiles some chunked backward kernels on Hopper), so they
    run only when asked for by name. ``Name`` is the ``Literal`` of every accepted name, the type of a block's
    ``backend`` field (so a recipe's unknown name is refused with its key path and the choices). ``layout`` has a
    letter per positional argument of the backends: ``t`` a per-token ``[B, T, ...]`` tensor (or None), ``s`` the
    initial state ``[B, ...]`` (or None), ``.`` anything else: what :meth:`per_document` cuts."""

    def __init__(self, op: str, backends: dict[str, Backend], aliases: dict[str, str] | None = None, *, layout: str):
        if next(iter(backends)) != "torch":
            raise ValueError(f"{op}: the first backend must be torch (what auto runs)")
        if layout.count("s") != 1 or not layout.startswith("t") or set(layout) - set("ts."):
            raise ValueError(f"{op}: layout must start with a per-token tensor 't' and hold one state 's', got {layout!r}")
        self.op = op
        self.layout = layout
        self.backends = backends
        self.aliases = dict(aliases or {})
        unknown = sorted(set(self.aliases.values()) - set(backends))
        if unknown:
            raise ValueError(f"{op}: aliases of unknown backends {unknown}")
        self.Name = Literal[(*self.names(), *self.aliases)]  # type: ignore[valid-type]

    def names(self) -> tuple[str, ...]:
        """``auto`` and the backends' own names (aliases left out)."""
        return (AUTO, *self.backends)

    def choices(self) -> tuple[str, ...]:
        """Every name a caller may pass: :meth:`names`, then the deprecated aliases."""
        return (*self.names(), *self.aliases)

    def resolve(self, name: str, where: str = "") -> str:
        """The backend a call with ``name`` runs; a deprecated alias warns (once per ``where``) with the name to use."""
        if name in self.aliases:
            new = self.aliases[name]
            at = f" ({where})" if where else ""
            warnings.warn(f"{self.op} backend '{name}'{at} is a deprecated name; use '{new}', the same kernel",
                          FutureWarning, stacklevel=3)
            return new
        return "torch" if name == AUTO else name

    def check(self, name: str, owner: str) -> None:
        """A config's ``backend``: an unknown name is a ConfigError listing the choices."""
        if name not in self.choices():
            raise ConfigError("backend", f"unknown {owner} backend '{name}'; choose one of {', '.join(self.choices())}")

    def require(self, name: str, owner: str) -> str:
        """At a block's construction: a backend whose package does not import is a BackendUnavailableError, never a
        silent fallback. Returns the name to call with (an alias resolved: the block warns once, not every call)."""
        self.check(name, owner)
        name = name if name == AUTO else self.resolve(name, f"{owner} block")
        backend = self.backends[self.resolve(name)]
        if not backend.available():
            raise BackendUnavailableError(f"{owner} backend '{name}' was asked for but the {backend.package} package is not installed")
        return name

    def exports(self, module: str, **names: str) -> Callable[[str], Any]:
        """A module ``__getattr__`` for the public names of lazily imported functions: ``name`` -> a backend's name
        (its function) or an import path ``"module:name"``; each is imported on first use."""

        def __getattr__(name: str) -> Any:
            if name not in names:
                raise AttributeError(f"module {module!r} has no attribute {name!r}")
            target = names[name]
            return (Backend(target) if ":" in target else self.backends[target]).load()

        return __getattr__

    def one_document(self, args: tuple, cu_seqlens) -> tuple[tuple, CuSeqlens | None]:
        """``(args, cu_seqlens)`` for the op's shape checks and its call: ``args`` as given and None without
        ``cu_seqlens``; with it, the boundaries read once (:func:`check_cu_seqlens`), the initial state's first
        dimension checked against the number of documents and cut to the first document's ``[1, ...]``."""
        if cu_seqlens is None:
            return args, None
        cu = check_cu_seqlens(self.op, cu_seqlens, args[0])
        n_docs = len(cu.bounds) - 1
        i = self.layout.index("s")
        state = args[i]
        if state is None:
            return args, cu
        if state.dim() == 0 or state.shape[0] != n_docs:
            raise ValueError(f"{self.op}: initial_state must hold one state per document ([N = {n_docs}, ...] for "
                             f"{n_docs} documents in cu_seqlens), got {list(state.shape)}")
        return (*args[:i], state[:1], *args[i + 1:]), cu

    def per_document(self, fn: Callable[..., Any], args: tuple, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``fn`` once per document of ``cu_seqlens`` (its tokens, its initial state); returns the outputs
        concatenated over time ``[1, T, ...]`` and the final states stacked ``[N, ...]``. (Left-padded batches of
        the documents were measured slower on CPU: ``benchmarks/packing.py``, issue 28's note.)"""
        bounds = check_cu_seqlens(self.op, cu_seqlens, args[0]).bounds
        outs, finals = [], []
        for i, (s0, s1) in enumerate(zip(bounds, bounds[1:])):
            doc = [x[:, s0:s1] if kind == "t" and x is not None else x[i:i + 1] if kind == "s" and x is not None else x
                   for x, kind in zip(args, self.layout, strict=True)]
            out, final = fn(*doc)
            outs.append(out)
            finals.append(final)
        return torch.cat(outs, dim=1), torch.cat(finals, dim=0)

    def __call__(self, name: str, *args: Any, cu_seqlens=None) -> Any:
        """Run the op with backend ``name`` (packed documents: ``cu_seqlens``, see :func:`check_cu_seqlens`; a varlen
        backend gets them as a :class:`CuSeqlens`)."""
        if name not in self.choices():
            raise ValueError(f"{self.op}: unknown backend '{name}'; choose one of {', '.join(self.choices())}")
        backend = self.backends[self.resolve(name, f"{self.op}()")]
        if cu_seqlens is None:
            return backend.load()(*args)
        cu = check_cu_seqlens(self.op, cu_seqlens, args[0])
        if backend.varlen:
            return backend.load()(*args, cu_seqlens=cu)
        return self.per_document(backend.load(), args, cu)
