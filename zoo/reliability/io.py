"""Atomic writes and safe loads of checkpoints, and the Lightning ``CheckpointIO`` plugin that uses them.

A checkpoint is written to a hidden temp file in its own directory, fsynced, then renamed over the final name, so a
file under its final name is always complete. Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zoo.errors import ZooError

TEMP_PREFIX = ".tmp-"


class CheckpointError(ZooError):
    """A checkpoint or export could not be written or read; the message names the file and the cause."""


def describe_os_error(err: OSError, path: Path, action: str) -> str:
    """One line saying what went wrong writing/reading ``path`` in terms a user can act on."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while {action} {path}; free disk space (earlier checkpoints are intact)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied while {action} {path}: {path.parent} is not writable (set output_dir to a writable directory)"
    return f"{action} {path} failed: {err.strerror or err}"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(binary_file)`` on a temp file beside ``path``, fsync it, then rename it to ``path``.

    On any failure the temp file is removed, ``path`` keeps its previous content, and an ``OSError`` becomes a
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    except OSError as err:
        raise CheckpointError(describe_os_error(err, path, "writing")) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CheckpointError(describe_os_error(err, path, "writing")) from err
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; when the block succeeds it replaces ``path`` by renames.

    Readers see the old directory or the complete new one, never a half-written one (the old one is moved aside,
    the new one renamed in, then the old one deleted). On failure the temp directory is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}."))
    except OSError as err:
        raise CheckpointError(describe_os_error(err, path, "writing")) from err
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.with_name(f"{TEMP_PREFIX}{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(describe_os_error(err, path, "writing")) from err
        raise


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; a missing, truncated or unsafe file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (an interrupted write?)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refusing to load: the file is corrupt or holds objects outside torch's weights-only allowlist "
            f"(zoo never unpickles arbitrary code): {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a complete PyTorch checkpoint (truncated or corrupt): {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning training checkpoint (no state_dict / global_step)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic, fsynced saves; weights-only loads with errors that name the file.

    ``broadcast_loads`` (set by :func:`zoo.distributed.agree_on_resume` when ``output_dir`` is not shared between
    machines): global rank 0 reads the file and broadcasts it to the other ranks, which may not have it."""

    def __init__(self) -> None:
        super().__init__()
        self.broadcast_loads = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        map_location = map_location if map_location is not None else "cpu"
        if not self.broadcast_loads:
            return load_checkpoint_file(path, map_location)
        import torch.distributed as dist

        loaded: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                loaded = [load_checkpoint_file(path)]
            except CheckpointError as err:
                loaded = [str(err)]
        dist.broadcast_object_list(loaded, src=0)
        if isinstance(loaded[0], str):
            raise CheckpointError(loaded[0])
        return loaded[0]  # on the CPU: Lightning moves the states where they belong when it loads them


def ensure_writable_dir(path: str | Path, key: str = "output_dir") -> Path:
    """Create ``path`` if needed and check a file can be written in it; else a ConfigError naming ``key``."""
    from zoo.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(key, f"{path} is not writable: {err.strerror or err}; choose a directory you can write to") from None
    return path


def explain_safetensors_error(model_dir: str | Path, err: Exception) -> CheckpointError:
    """A CheckpointError naming the ``*.safetensors`` file under ``model_dir`` that cannot be read, and why."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as file_err:  # safetensors raises its own error types for every kind of damage
            return CheckpointError(f"{file}: corrupt or truncated safetensors file ({file_err}); re-export or re-download it")
    return CheckpointError(f"{model_dir}: cannot load the safetensors weights: {err}")
