"""Finding the checkpoint to resume from, and trimming ``metrics.csv`` to it."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from zoo.reliability.io import TEMP_PREFIX, CheckpointError, atomic_write, load_checkpoint_file

logger = logging.getLogger("zoo")
_STEP = re.compile(r"step-(\d+)")


@dataclass
class ResumePoint:
    path: Path
    step: int
    skipped: list[str]  # "file: reason" for each newer checkpoint that was unusable
    recipe: dict | None = None  # the resolved recipe the checkpoint was trained with (see saved_recipe)


RECIPE_KEY = "zoo_recipe"  # the checkpoint entry holding the run's resolved recipe (a plain dict)


def saved_recipe(path: Path, checkpoint: dict) -> dict | None:
    """The resolved recipe a checkpoint was trained with: its own copy, or (checkpoints written before it kept one)
    the ``recipe.yaml`` of the run directory holding its ``ckpt/``; None when neither exists."""
    if isinstance(checkpoint.get(RECIPE_KEY), dict):
        return checkpoint[RECIPE_KEY]
    beside = Path(path).parent.parent / "recipe.yaml"
    if beside.is_file():
        import yaml

        with contextlib.suppress(yaml.YAMLError):
            loaded = yaml.safe_load(beside.read_text())
            return loaded if isinstance(loaded, dict) else None
    return None


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """Complete-looking ``*.ckpt`` files (temp files of unfinished writes excluded), newest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    files = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]

    def order(p: Path) -> tuple[int, float]:
        match = _STEP.search(p.name)
        return (int(match.group(1)) if match else -1, p.stat().st_mtime)

    return sorted(files, key=order, reverse=True)


def find_resume_point(output_dir: str | Path, resume: str) -> ResumePoint | None:
    """``resume="auto"``: the newest checkpoint under ``<output_dir>/ckpt`` that loads, or None when there is none
    (a fresh start). Unloadable newer ones are listed in ``skipped`` and logged. Otherwise ``resume`` is a path,
    which must load."""
    if resume != "auto":
        checkpoint = load_checkpoint_file(resume)
        return ResumePoint(Path(resume), int(checkpoint["global_step"]), [], saved_recipe(Path(resume), checkpoint))
    skipped = []
    for path in checkpoint_files(Path(output_dir) / "ckpt"):
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as err:
            skipped.append(str(err))
            logger.warning("resume=auto: skipping %s", err)
            continue
        return ResumePoint(path, int(checkpoint["global_step"]), skipped, saved_recipe(path, checkpoint))
    if skipped:
        raise CheckpointError(f"resume=auto: no usable checkpoint in {Path(output_dir) / 'ckpt'}; " + "; ".join(skipped))
    return None


def trim_metrics(path: str | Path, before_step: int) -> int:
    """Keep the rows of ``metrics.csv`` with ``step < before_step`` (the resumed run writes the rest again).
    Returns the number of rows kept. A missing file is left missing."""
    path = Path(path)
    if not path.exists():
        return 0
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = []
        for row in reader:
            step = row.get("step") or ""
            if step.isdigit() and int(step) < before_step and None not in row and None not in row.values():
                rows.append(row)
    buf = io.StringIO()
    if fields:
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
    return len(rows)
