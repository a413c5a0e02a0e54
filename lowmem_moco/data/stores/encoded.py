"""A data set kept as its files' encoded bytes in one packed file; batches are decoded when used.

    cache = EncodedCache.open_or_build(data.train, Path(root) / ".lowmem_moco_cache", image_size=224)
    cache.batch([5, 17, 3])               # RaggedImages decoded on the CPU (decode_jpeg)
    cache.loader(batch_sampler, 2, pin_memory=True)  # (EncodedImages, targets, seeds): decoded on the GPU

For data that do not fit decoded (decoded.py stores about H x W x 3 bytes per image; a JPEG
is 5 to 15 times smaller). Files in the cache folder, per split `name`:

    <name>-<side>px-encoded.json                manifest (written last: the switch), counts, policy
    <name>-<side>px-encoded.<build>.bytes       every image's encoded bytes, one after another
    <name>-<side>px-encoded.<build>.index.npy   int64 (count, 7): source index, label, offset,
                                                length, height, width, is-JPEG

What is stored, and why:
- A JPEG whose shorter side is at most SHRINK_ABOVE (2) x the decoded cache's side
  (sides.shorter_side(S, min crop scale)) is kept byte for byte: no loss, and decoding it costs
  at most 4x the pixels a decoded-cache image holds.
- A larger JPEG (a 12-megapixel photo for 224-px crops) is shrunk as the decoded cache shrinks
  it (sides.fit_shorter_side) and re-encoded as JPEG quality REENCODE_QUALITY (95). Decoding
  such a photo every epoch would cost 10 to 40 times the pixels any crop can use; quality 95
  changes pixels by a few levels at most, far below the colour jitter every view gets. The
  manifest's `reencoded` counts them and the build says so in one line.
- Other formats (PNG, WebP, BMP, 16-bit, ...) keep their bytes (shrunk ones are stored as
  lossless PNG) and are decoded with encoded_images.PIL_FALLBACK, logged once per build as
  "N of M files are not JPEG". Sets without files (in-memory arrays) are stored as PNG.
Every file is decoded once while building, so a corrupt or truncated one is found then:
skipped and named (data.on_bad_image=skip), or a DataError naming it (error).
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ...errors import DataError
from ...progress import DecodeBar
from .sides import fit_shorter_side
from .packed import PackedEntry, commit_manifest, estimated_total, new_build_id, start_build
from .encoded_images import PIL_FALLBACK, EncodedImages, is_jpeg, pil_rgb
from .encoded_store import EncodedStore, positions_of, source_bytes
from ..sources.decoding import UnreadableImageError, unreadable_reason
from ..loader import make_loader

log = logging.getLogger(__name__)

ENCODED_VERSION = 1
SHRINK_ABOVE = 2  # images with a shorter side above SHRINK_ABOVE x the cache side are shrunk to it
REENCODE_QUALITY = 95
_SHOWN = 5  # unreadable files named in the build's closing line (the manifest lists up to 1000)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": REENCODE_QUALITY} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def encode_record(images, i: int, side: int) -> tuple[bytes, int, int, str]:
    """(bytes to store, height, width, what was done) for image i; raises if it cannot be decoded."""
    data, _ = source_bytes(images, i)
    if is_jpeg(data):
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)  # (3, H, W)
        how = "jpeg"
    else:
        pixels, how = pil_rgb(data), "not_jpeg"
    height, width = pixels.shape[1:]
    if min(height, width) <= SHRINK_ABOVE * side:
        return data, height, width, how
    small = fit_shorter_side(Image.fromarray(pixels.permute(1, 2, 0).numpy()), side)  # (h, w, 3)
    fmt = "JPEG" if how == "jpeg" else "PNG"
    return _encode(small, fmt), small.shape[0], small.shape[1], "reencoded" if how == "jpeg" else how


def estimated_encoded_bytes(images, side: int) -> int:
    """Bytes of the whole encoded cache, from a few files spread through the set (headers only)."""
    def stored_bytes(i: int) -> float:
        data, _ = source_bytes(images, i)
        with Image.open(io.BytesIO(data)) as image:
            shorter = min(image.size)
        # A shrunk image's bytes scale about with its pixels.
        return len(data) * (min(1.0, side / shorter) ** 2 if shorter > SHRINK_ABOVE * side else 1.0)
    return estimated_total(images, stored_bytes)


class _Encode(torch.utils.data.Dataset):
    """Index -> (index, record or None, why not), for encoding in DataLoader workers."""

    def __init__(self, images, side: int, fail: bool):
        self.images, self.side, self.fail = images, side, fail

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, encode_record(self.images, i, self.side), None
        except Exception as err:  # decoders raise RuntimeError, OSError, SyntaxError, ValueError, ...
            path_of = getattr(self.images, "path", None)
            name = path_of(i) if callable(path_of) else f"image {i} of the data set"
            if self.fail:
                raise UnreadableImageError(name, unreadable_reason(err, name)) from None
            return i, None, (name, unreadable_reason(err, name)[:200])


class EncodedCache(PackedEntry, EncodedStore):
    """The encoded copy of a LabelledImages set: each image's file bytes, labels and source indices."""

    version, data_key, size_key, stem_suffix = ENCODED_VERSION, "bytes_file", "data_bytes", "-encoded"

    @staticmethod
    def build(*args) -> dict:
        return _build(*args)

    @staticmethod
    def entry_options(on_bad_image: str) -> dict:
        return {"on_bad_image": on_bad_image}

    def __init__(self, directory: str | Path, manifest: dict, on_bad_image: str = "skip"):
        super().__init__(directory, manifest)
        self.on_bad_image = on_bad_image
        self.offsets, self.lengths = self.index[:, 2], self.index[:, 3]  # (count,), (count,)
        self.shapes, self.jpeg = self.index[:, 4:6], self.index[:, 6].astype(bool)  # (count, 2) height, width; (count,)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"{type(self).__name__}({len(self)} images, {m['bytes_per_image']} bytes per image, "
                f"{m['not_jpeg']} not JPEG, {m['reencoded']} re-encoded, {self.skipped} skipped, "
                f"{self.directory / m['bytes_file']})")

    def encoded(self, positions: Iterable[int]) -> EncodedImages:
        """The given rows, still encoded (one gathered copy of their bytes)."""
        rows = positions_of(positions)
        chunks = [self.mapped[self.offsets[r]:self.offsets[r] + self.lengths[r]].tobytes() for r in rows]
        return EncodedImages.from_bytes(chunks, None, self.on_bad_image)


