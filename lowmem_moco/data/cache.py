"""Decode a data set once into a memory-mapped uint8 file; later batches are slices.

    cache = DecodedCache.open_or_build(data.train, Path(root) / ".lowmem_moco_cache", image_size=224)
    images = cache.batch([5, 17, 3])  # RaggedImages: each image at its own size, HWC uint8
    loader = cache.loader(batch_sampler, num_workers=1, pin_memory=True)  # (images, targets, seeds)

Each image keeps its whole field of view and aspect ratio: its shorter side is brought down
to `shorter_side(S, min crop scale)` = ceil(S / sqrt(min scale)) when it is larger (never
enlarged, so 32-px CIFAR stays native). The smallest crop RandomResizedCrop may draw then
still has S pixels or more a side, as it would on the original. Files in the cache folder,
per split `name`:

    <name>-<side>px.json              manifest: source fingerprint, side, counts, bytes per image, files
    <name>-<side>px.<build>.pixels.u8 all images' HWC uint8 pixels, one after another
    <name>-<side>px.<build>.index.npy int64 (count, 5): source index, label, offset, height, width

The manifest is written last, through a temporary file and a rename, and it is the only
thing that points at the data files: an interrupted build is never used. It is rebuilt
when the source's fingerprint (file list, sizes, mtimes; pixel bytes of array-backed sets;
or a given `source_id`) or the side changes. Unreadable images are skipped and counted;
rows are then positions in the cache, `source_indices` maps them back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .cache_files import commit_manifest, locked, new_build_id
from .fingerprint import source_fingerprint
from ..progress import DecodeBar
from .ragged import RaggedImages

CACHE_VERSION = 2
_PROBE = 16  # images looked at to estimate the cache's size before building it


def shorter_side(image_size: int, min_crop_scale: float = 0.2) -> int:
    """Shorter side the cache stores (at most): the smallest crop still covers image_size pixels."""
    return math.ceil(image_size / math.sqrt(min_crop_scale))


def fit_shorter_side(image: Image.Image, side: int) -> np.ndarray:
    """(H, W, 3) uint8, the whole image, shrunk (Pillow's antialiased bilinear) so its shorter
    side is at most `side`; aspect ratio kept, never enlarged."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if min(width, height) > side:
        scale = side / min(width, height)
        image = image.resize((max(side, round(width * scale)), max(side, round(height * scale))), Image.BILINEAR)
    return np.array(image, dtype=np.uint8)


def estimated_bytes(images, side: int) -> int:
    """Pixel bytes of the whole cache, from a few images spread through the set."""
    sizes = []
    for i in np.linspace(0, len(images) - 1, min(_PROBE, len(images))).astype(int):
        try:
            width, height = images.load(int(i)).size
        except Exception:  # unreadable: the build will count it
            continue
        scale = min(1.0, side / min(width, height))
        sizes.append(round(width * scale) * round(height * scale) * 3)
    return int(np.mean(sizes) * len(images)) if sizes else 0


class _Decode(torch.utils.data.Dataset):
    """Index -> (index, (H, W, 3) array or None if unreadable), for decoding in DataLoader workers."""

    def __init__(self, images, side: int, fail: bool):
        self.images, self.side, self.fail = images, side, fail

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, fit_shorter_side(self.images.load(i), self.side)
        except Exception as err:
            if self.fail and isinstance(err, DataError):  # already names the file and the fix
                raise
            if self.fail:
                raise DataError(f"image {i} of the data set cannot be read ({err}); fix or remove it, "
                                f"or set data.on_bad_image=skip") from None
            return i, None


def _keep(items):
    return items  # a list of (index, array or None): no stacking, bad images stay visible


class DecodedCache:
    """A decoded copy of a LabelledImages set: each image's HWC uint8 pixels, labels and source indices."""

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory, self.manifest = Path(directory), manifest
        self.shorter_side: int = manifest["shorter_side"]
        self.classes: list = manifest["classes"]
        self.skipped: int = manifest["skipped"]
        index = np.load(self.directory / manifest["index_file"])  # (count, 5)
        self.source_indices = index[:, 0]
        self.targets = torch.from_numpy(index[:, 1].copy())
        self.offsets, self.shapes = index[:, 2], index[:, 3:5]  # (count,), (count, 2) height, width
        self._pixels = None  # opened lazily, so that the object pickles cheaply to workers

    def __len__(self) -> int:
        return self.manifest["count"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, shorter side <= {self.shorter_side}px, "
                f"{self.manifest['bytes_per_image']} bytes per image, {self.skipped} skipped, "
                f"{self.directory / self.manifest['pixels_file']})")

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    @property
    def pixels(self) -> np.ndarray:
        """The flat uint8 memory map of all images' pixels (read-only)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.directory / self.manifest["pixels_file"], dtype=np.uint8, mode="r")
        return self._pixels

    def image(self, position: int) -> np.ndarray:
        """(H, W, 3) uint8 view of one cached image."""
        (height, width), start = self.shapes[position], self.offsets[position]
        return self.pixels[start:start + height * width * 3].reshape(height, width, 3)

    def batch(self, positions: Iterable[int]) -> RaggedImages:
        """The given rows as one RaggedImages batch (one gathered copy)."""
        positions = positions.cpu().tolist() if torch.is_tensor(positions) else list(positions)
        return RaggedImages.from_arrays([self.image(int(p)) for p in positions])

    def loader(self, batch_sampler, num_workers: int = 1, pin_memory: bool = False,
               transform: Optional[Callable] = None) -> torch.utils.data.DataLoader:
        """Batches for the positions that `batch_sampler` yields (lists of positions or of
        (position, seed) keys), as (RaggedImages, targets, seeds); one worker reads ahead."""
        # A private generator for the workers' base seed keeps the global RNG out of the data path.
        return torch.utils.data.DataLoader(CachedBatches(self, transform), sampler=batch_sampler, batch_size=None,
                                           num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator())

    # ------------------------------------------------------------------ finding or building

    @classmethod
    def open_or_build(cls, images, directory: str | Path, image_size: int, *, name: str = "train",
                      min_crop_scale: float = 0.2, side: Optional[int] = None, source_id: Optional[str] = None,
                      on_bad_image: str = "skip", num_workers: Optional[int] = None,
                      progress: bool = True) -> "DecodedCache":
        """The cache of `images` with shorter sides of at most `side` px (default:
        `shorter_side(image_size, min_crop_scale)`), re-used when current, else (re)built."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fingerprint = source_fingerprint(images, source_id)
        side = side or shorter_side(image_size, min_crop_scale)
        stem = f"{name}-{side}px"
        with locked(directory / f"{stem}.lock"):
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
            if (manifest.get("version"), manifest.get("fingerprint"), manifest.get("shorter_side")) != \
                    (CACHE_VERSION, fingerprint, side):
                return None
            if os.path.getsize(directory / manifest["pixels_file"]) != manifest["pixel_bytes"]:
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
    build = new_build_id()
    pixels_file, index_file = f"{stem}.{build}.pixels.u8", f"{stem}.{build}.index.npy"
    total = len(images)
    if total == 0:
        raise DataError("the data set to cache has no images; check the data folder")
    need, free = estimated_bytes(images, side), shutil.disk_usage(directory).free
    if need > free:
        raise DataError(f"caching {total} images (shorter side <= {side}px) needs about {need / 2**30:.1f} GiB but "
                        f"{directory} has {free / 2**30:.1f} GiB free; free some space, choose another cache "
                        f"folder, or use data.augment=per_image")
    if num_workers is None:  # worker start-up only pays off for larger sets
        num_workers = min(8, os.cpu_count() or 1) if total >= 2000 else 0
    index = np.empty((total, 5), dtype=np.int64)
    targets = np.asarray(images.targets, dtype=np.int64)
    decoder = torch.utils.data.DataLoader(_Decode(images, side, fail), batch_size=64, num_workers=num_workers,
                                          collate_fn=_keep)
    count = offset = 0
    with DecodeBar(progress, total, f"decoding {total} images, shorter side <= {side}px ({directory})") as bar, \
            open(directory / pixels_file, "wb") as out:
        for items in decoder:
            for i, array in items:
                if array is not None:  # images are written densely, in source order
                    out.write(array.tobytes())
                    index[count] = (i, targets[i], offset, array.shape[0], array.shape[1])
                    offset, count = offset + array.size, count + 1
            bar.advance(len(items))
    if count == 0:
        raise DataError(f"none of the {total} images could be read; check the data folder")
    np.save(directory / index_file, index[:count])
    manifest = dict(version=CACHE_VERSION, fingerprint=fingerprint, shorter_side=side, layout="HWC uint8, flat",
                    count=count, source_count=total, skipped=total - count, pixel_bytes=offset,
                    bytes_per_image=round((offset + index[:count].nbytes) / count),
                    median_sides=[int(v) for v in np.median(np.sort(index[:count, 3:5], axis=1), axis=0)],
                    classes=list(getattr(images, "classes", [])), pixels_file=pixels_file, index_file=index_file,
                    build_seconds=round(time.perf_counter() - started, 1))
    commit_manifest(directory, stem, manifest, keep=(pixels_file, index_file))  # the switch, then old builds go
    if total - count:
        bar.print(f"{total - count} unreadable images skipped while caching")
    return manifest
