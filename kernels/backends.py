"""Each op's backends, declared once beside its code (``BACKENDS`` in ``kernels/<op>/__init__.py``): a name -> the
function that runs it and the package it needs. One table answers every question a block or a caller asks:
which names exist, whether one can run here, and what ``auto`` runs.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from zoo.errors import BackendUnavailableError, ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """``fn`` takes the op's arguments (without ``backend``); ``package`` must import for it to run (None: always)."""

    fn: Callable[..., Any]
    package: str | None = None

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


class BackendTable:
    """The backends of op ``op``, ``torch`` first. ``auto`` is ``torch`` on every device for now: zoo's Triton kernels
    passed their interpreter tests on CPU, not yet their GPU tests (``pytest -m gpu``; Triton 3.4-3.7.0 miscompiles
    some chunked backward kernels on Hopper), so they run only when asked for by name."""

    def __init__(self, op: str, backends: dict[str, Backend]):
        if next(iter(backends)) != "torch":
            raise ValueError(f"{op}: the first backend must be torch (what auto runs)")
        self.op = op
        self.backends = backends

    def names(self) -> tuple[str, ...]:
        return (AUTO, *self.backends)

    def resolve(self, name: str) -> str:
        """The backend a call with ``name`` runs."""
        return "torch" if name == AUTO else name

    def check(self, name: str, owner: str) -> None:
        """A config's ``backend``: an unknown name is a ConfigError listing the choices."""
        if name not in self.names():
            raise ConfigError("backend", f"unknown {owner} backend '{name}'; choose one of {', '.join(self.names())}")

    def require(self, name: str, owner: str) -> str:
        """At a block's construction: a backend whose package does not import is a BackendUnavailableError, never a
        silent fallback. Returns ``name``."""
        self.check(name, owner)
        backend = self.backends[self.resolve(name)]
        if not backend.available():
            raise BackendUnavailableError(f"{owner} backend '{name}' was asked for but the {backend.package} package is not installed")
        return name

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run the op with backend ``name``."""
        if name not in self.names():
            raise ValueError(f"{self.op}: unknown backend '{name}'; choose one of {', '.join(self.names())}")
        return self.backends[self.resolve(name)].fn(*args, **kwargs)
