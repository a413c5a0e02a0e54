"""Two-view images/s of the input pipeline: per-image CPU workers vs decoded cache + batched views.

    python -m benchmarks.data_pipeline --image-size 32 --image-size 96

Data: real CIFAR-10 JPEGs (a class-balanced subset of data/cifar10-train-jpeg.tar.gz)
at 32 px; for larger sizes photo-sized JPEGs (alternately 500x375 and 375x500, each a
mosaic of 12 CIFAR-10 images upscaled to 125 px), so both paths decode real files of the
size and shapes of ImageNet's photos. Paths measured, same batches and count:

    per_image            DataLoader(TwoViews(FileImages, mocov2_transform(S))), N workers, keys
                         (index, sample_seed), as in training
    batched_cpu          DecodedCache slices (one reader worker) -> BatchedMoCoV2.two_views in
                         the main process, torch's CPU threads (and _1thread: one thread)
    batched_cpu_workers  the same cache slices and two_views, run inside N DataLoader workers
                         (one thread each: robust when the cores are shared)
    batched_cuda         cache slices -> pinned -> two_views on the GPU (when there is one)

`measure_pipeline(image_size, ...)` returns the figures as a dict for the benchmark suite.
"""

from __future__ import annotations

import argparse
import json
import math
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from lowmem_moco.data.augment.per_image import mocov2_transform
from lowmem_moco.data.augment.batched import BatchedMoCoV2
from lowmem_moco.data.stores.decoded import DecodedCache
from lowmem_moco.data.sources.images import FileImages
from lowmem_moco.data.two_views import TwoViews
from lowmem_moco.data.loader import make_loader

from .measure import CIFAR10_TARBALL as TARBALL
WORK_DIR = Path(tempfile.gettempdir()) / "lowmem_moco_bench"


# ---------------------------------------------------------------------- data


def folder_images(root: Path) -> FileImages:
    """The class-per-folder JPEGs under root, as the data module's file-backed set."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = [(str(p), c) for c, name in enumerate(classes) for p in sorted((root / name).glob("*.jpg"))]
    return FileImages([p for p, _ in pairs], [t for _, t in pairs], classes)


def cifar_subset(count: int, work_dir: Path, tarball: Path = TARBALL) -> Path:
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


def data_for(image_size: int, count: int, work_dir: Path, tarball: Path = TARBALL) -> Path:
    """CIFAR-10 JPEGs at 32 px and below; photo-sized mosaics of them (500x375, 375x500) above."""
    if image_size <= 32:
        return cifar_subset(count, work_dir, tarball)
    return composed_photos(cifar_subset(max(count, 5000), work_dir, tarball), count)


# ---------------------------------------------------------------------- timing


def images_per_second(batches, n_batches: int, batch: int, sync=lambda: None) -> float:
    """Two-view images/s over n_batches, after one untimed batch (worker start-up, caches)."""
    it = iter(batches)
    next(it)
    sync()
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    sync()
    return n_batches * batch / (time.perf_counter() - start)


def _keys(size: int, batch: int, n_batches: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """n_batches + 1 batches of (index, sample_seed), as the trainer's EpochBatches yields."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    order = (order * math.ceil(batch * (n_batches + 1) / size))[:batch * (n_batches + 1)]
    return [[(i, 1000 + b * batch + j) for j, i in enumerate(order[b * batch:(b + 1) * batch])]
            for b in range(n_batches + 1)]


class ViewsInWorker:
    """transform for CachedBatches: both views made inside a CPU DataLoader worker."""

    def __init__(self, image_size: int):
        self.augment = BatchedMoCoV2(image_size)

    def __call__(self, images, seeds):
        return self.augment.two_views(images, seeds)


