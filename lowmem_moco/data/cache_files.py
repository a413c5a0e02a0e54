"""Helpers every on-disk image cache shares (decoded: cache.py; encoded: encoded.py).

An entry `stem` in a cache folder is a manifest `<stem>.json`, written last through
checkpoint.atomic_write_bytes, that names its data files `<stem>.<build id>.*`: files no
manifest names are leftovers of an earlier or interrupted build.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from ..errors import DataError
from .images import small_images_line


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


def start_build(images, directory: Path, need_bytes: int, what: str, fix: str, num_workers: Optional[int],
                workers_from: int) -> int:
    """Check that a build can start (images to cache, disk space for `need_bytes`) and return
    its number of decoding workers (default: one per core, at most 8, for `workers_from`
    images or more: worker start-up only pays off for larger sets)."""
    total = len(images)
    if total == 0:
        raise DataError("the data set to cache has no images; check the data folder")
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        raise DataError(f"caching {total} images {what} needs about {need_bytes / 2**30:.1f} GiB but {directory} "
                        f"has {free / 2**30:.1f} GiB free; free some space, {fix}")
    if num_workers is not None:
        return num_workers
    return min(8, os.cpu_count() or 1) if total >= workers_from else 0


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


class PackedEntry:
    """A cache entry whose data is one flat uint8 file, memory-mapped on first use.

    Subclasses name the manifest keys of that file and of its size, and the format version;
    the map is never pickled, so DataLoader workers open their own."""

    version: int
    data_key: str  # manifest key: the flat file's name
    size_key: str  # manifest key: its size in bytes

    manifest_name = "its manifest"  # file name, set by open()

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory, self.manifest = Path(directory), manifest
        self.shorter_side: int = manifest["shorter_side"]
        self.classes: list = manifest["classes"]
        self.skipped: int = manifest["skipped"]
        # (count, columns) int64: source index, label, offset in the data file, then the format's own
        self.index = np.load(self.directory / manifest["index_file"])
        self.source_indices = self.index[:, 0]
        self.targets = torch.from_numpy(self.index[:, 1].copy())
        self._mapped = None

    def __getstate__(self):
        return {**self.__dict__, "_mapped": None}

    @property
    def mapped(self) -> np.ndarray:
        """The flat uint8 memory map of the entry's data file (read-only)."""
        if self._mapped is None:
            self._mapped = np.memmap(self.directory / self.manifest[self.data_key], dtype=np.uint8, mode="r")
        return self._mapped

    @classmethod
    def open(cls, directory: str | Path, stem: str, fingerprint: str, side: int, **options):
        """The entry `stem` if it is complete and matches (version, source, side); None otherwise."""
        manifest = read_manifest(Path(directory), stem)
        try:
            if manifest is None or (manifest.get("version"), manifest.get("fingerprint"),
                                    manifest.get("shorter_side")) != (cls.version, fingerprint, side):
                return None
            if os.path.getsize(Path(directory) / manifest[cls.data_key]) != manifest[cls.size_key]:
                return None
            entry = cls(directory, manifest, **options)
            entry.manifest_name = f"{stem}.json"
            return entry
        except (OSError, ValueError, KeyError):
            return None

    def small_images(self, image_size: int) -> Optional[str]:
        """The warning line for cached images below `image_size` px on their shorter side, or None;
        exact and free: images that small were never shrunk, so the stored shapes are their own."""
        sides = self.shapes.min(axis=1)  # (count,); subclasses keep (height, width) per image in `shapes`
        small = sides[sides < image_size]
        return small_images_line(len(small), len(self), image_size, int(small.min())) if len(small) else None

    def warn_small_images(self, image_size: int) -> None:
        note = self.small_images(image_size)
        if note:
            warnings.warn(note, stacklevel=3)

    def report_hit(self) -> None:
        """A cache hit repeats what its build said about unreadable images."""
        if self.skipped:
            print(f"{self.skipped} unreadable images were skipped when {self.directory / self.manifest_name} was "
                  f"built (listed there under skipped_files)")
