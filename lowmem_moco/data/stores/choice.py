"""Where the batched path's images come from: `data.cache: auto|decoded|encoded|none`.

    store = open_image_store(images, cfg, folder, progress=True)  # DecodedCache | EncodedCache | SourceFiles

- decoded: decoded.DecodedCache, pixels memory-mapped; the fastest, and the largest (H x W x 3 bytes
  an image: about 80 GB for ImageNet at 128 px). Its random reads stay fast only while the page
  cache can hold it, so it must fit in RAM, not merely on disk.
- encoded: encoded.EncodedCache, the files' bytes packed in one file, decoded per batch.
- none: encoded_store.SourceFiles, no cache file: each batch's files read from the source.

`auto` applies `choose_cache` (a pure function, unit-tested) to the predicted sizes, the RAM
available (MemAvailable) and the free disk of the cache folder; a decoded cache that is
already built and current is simply used. The choice and its reason are one line at start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .decoded import DecodedCache, estimated_bytes
from .sides import shorter_side
from .encoded import EncodedCache, estimated_encoded_bytes
from .encoded_store import SourceFiles
from .fingerprint import source_fingerprint
from ..sources.images import warn_small_images

log = logging.getLogger(__name__)

RAM_SHARE = 0.5  # the decoded cache may take at most this share of the RAM available
DISK_MARGIN = 2 * 2**30  # bytes left free on the cache's disk by any cache


@dataclass(frozen=True)
class CacheChoice:
    mode: str  # decoded | encoded | none
    reason: str


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def choose_cache(decoded_bytes: int, encoded_bytes: int, ram_available: int, disk_free: int) -> CacheChoice:
    """decoded when it takes at most RAM_SHARE of the available RAM and fits the disk less
    DISK_MARGIN; else encoded when that fits the disk less DISK_MARGIN; else none."""
    room = disk_free - DISK_MARGIN
    in_ram, on_disk = decoded_bytes <= RAM_SHARE * ram_available, decoded_bytes <= room
    if in_ram and on_disk:
        return CacheChoice("decoded", f"decoded cache would take {_gib(decoded_bytes)}, at most half of the "
                                      f"{_gib(ram_available)} RAM available, and fits the {_gib(disk_free)} free disk")
    why = (f"decoded cache would take {_gib(decoded_bytes)}, more than half of the {_gib(ram_available)} RAM available"
           if not in_ram else f"decoded cache would take {_gib(decoded_bytes)}, more than the {_gib(disk_free)} free "
                              f"disk less {_gib(DISK_MARGIN)}")
    if encoded_bytes <= room:
        return CacheChoice("encoded", f"{why}; the encoded one about {_gib(encoded_bytes)}")
    return CacheChoice("none", f"{why}, and the encoded one (about {_gib(encoded_bytes)}) more than the "
                               f"{_gib(disk_free)} free disk less {_gib(DISK_MARGIN)}: files are read each batch")


def available_ram() -> int:
    """Bytes of RAM available to a new allocation without swapping (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(folder: Path) -> int:
    """Free bytes on the disk holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def pick_cache(images, cfg, folder: Path, name: str, fingerprint: str | None = None) -> CacheChoice:
    """`cfg.data.cache`, with auto resolved for these images and this machine (`fingerprint`:
    the images' source_fingerprint, when already computed)."""
    mode = cfg.data.cache
    if mode != "auto":
        return CacheChoice(mode, "set in the config")
    side = shorter_side(cfg.data.image_size, cfg.augment.crop_scale[0])
    # A cache already built for these images is used as it is: a resumed run keeps its pixels,
    # whatever the RAM and disk now (the cache itself took some of that disk).
    fingerprint = fingerprint or source_fingerprint(images)
    for mode, store in (("decoded", DecodedCache), ("encoded", EncodedCache)):
        built = store.open(folder, store.stem(name, side), fingerprint, side)
        if built is not None:
            return CacheChoice(mode, f"a current {mode} cache is already built ({built.directory})")
    return choose_cache(estimated_bytes(images, side), estimated_encoded_bytes(images, side), available_ram(),
                        free_disk(folder))


def open_image_store(images, cfg, folder: Path, name: str, progress: bool = True):
    """The batched path's store of `images` as data.cache says (auto: see choose_cache)."""
    d = cfg.data
    # Listing a large folder's files takes a while: the choice and the cache share one fingerprint.
    fingerprint = source_fingerprint(images) if d.cache != "none" else None
    choice = pick_cache(images, cfg, Path(folder), name, fingerprint)
    line = f"data.cache={d.cache} -> {choice.mode}: {choice.reason}"
    log.info(line)
    if progress:
        Console(highlight=False, soft_wrap=True).print(line)
    if choice.mode == "none":
        if progress:  # no cache to read the sizes from: the files' headers
            warn_small_images(images, d.image_size)
        return SourceFiles(images, d.on_bad_image)
    store = DecodedCache if choice.mode == "decoded" else EncodedCache
    return store.open_or_build(images, folder, d.image_size, name=name, min_crop_scale=cfg.augment.crop_scale[0],
                               on_bad_image=d.on_bad_image, progress=progress, fingerprint=fingerprint)
