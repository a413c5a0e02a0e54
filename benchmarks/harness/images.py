"""The images benchmarks measure on, made once and kept under WORK_DIR.

- CIFAR-10 JPEGs: a class-balanced subset of CIFAR10_TARBALL (data/cifar10-train-jpeg.tar.gz in
  the checkout, git-ignored; the tests and the GPU command read it too);
- photo-sized mosaics of them: 500x375 / 375x500 (`composed_photos`), 640x512 / 512x640
  (`large_photos`), real photo content at the sizes and aspect ratios of ImageNet's photos;
- smooth random photos of 1280x1024 / 1024x1280 (`smooth_photos`), for the high-resolution figures.
"""

from __future__ import annotations

import math
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .results import REPO_ROOT

# The real images of the tests and the GPU command: one copy in the checkout (data/ is git-ignored).
CIFAR10_TARBALL = REPO_ROOT / "data" / "cifar10-train-jpeg.tar.gz"
WORK_DIR = Path(tempfile.gettempdir()) / "lowmem_moco_bench"


def cifar_subset(count: int, work_dir: Path, tarball: Path = CIFAR10_TARBALL) -> Path:
    """A class-balanced subset of the CIFAR-10 JPEGs, extracted once: <dir>/train/<class>/NNNN.jpg."""
    root = work_dir / f"cifar10-{count}" / "train"
    done = root.parent / ".complete"
    if done.exists():
        return root
    if not tarball.exists():
        raise FileNotFoundError(f"{tarball} not found; pass --tarball PATH to the CIFAR-10 JPEG archive")
    per_class, taken = math.ceil(count / 10), {}
    with tarfile.open(tarball) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            if taken.get(parts[1], 0) < per_class:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                target = root / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    done.touch()
    return root


def composed_photos(source: Path, count: int, tile_px: int = 125, grid: tuple[int, int] = (4, 3)) -> Path:
    """`count` photo-sized JPEGs, alternately landscape and portrait, saved once beside the source.

    Each is a 4x3 (or 3x4; `grid`) mosaic of consecutive CIFAR-10 JPEGs, each tile upscaled to
    125 px (`tile_px`, bicubic): by default 500x375 and 375x500, real photo content at the size and
    aspect ratios of ImageNet's typical images.
    """
    shape = "" if (tile_px, grid) == (125, (4, 3)) else f"-{tile_px * grid[0]}x{tile_px * grid[1]}"
    root = source.parent.parent / f"{source.parent.name}-photos{count}{shape}" / "train"
    done = root.parent / ".complete"
    if done.exists():
        return root
    tiles = sorted(source.glob("*/*.jpg"))
    per_photo = grid[0] * grid[1]
    for i in range(count):
        columns, rows = grid if i % 2 == 0 else grid[::-1]
        photo = Image.new("RGB", (tile_px * columns, tile_px * rows))
        for t in range(per_photo):
            with Image.open(tiles[(i * per_photo + t) % len(tiles)]) as tile:
                photo.paste(tile.convert("RGB").resize((tile_px, tile_px), Image.BICUBIC),
                            (tile_px * (t % columns), tile_px * (t // columns)))
        target = root / tiles[i % len(tiles)].parent.name / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        photo.save(target, quality=90)
    done.touch()
    return root


def data_for(image_size: int, count: int, work_dir: Path, tarball: Path = CIFAR10_TARBALL) -> Path:
    """CIFAR-10 JPEGs at 32 px and below; photo-sized mosaics of them (500x375, 375x500) above."""
    if image_size <= 32:
        return cifar_subset(count, work_dir, tarball)
    return composed_photos(cifar_subset(max(count, 5000), work_dir, tarball), count)


def large_photos(count: int, work_dir: Path, tarball: Path = CIFAR10_TARBALL) -> Path:
    """`count` JPEGs of 640x512 and 512x640 (5x4 mosaics of 128-px tiles), made once under work_dir."""
    return composed_photos(cifar_subset(max(count * 20 // 12, 5000), work_dir, tarball), count, 128, (5, 4))


def smooth_photos(count: int, block: int = 16, seed: int = 0) -> list[np.ndarray]:
    """`count` uint8 HxWx3 photos, 1024x1280 and 1280x1024 in turn: random colours in blocks of
    `block` px (smooth, so that JPEG files of them stay photo-sized)."""
    rng = np.random.default_rng(seed)
    shapes = [(1024, 1280) if i % 2 == 0 else (1280, 1024) for i in range(count)]
    return [np.repeat(np.repeat(rng.integers(0, 256, (h // block, w // block, 3), dtype=np.uint8), block, axis=0),
                      block, axis=1) for h, w in shapes]


def write_jpegs(photos: list[np.ndarray], root: Path, classes: int = 2) -> Path:
    """The photos as root/train/class<i % classes>/NNNN.jpg; returns root."""
    for i, photo in enumerate(photos):
        path = root / "train" / f"class{i % classes}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(path, quality=90)
    return root
