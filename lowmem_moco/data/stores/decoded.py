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
or a given `source_id`) or the side changes. Unreadable images are skipped with a "skipped
<path>: <reason>" line, counted and listed in the manifest (skipped_files); rows are then
positions in the cache, `source_indices` maps them back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ...errors import DataError
from .packed import PackedEntry, commit_manifest, estimated_total, new_build_id, split_keys, start_build
from ..sources.decoding import UnreadableImageError
from ...progress import DecodeBar
from .ragged import RaggedImages
from ..loader import make_loader
from .sides import fit_shorter_side

CACHE_VERSION = 2
_SKIP_LINES = 20  # "skipped <path>" lines printed by a build; the manifest lists them all


def estimated_bytes(images, side: int) -> int:
    """Pixel bytes of the whole cache, from a few images spread through the set."""
    def pixel_bytes(i: int) -> int:
        width, height = images.load(i).size
        scale = min(1.0, side / min(width, height))
        return round(width * scale) * round(height * scale) * 3
    return estimated_total(images, pixel_bytes)


class _Decode(torch.utils.data.Dataset):
    """Index -> (index, (H, W, 3) array, None) or, if unreadable, (index, None, ("skipped <path>: <reason>",
    the error message)), for decoding in DataLoader workers; the builder raises or skips."""

    def __init__(self, images, side: int):
        self.images, self.side = images, side

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, fit_shorter_side(self.images.load(i), self.side), None
        except UnreadableImageError as err:  # names the file and the fix
            return i, None, (err.skipped_line, str(err))
        except Exception as err:  # a set without files (e.g. drawn on the fly)
            return i, None, (f"skipped image {i}: {type(err).__name__}: {err}", f"image {i} of the data set "
                             f"cannot be read ({err}); fix or remove it, or set data.on_bad_image=skip")


class DecodedCache(PackedEntry):
    """A decoded copy of a LabelledImages set: each image's HWC uint8 pixels, labels and source indices."""

    version, data_key, size_key = CACHE_VERSION, "pixels_file", "pixel_bytes"

    @staticmethod
    def build(*args) -> dict:
        return _build(*args)

    def __init__(self, directory: str | Path, manifest: dict):
        super().__init__(directory, manifest)
        self.offsets, self.shapes = self.index[:, 2], self.index[:, 3:5]  # (count,), (count, 2) height, width

    def __len__(self) -> int:
        return self.manifest["count"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, shorter side <= {self.shorter_side}px, "
                f"{self.manifest['bytes_per_image']} bytes per image, {self.skipped} skipped, "
                f"{self.directory / self.manifest['pixels_file']})")

    @property
    def pixels(self) -> np.ndarray:
        """The flat uint8 memory map of all images' pixels (read-only)."""
        return self.mapped

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
        return make_loader(CachedBatches(self, transform), workers=num_workers, pin_memory=pin_memory,
                           sampler=batch_sampler, batch_size=None)

    # ------------------------------------------------------------------ finding or building


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
        positions, seeds = split_keys(keys)
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
    num_workers = start_build(images, directory, estimated_bytes(images, side), f"(shorter side <= {side}px)",
                              "choose another data.cache_dir, or set data.cache=encoded or none", num_workers, 2000)
    index = np.empty((total, 5), dtype=np.int64)
    targets = np.asarray(images.targets, dtype=np.int64)
    decoder = make_loader(_Decode(images, side), workers=num_workers, ragged=True, batch_size=64)
    count = offset = 0
    skipped_files = []  # "skipped <path>: <reason>" lines
    with DecodeBar(progress, total, f"decoding {total} images, shorter side <= {side}px ({directory})") as bar, \
            open(directory / pixels_file, "wb") as out:
        for items in decoder:
            for i, array, problem in items:
                if array is not None:  # images are written densely, in source order
                    out.write(array.tobytes())
                    index[count] = (i, targets[i], offset, array.shape[0], array.shape[1])
                    offset, count = offset + array.size, count + 1
                elif fail:  # raised here, not in a worker: one line, whatever num_workers
                    raise DataError(problem[1])
                else:
                    skipped_files.append(problem[0])
                    if len(skipped_files) <= _SKIP_LINES:  # the rest are counted below
                        bar.print(problem[0])
            bar.advance(len(items))
    if count == 0:
        raise DataError(f"none of the {total} images could be read ({skipped_files[0]}); check the data folder")
    np.save(directory / index_file, index[:count])
    manifest = dict(version=CACHE_VERSION, fingerprint=fingerprint, shorter_side=side, layout="HWC uint8, flat",
                    count=count, source_count=total, skipped=total - count, pixel_bytes=offset,
                    bytes_per_image=round((offset + index[:count].nbytes) / count),
                    median_sides=[int(v) for v in np.median(np.sort(index[:count, 3:5], axis=1), axis=0)],
                    classes=list(getattr(images, "classes", [])), pixels_file=pixels_file, index_file=index_file,
                    build_seconds=round(time.perf_counter() - started, 1), skipped_files=skipped_files)
    commit_manifest(directory, stem, manifest, keep=(pixels_file, index_file))  # the switch, then old builds go
    if skipped_files:
        bar.print(f"{len(skipped_files)} of {total} images skipped as unreadable while caching "
                  f"(listed under skipped_files in {directory / stem}.json)")
    return manifest
