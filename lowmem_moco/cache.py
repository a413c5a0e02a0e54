"""Decode a data set once into a memory-mapped uint8 array; later batches are slices.

    cache = DecodedCache.open_or_build(data.train, Path(root) / ".lowmem_moco_cache", image_size=96)
    images = cache.batch([5, 17, 3])  # uint8 (3, 3, S, S), channels_last view of the NHWC file
    loader = cache.loader(batch_sampler, num_workers=1, pin_memory=True)  # (images, targets, seeds)

Each image is stored as a square of `storage_size` pixels: shorter side resized to about
1.15x the crop size (never enlarged beyond the data's own size, so 32-px CIFAR stays
native), then centre-cropped. Files, in the cache folder, per split `name`:

    <name>-<S>px.json                manifest: source fingerprint, storage size, counts, files
    <name>-<S>px.<build>.images.npy  uint8 (rows, S, S, 3); the first `count` rows are used
    <name>-<S>px.<build>.index.npy   int64 (count, 2): source index, label of each row

The manifest is written last, through a temporary file and a rename, and it is the only
thing that points at the data files: an interrupted build is never used. It is rebuilt
when the source's fingerprint (file list, sizes, mtimes; pixel bytes of array-backed sets;
or a given `source_id`) or the storage size changes. Unreadable images are skipped and
counted; rows are then positions in the cache, `source_indices` maps them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from PIL import Image

from .errors import DataError

CACHE_VERSION = 1
STORAGE_MARGIN = 1.15  # stored side / crop side: room for the random crop to move
_PROBE = 16  # images looked at to find the data's own size


def storage_size(image_size: int, native_side: Optional[int] = None) -> int:
    """Side of the stored squares: ~1.15x the crop, but never larger than the images are."""
    side = round(STORAGE_MARGIN * image_size)
    return min(side, native_side) if native_side else side


def native_side(images) -> Optional[int]:
    """Median shorter side over a few images spread through the set (None if none can be read)."""
    sides = []
    for i in np.linspace(0, len(images) - 1, min(_PROBE, len(images))).astype(int):
        try:
            sides.append(min(images.load(int(i)).size))
        except Exception:  # unreadable: the build will count it
            continue
    return int(np.median(sides)) if sides else None


def source_fingerprint(images, source_id: Optional[str] = None) -> str:
    """Identity of a LabelledImages set: its files (path, size, mtime) and labels.

    Sets holding their pixels in a numpy `array` (with an optional `index`) are identified by
    its bytes. Others need an identity: pass `source_id`, or give the set a `cache_identity`
    attribute (a string, or a method returning one).
    """
    digest = hashlib.sha256()
    digest.update(f"{type(images).__qualname__}|{len(images)}|".encode())
    digest.update(np.asarray(images.targets, dtype=np.int64).tobytes())
    digest.update(json.dumps(list(getattr(images, "classes", []))).encode())
    identity = source_id if source_id is not None else getattr(images, "cache_identity", None)
    if callable(identity):
        identity = identity()
    if identity is not None:
        digest.update(str(identity).encode())
        return digest.hexdigest()
    array = getattr(images, "array", None)
    if isinstance(array, np.ndarray):  # pixels held in memory: their bytes are the identity
        digest.update(np.ascontiguousarray(array).data)
        digest.update(np.asarray(getattr(images, "index", []), dtype=np.int64).tobytes())
        return digest.hexdigest()
    paths = _file_list(images)
    if paths is None:
        raise DataError(f"cannot tell whether the cached copy of this {type(images).__name__} is current: it "
                        f"lists no image files; pass source_id=... (any string that changes with the data)")
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing now: part of the identity, and skipped at build
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def _file_list(images) -> Optional[list]:
    for attr in ("paths", "files", "samples", "imgs"):
        items = getattr(images, attr, None)
        if items is None or callable(items) or len(items) != len(images):
            continue
        items = [items[i] for i in range(len(items))]
        items = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        if all(isinstance(item, (str, os.PathLike)) for item in items):
            return [os.fspath(item) for item in items]
    return None


def square(image: Image.Image, side: int) -> np.ndarray:
    """(side, side, 3) uint8: shorter side resized to `side` (antialiased), centre crop."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if min(width, height) != side:
        scale = side / min(width, height)
        width, height = max(side, round(width * scale)), max(side, round(height * scale))
        image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - side) // 2, (height - side) // 2
    return np.array(image.crop((left, top, left + side, top + side)), dtype=np.uint8)


