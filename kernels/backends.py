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
from typing import Any, Callable, Literal

from zoo.errors import BackendUnavailableError, ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """``fn`` takes the op's arguments (without ``backend``): a function, or its import path ``"module:name"``,
    imported on the first call (so ``import zoo`` never loads Triton; CPU tensors need ``TRITON_INTERPRET=1`` set
    before that first call). ``package`` must import for it to run (None: always)."""

    fn: Callable[..., Any] | str
    package: str | None = None

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def load(self) -> Callable[..., Any]:
        """The function (a path is imported on the first call; later calls find the module in ``sys.modules``)."""
        if not isinstance(self.fn, str):
            return self.fn
        module, _, name = self.fn.partition(":")
        return getattr(importlib.import_module(module), name)


class BackendTable:
    """The backends of op ``op``, ``torch`` first, and ``aliases`` (old name -> the name of the same kernel now).
    ``auto`` is ``torch`` on every device for now: zoo's Triton kernels passed their interpreter tests on CPU, not yet
    their GPU tests (``pytest -m gpu``; Triton 3.4-3.7.0 miscompiles some chunked backward kernels on Hopper), so they
    run only when asked for by name. ``Name`` is the ``Literal`` of every accepted name, the type of a block's
    ``backend`` field (so a recipe's unknown name is refused with its key path and the choices)."""

    def __init__(self, op: str, backends: dict[str, Backend], aliases: dict[str, str] | None = None):
        if next(iter(backends)) != "torch":
            raise ValueError(f"{op}: the first backend must be torch (what auto runs)")
        self.op = op
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

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run the op with backend ``name``."""
        if name not in self.choices():
            raise ValueError(f"{self.op}: unknown backend '{name}'; choose one of {', '.join(self.choices())}")
        return self.backends[self.resolve(name, f"{self.op}()")].load()(*args, **kwargs)
