"""How every benchmark saves what it measured: ``<stem>.json`` (the report) and ``<stem>.md`` (its table), printed too."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(stem: Path, report: dict, table: str) -> None:
    """Write ``stem.json`` and ``stem.md`` (creating the folder), print the table and where both went."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table, end="" if table.endswith("\n") else "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