def measure_pipeline(image_size: int, images: int = 5000, batch: int = 256, n_batches: Optional[int] = None,
                     workers: int = 2, work_dir: Path | str = WORK_DIR, tarball: Path | str = TARBALL,
                     devices: tuple[str, ...] = ("cpu", "cuda"), progress: bool = False) -> dict:
    """Two-view images/s of each path at `image_size` on the same data; see the module docstring."""
    work_dir, tarball = Path(work_dir), Path(tarball)
    n_batches = n_batches or 8
    root = data_for(image_size, images, work_dir, tarball)
    data = folder_images(root)
    keys = _keys(len(data), batch, n_batches)
    result = dict(image_size=image_size, images=len(data), source=str(root), batch=batch, batches=n_batches,
                  workers=workers, cpu_threads=torch.get_num_threads())

    views = TwoViews(data, mocov2_transform(image_size), "skip")  # the training loader's data set
    loader = make_loader(views, workers=workers, batch_sampler=keys)
    result["per_image"] = images_per_second(loader, n_batches, batch)

    started = time.perf_counter()
    cache = DecodedCache.open_or_build(data, work_dir / "cache", image_size, name=root.parent.name,
                                       progress=progress)
    result.update(cache_seconds=round(time.perf_counter() - started, 2), shorter_side=cache.shorter_side,
                  cache_bytes_per_image=cache.manifest["bytes_per_image"],
                  cache_median_sides=cache.manifest["median_sides"], cache_build_seconds=cache.manifest["build_seconds"])
    augment = BatchedMoCoV2(image_size)

    def on(device: torch.device):
        for images_u8, _, seeds in cache.loader(keys, num_workers=1, pin_memory=device.type == "cuda"):
            yield augment.two_views(images_u8.to(device, non_blocking=True), seeds)

    if "cpu" in devices:
        threads = torch.get_num_threads()
        result["batched_cpu"] = images_per_second(on(torch.device("cpu")), n_batches, batch)
        if threads > 1:  # several threads stall when other processes share the cores: show one too
            torch.set_num_threads(1)
            try:
                result["batched_cpu_1thread"] = images_per_second(on(torch.device("cpu")), n_batches, batch)
            finally:
                torch.set_num_threads(threads)
        in_workers = cache.loader(keys, num_workers=workers, transform=ViewsInWorker(image_size))
        result["batched_cpu_workers"] = images_per_second(in_workers, n_batches, batch)
    if "cuda" in devices and torch.cuda.is_available():
        device = torch.device("cuda")
        result["batched_cuda"] = images_per_second(on(device), n_batches, batch, lambda: torch.cuda.synchronize(device))
        result["cuda_device"] = torch.cuda.get_device_name(device)
    best = max(result.get(k, 0.0) for k in ("batched_cpu", "batched_cpu_1thread", "batched_cpu_workers"))
    result["cpu_speedup"] = round(best / result["per_image"], 2) if best else None
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, action="append", help="crop size; repeat for several (default 32)")
    parser.add_argument("--images", type=int, default=5000, help="CIFAR-10 images to extract and use")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per path (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (per-image and in-worker paths)")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="extracted images and the decoded cache")
    parser.add_argument("--tarball", type=Path, default=TARBALL)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    results = []
    for size in args.image_size or [32]:
        r = measure_pipeline(size, args.images, args.batch, args.batches, args.workers, args.work_dir, args.tarball,
                             progress=True)
        results.append(r)
        names = ("per_image", "batched_cpu", "batched_cpu_1thread", "batched_cpu_workers", "batched_cuda")
        cells = [f"{name} {r[name]:.0f}" for name in names if name in r]
        print(f"{size:>4} px | two-view img/s: {' | '.join(cells)} | best batched CPU / per-image: "
              f"{r['cpu_speedup']}x | {r['images']} images, cache: shorter side <= {r['shorter_side']} px, "
              f"median sides {r['cache_median_sides'][0]} and {r['cache_median_sides'][1]} px, "
              f"{r['cache_bytes_per_image']} bytes/image "
              f"(built in {r['cache_build_seconds']}s), {r['workers']} workers, {r['cpu_threads']} CPU threads")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