# ---------------------------------------------------------------------- the build


def _build(images, directory: Path, stem: str, fingerprint: str, side: int, fail: bool,
           num_workers: Optional[int], progress: bool) -> dict:
    started, build = time.perf_counter(), new_build_id()
    bytes_file, index_file = f"{stem}.{build}.bytes", f"{stem}.{build}.index.npy"
    total = len(images)
    num_workers = start_build(images, directory, estimated_encoded_bytes(images, side), "encoded",
                              "choose another data.cache_dir, or set data.cache=none", num_workers, 500)
    index = np.empty((total, 7), dtype=np.int64)
    targets = np.asarray(images.targets, dtype=np.int64)
    encoder = make_loader(_Encode(images, side, fail), workers=num_workers, ragged=True, batch_size=32)
    count = offset = 0
    done, bad = Counter(), []
    with DecodeBar(progress, total, f"checking and packing {total} encoded images ({directory})") as bar, \
            open(directory / bytes_file, "wb") as out:
        for items in encoder:
            for i, record, why in items:
                if record is None:
                    bad.append(why)
                    continue
                data, height, width, how = record
                out.write(data)
                index[count] = (i, targets[i], offset, len(data), height, width, how != "not_jpeg")
                offset, count, done[how] = offset + len(data), count + 1, done[how] + 1
            bar.advance(len(items))
    if count == 0:
        raise DataError(f"none of the {total} images could be read (e.g. {bad[0][0]}: {bad[0][1]}); "
                        f"check the data folder")
    np.save(directory / index_file, index[:count])
    manifest = dict(version=ENCODED_VERSION, fingerprint=fingerprint, shorter_side=side, layout="encoded bytes, flat",
                    count=count, source_count=total, skipped=len(bad), data_bytes=offset,
                    bytes_per_image=round((offset + index[:count].nbytes) / count),
                    from_files=callable(getattr(images, "path", None)), not_jpeg=done["not_jpeg"],
                    fallback=PIL_FALLBACK, reencoded=done["reencoded"],
                    reencode=f"JPEG quality {REENCODE_QUALITY}, shorter side {side}px, when above "
                             f"{SHRINK_ABOVE * side}px",
                    median_sides=[int(v) for v in np.median(np.sort(index[:count, 4:6], axis=1), axis=0)],
                    classes=list(getattr(images, "classes", [])), skipped_files=[list(b) for b in bad[:1000]],
                    bytes_file=bytes_file, index_file=index_file, build_seconds=round(time.perf_counter() - started, 1))
    commit_manifest(directory, stem, manifest, keep=(bytes_file, index_file))
    _report(manifest, bar)
    return manifest


def _report(m: dict, bar: DecodeBar) -> None:
    """The build's closing lines: unreadable files by path with their count, the fallback, re-encoding."""
    if m["skipped"]:
        shown = "; ".join(f"{path} ({why})" for path, why in m["skipped_files"][:_SHOWN])
        more = f"; and {m['skipped'] - _SHOWN} more (listed in the cache manifest)" if m["skipped"] > _SHOWN else ""
        log.warning("%d of %d files could not be read and were skipped: %s%s", m["skipped"], m["source_count"],
                    shown, more)
    if m["not_jpeg"] and m["from_files"]:
        log.warning("%d of %d files are not JPEG: decoded with %s", m["not_jpeg"], m["count"], m["fallback"])
    elif m["not_jpeg"]:  # an in-memory set: stored as lossless PNG, which is not news to warn about
        bar.print(f"{m['count']} images without files stored as PNG, decoded with {m['fallback']}")
    if m["reencoded"]:
        bar.print(f"{m['reencoded']} of {m['count']} images were large JPEGs, re-encoded smaller ({m['reencode']})")
