"""What every on-disk image cache shares (decoded: decoded.py; encoded: encoded.py): `PackedEntry`
(find a current entry or build it, its memory-mapped data file), the build's checks and size
estimate, the lock and the manifest switch. The shorter side a cache keeps is sides.py's.

An entry `stem` in a cache folder is a manifest `<stem>.json`, written last through
files.atomic_write_bytes, that names its data files `<stem>.<build id>.*`: files no
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
from typing import Callable, Optional

import numpy as np
import torch

from ...files import atomic_write_bytes
from ...errors import DataError
from .fingerprint import source_fingerprint
from .sides import shorter_side
from ..sources.images import small_images_line


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


def split_keys(keys) -> tuple[list[int], torch.Tensor]:
    """A batch's keys (positions, or (position, seed) pairs as EpochBatches yields) -> (positions,
    seeds (N,) int64, -1 where a key has none)."""
    positions = [int(k[0]) if isinstance(k, (tuple, list)) else int(k) for k in keys]
    seeds = torch.tensor([k[1] if isinstance(k, (tuple, list)) else -1 for k in keys], dtype=torch.int64)
    return positions, seeds


_PROBE = 16  # images looked at to estimate a cache's size before building it


def estimated_total(images, bytes_of: Callable[[int], float]) -> int:
    """A cache's size: `bytes_of(i)` for a few images spread through the set, averaged, times
    the set's size. An image bytes_of cannot read is passed over (the build counts it)."""
    sizes = []
    for i in np.linspace(0, len(images) - 1, min(_PROBE, len(images))).astype(int):
        try:
            sizes.append(bytes_of(int(i)))
        except Exception:  # noqa: BLE001 - unreadable: the build will count it
            continue
    return int(np.mean(sizes) * len(images)) if sizes else 0


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

    stem_suffix = ""  # told apart in a shared cache folder: "<name>-<side>px<suffix>"

    @classmethod
    def stem(cls, name: str, side: int) -> str:
        """The entry's file-name stem for split `name` and shorter side `side`."""
        return f"{name}-{side}px{cls.stem_suffix}"

    @staticmethod
    def build(images, directory: Path, stem: str, fingerprint: str, side: int, fail: bool,
              num_workers: Optional[int], progress: bool) -> dict:
        """Write the entry's data files and manifest; return the manifest."""
        raise NotImplementedError

    @classmethod
    def open_or_build(cls, images, directory: str | Path, image_size: int, *, name: str = "train",
                      min_crop_scale: float = 0.2, side: Optional[int] = None, source_id: Optional[str] = None,
                      on_bad_image: str = "skip", num_workers: Optional[int] = None,
                      progress: bool = True, fingerprint: Optional[str] = None):
        """The cache of `images` with shorter sides of at most `side` px (default:
        `shorter_side(image_size, min_crop_scale)`), re-used when current, else (re)built.
        `fingerprint`: the images' source_fingerprint, when the caller has already computed it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fingerprint = fingerprint or source_fingerprint(images, source_id)
        side = side or shorter_side(image_size, min_crop_scale)
        stem, options = cls.stem(name, side), cls.entry_options(on_bad_image)
        with locked(directory / f"{stem}.lock"):
            cache = cls.open(directory, stem, fingerprint, side, **options)
            if cache is None:
                manifest = cls.build(images, directory, stem, fingerprint, side, on_bad_image == "error",
                                     num_workers, progress)
                cache = cls(directory, manifest, **options)
            elif progress:
                cache.report_hit()
        if progress:
            cache.warn_small_images(image_size)
        return cache

    @staticmethod
    def entry_options(on_bad_image: str) -> dict:
        """Constructor arguments beyond (directory, manifest) that the entry takes."""
        return {}

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
