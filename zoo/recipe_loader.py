"""Recipe files: built-in names or YAML paths, ``base:`` inheritance, ``key.path=value`` overrides, then the typed
:class:`~zoo.config.Recipe`."""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zoo.config import Recipe
from zoo.errors import ConfigError


def builtin_recipes_dir() -> Path:
    return Path(str(importlib.resources.files("zoo.recipes")))


def builtin_recipe_names() -> list[str]:
    return sorted(p.stem for p in builtin_recipes_dir().glob("*.yaml"))


def resolve_recipe_path(name: str, relative_to: Path | None = None) -> Path:
    """A recipe name (``transformer_small``) or a path to a YAML file."""
    candidates = []
    if name.endswith((".yaml", ".yml")) or "/" in name:
        candidates.append(Path(name))
        if relative_to is not None:
            candidates.insert(0, relative_to / name)
    else:
        if relative_to is not None:
            candidates.append(relative_to / f"{name}.yaml")
        candidates.append(builtin_recipes_dir() / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError("recipe", f"unknown recipe '{name}'; built-in recipes: {', '.join(builtin_recipe_names())}, or give a path to a .yaml file")


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.stem for p in (*seen, path))
        raise ConfigError("base", f"recipes inherit in a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("recipe", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", f"{path} must hold a mapping at its top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"in {path}: expected a recipe name, got {base!r}")
    parent = _load_tree(resolve_recipe_path(base, path.parent), (*seen, path))
    return _merge(parent, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in ``top`` replace those in ``base``."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "model.blocks=[lstm,attention]"]`` -> nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, "overrides take the form key.path=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError("overrides", f"cannot parse {overrides}: {err}") from None


def load_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load recipe ``name`` (built-in name or YAML path), apply its bases and ``key.path=value`` overrides."""
    path = resolve_recipe_path(name)
    tree = _load_tree(path)
    tree.setdefault("name", path.stem)
    tree = _merge(tree, parse_overrides(list(overrides)))
    return Recipe.from_dict(tree)
