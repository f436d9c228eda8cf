"""Name -> (class, typed config) registries for sequence mixers ("blocks") and feed-forward modules."""
from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Callable, Generic, TypeVar

from zoo.errors import ConfigError

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config_cls: type


class Registry(Generic[T]):
    """Maps a registry name to a module class and its config dataclass."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config_cls: type) -> Callable[[T], T]:
        if not is_dataclass(config_cls):
            raise TypeError(f"{self.kind} '{name}': config class {config_cls.__name__} must be a dataclass")

        def decorate(cls: T) -> T:
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} '{name}' is already registered to {self._entries[name].cls.__name__}")
            self._entries[name] = Entry(name, cls, config_cls)
            cls.registry_name = name
            return cls

        return decorate

    def get(self, name: str, path: str = "") -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(path, f"unknown {self.kind} '{name}'; registered {self.kind}s: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)


MIXERS: Registry = Registry("block")
FFNS: Registry = Registry("ffn")