class _Decode(torch.utils.data.Dataset):
    """Index -> (index, square array or None if unreadable), for decoding in DataLoader workers."""

    def __init__(self, images, side: int, fail: bool):
        self.images, self.side, self.fail = images, side, fail

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, square(self.images.load(i), self.side)
        except Exception as err:
            if self.fail and isinstance(err, DataError):  # already names the file and the fix
                raise
            if self.fail:
                raise DataError(f"image {i} of the data set cannot be read ({err}); fix or remove it, "
                                f"or set data.on_bad_image=skip") from None
            return i, None


def _keep(items):
    return items  # a list of (index, array or None): no stacking, bad images stay visible


@contextmanager
def _locked(path: Path):
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


class DecodedCache:
    """A decoded copy of a LabelledImages set: uint8 NHWC rows, labels and source indices."""

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory, self.manifest = Path(directory), manifest
        self.storage_size: int = manifest["storage_size"]
        self.classes: list = manifest["classes"]
        self.skipped: int = manifest["skipped"]
        index = np.load(self.directory / manifest["index_file"])
        self.source_indices = index[:, 0]
        self.targets = torch.from_numpy(index[:, 1].copy())
        self._images = None  # opened lazily, so that the object pickles cheaply to workers

    def __len__(self) -> int:
        return self.manifest["count"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images of {self.storage_size}px, {self.skipped} skipped, "
                f"{self.directory / self.manifest['images_file']})")

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.ndarray:
        """The (count, S, S, 3) uint8 memory map."""
        if self._images is None:
            self._images = np.load(self.directory / self.manifest["images_file"], mmap_mode="r")[:len(self)]
        return self._images

    def batch(self, positions: Iterable[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S) of the given rows: a channels_last view of one gathered copy."""
        positions = positions.cpu().numpy() if torch.is_tensor(positions) else list(positions)
        rows = self.images[np.asarray(positions, dtype=np.int64)]  # fancy indexing copies
        return torch.from_numpy(rows).permute(0, 3, 1, 2)

    def loader(self, batch_sampler, num_workers: int = 1, pin_memory: bool = False,
               transform: Optional[Callable] = None) -> torch.utils.data.DataLoader:
        """Batches for the positions that `batch_sampler` yields (lists of positions or of
        (position, seed) keys), as (uint8 images, targets, seeds); one worker reads ahead."""
        return torch.utils.data.DataLoader(CachedBatches(self, transform), sampler=batch_sampler, batch_size=None,
                                           num_workers=num_workers, pin_memory=pin_memory)

    # ------------------------------------------------------------------ finding or building

    @classmethod
    def open_or_build(cls, images, directory: str | Path, image_size: int, *, name: str = "train",
                      side: Optional[int] = None, source_id: Optional[str] = None, on_bad_image: str = "skip",
                      num_workers: Optional[int] = None, progress: bool = True) -> "DecodedCache":
        """The cache of `images` at `side` px (default: `storage_size(image_size, data's own size)`),
        re-used when current, else (re)built with a progress bar."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fingerprint = source_fingerprint(images, source_id)
        side = side or storage_size(image_size, native_side(images))
        stem = f"{name}-{side}px"
        with _locked(directory / f"{stem}.lock"):
            found = cls.open(directory, stem, fingerprint, side)
            if found is not None:
                return found
            manifest = _build(images, directory, stem, fingerprint, side, on_bad_image == "error",
                              num_workers, progress)
            return cls(directory, manifest)

    @classmethod
    def open(cls, directory: str | Path, stem: str, fingerprint: str, side: int) -> Optional["DecodedCache"]:
        """The cache entry `stem` if it is complete and matches; None otherwise."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / f"{stem}.json").read_text())
            if (manifest.get("version"), manifest.get("fingerprint"), manifest.get("storage_size")) != \
                    (CACHE_VERSION, fingerprint, side):
                return None
            shape = np.load(directory / manifest["images_file"], mmap_mode="r").shape
            if shape[0] < manifest["count"] or tuple(shape[1:]) != (side, side, 3):
                return None
            return cls(directory, manifest)
        except (OSError, ValueError, KeyError):
            return None


class CachedBatches(torch.utils.data.Dataset):
    """A data set whose items are whole batches: keys -> (uint8 images, targets, seeds).

    Keys are positions in the cache or (position, seed) pairs (the trainer's EpochBatches);
    seeds is -1 where none was given. `transform(images, seeds)`, if set, replaces the images
    (e.g. batched augmentation run inside CPU workers).
    """

    def __init__(self, cache: DecodedCache, transform: Optional[Callable] = None):
        self.cache, self.transform = cache, transform

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, keys):
        positions = [k[0] if isinstance(k, (tuple, list)) else k for k in keys]
        seeds = torch.tensor([k[1] if isinstance(k, (tuple, list)) else -1 for k in keys], dtype=torch.int64)
        images = self.cache.batch(positions)
        if self.transform is not None:
            images = self.transform(images, seeds)
        return images, self.cache.targets[positions], seeds


# ---------------------------------------------------------------------- the build


def _build(images, directory: Path, stem: str, fingerprint: str, side: int, fail: bool,
           num_workers: Optional[int], progress: bool) -> dict:
    started = time.perf_counter()
    build = uuid.uuid4().hex[:8]
    images_file, index_file = f"{stem}.{build}.images.npy", f"{stem}.{build}.index.npy"
    total = len(images)
    if total == 0:
        raise DataError("the data set to cache has no images; check the data folder")
    need, free = total * side * side * 3, shutil.disk_usage(directory).free
    if need > free:
        raise DataError(f"caching {total} images at {side}px needs {need / 2**30:.1f} GiB but {directory} has "
                        f"{free / 2**30:.1f} GiB free; free some space, choose another cache folder, "
                        f"or use data.augment=per_image")
    if num_workers is None:  # worker start-up only pays off for larger sets
        num_workers = min(8, os.cpu_count() or 1) if total >= 2000 else 0
    rows = np.lib.format.open_memmap(directory / images_file, mode="w+", dtype=np.uint8, shape=(total, side, side, 3))
    index = np.empty((total, 2), dtype=np.int64)
    targets = np.asarray(images.targets, dtype=np.int64)
    decoder = torch.utils.data.DataLoader(_Decode(images, side, fail), batch_size=64, num_workers=num_workers,
                                          collate_fn=_keep)
    count = 0
    with _Bar(progress, total, f"decoding {total} images to {side}px ({directory})") as bar:
        for items in decoder:
            for i, array in items:
                if array is not None:  # rows are written densely, in source order
                    rows[count], index[count] = array, (i, targets[i])
                    count += 1
            bar.advance(len(items))
    if count == 0:
        raise DataError(f"none of the {total} images could be read; check the data folder")
    rows.flush()
    del rows
    np.save(directory / index_file, index[:count])
    manifest = dict(version=CACHE_VERSION, fingerprint=fingerprint, storage_size=side, layout="NHWC uint8",
                    count=count, source_count=total, skipped=total - count,
                    classes=list(getattr(images, "classes", [])), images_file=images_file, index_file=index_file,
                    build_seconds=round(time.perf_counter() - started, 1))
    temporary = directory / f"{stem}.json.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, directory / f"{stem}.json")  # the switch: atomic on one file system
    for old in directory.glob(f"{stem}.*.npy"):  # earlier or interrupted builds of this entry
        if old.name not in (images_file, index_file):
            old.unlink(missing_ok=True)
    if total - count:
        bar.print(f"{total - count} unreadable images skipped while caching")
    return manifest


class _Bar:
    """A rich progress bar in a terminal; start and end lines otherwise (pipes, notebooks' `!`)."""

    def __init__(self, enabled: bool, total: int, title: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.console = Console(highlight=False)
        self.enabled, self.title, self.total = enabled, title, total
        self.live = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=self.console, transient=True) if enabled and self.console.is_terminal else None

    def __enter__(self):
        if self.live is not None:
            self.live.start()
            self.task = self.live.add_task(self.title, total=self.total)
        else:
            self.print(self.title)
        self.started = time.perf_counter()
        return self

    def advance(self, n: int) -> None:
        if self.live is not None:
            self.live.advance(self.task, n)

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()
        if exc[0] is None:
            self.print(f"{self.title}: done in {time.perf_counter() - self.started:.1f}s")

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
