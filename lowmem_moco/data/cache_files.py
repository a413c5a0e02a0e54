"""Helpers every on-disk image cache shares (decoded: cache.py; encoded: encoded.py).

An entry `stem` in a cache folder is a manifest `<stem>.json`, written last through
checkpoint.atomic_write_bytes, that names its data files `<stem>.<build id>.*`: files no
manifest names are leftovers of an earlier or interrupted build.
"""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..checkpoint import atomic_write_bytes


@contextmanager
def locked(path: Path):
    """One builder at a time per cache entry (others wait, then find it built)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_build_id() -> str:
    return uuid.uuid4().hex[:8]


def read_manifest(directory: Path, stem: str) -> Optional[dict]:
    """The entry's manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(directory) / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None


def commit_manifest(directory: Path, stem: str, manifest: dict, keep: tuple[str, ...]) -> None:
    """Make the build whose data files are `keep` the entry's current one (the atomic switch),
    then delete the data files of earlier or interrupted builds of the same entry."""
    directory = Path(directory)
    atomic_write_bytes(directory / f"{stem}.json", json.dumps(manifest, indent=1).encode())
    for old in directory.glob(f"{stem}.*.*"):
        if old.name not in keep and old.suffix != ".lock":
            old.unlink(missing_ok=True)
