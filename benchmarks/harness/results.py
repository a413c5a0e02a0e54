"""The one writer of results: every command writes `<stem>.json` (its figures) and `<stem>.md`
(its tables) into RESULTS, or the folder its `--out` names, through `write_results`; the
Markdown tables come from `markdown_table`."""

from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def write_results(stem: str | Path, data, markdown: str, folder: Path | str = RESULTS) -> dict[str, Path]:
    """Writes folder/stem.json and folder/stem.md (a stem given as a path, e.g. from --out, keeps
    its own folder; a .md or .json suffix on it is dropped). Returns {"json": path, "md": path}."""
    stem = Path(stem)
    base = (stem if stem.parent != Path(".") or stem.is_absolute() else Path(folder) / stem)
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": base.parent / f"{base.name}.json", "md": base.parent / f"{base.name}.md"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def markdown_table(heads: Iterable[str], rows: Iterable[Iterable], align: str = "") -> list[str]:
    """Lines of a Markdown table; `align` has one letter per column, 'r' for right-aligned
    (default: all left)."""
    heads = list(heads)
    marks = ["---:" if (align[i:i + 1] == "r") else "---" for i in range(len(heads))]
    return ["| " + " | ".join(heads) + " |", "|" + "|".join(marks) + "|"] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def dated(name: str) -> str:
    """`name-<today>`: the stem of a run's results."""
    return f"{name}-{datetime.date.today().isoformat()}"


def command_line(name: str, argv: list[str] | None) -> str:
    """How the command was run, for the reports."""
    return " ".join(["python -m benchmarks", name, shlex.join(argv or [])]).strip()
