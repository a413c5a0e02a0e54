"""Two-view images/s of the training input, built as training builds it.

Set beside a step's images/s, it tells whether data or compute limits training. Every path is
the trainer's own input, `lowmem_moco.data.pipeline.build_pipeline` from a `Config`, or the
loader of the image store that pipeline opened (`pipeline.cache`, as data.cache picks it) with
the views made inside its DataLoader workers:

    per_image            data.augment=per_image: PIL images augmented one by one in N workers
    batched_cpu          data.augment=batched, data.cache=decoded: views on the CPU in this
                         process, torch's threads (batched_cpu_1thread: one thread)
    batched_cpu_workers  the decoded cache's batches, both views made inside N workers
    batched_cuda         data.augment=batched, data.cache=decoded, views on the GPU
    decoded, encoded, none   data.cache=<that>: the store's batches read, decoded and turned into
                         views inside N workers (one thread each)
    encoded_decode       the encoded cache's batches decoded in N workers, no views (decoding's share)
    cuda_decoded, cuda_encoded   data.augment=batched with that cache, views on the GPU

`measure_paths` times a list of them on one image folder; `measure_section` a section of
`python -m benchmarks inputs` (SECTIONS: its images and paths); `measure_inputs` is the suite's data
input figure (per_image and batched, the modes `data.augment` offers). The first batch of a path
is never timed (worker start-up); a path that fails in `measure_inputs` reads 'not measured'.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_moco.config import Config, validate
from lowmem_moco.data.augment.batched import BatchedMoCoV2
from lowmem_moco.data.pipeline import EpochBatches, build_pipeline
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.engine.views import whole

from .images import CIFAR10_TARBALL, WORK_DIR, data_for, large_photos
from .machine import cpu_name


@dataclass(frozen=True)
class InputPath:
    augment: str  # data.augment
    cache: str = "auto"  # data.cache (batched)
    device: str = "cpu"  # where the views are made
    threads: int | None = None  # torch's CPU threads while timed (None: as they are)
    in_workers: str = ""  # "views": the store's loader makes the views in its workers; "decode": decodes only


PATHS = {
    "per_image": InputPath("per_image"),
    "batched_cpu": InputPath("batched", "decoded"),
    "batched_cpu_1thread": InputPath("batched", "decoded", threads=1),
    "batched_cpu_workers": InputPath("batched", "decoded", in_workers="views"),
    "batched_cuda": InputPath("batched", "decoded", "cuda"),
    "decoded": InputPath("batched", "decoded", in_workers="views"),
    "encoded": InputPath("batched", "encoded", in_workers="views"),
    "none": InputPath("batched", "none", in_workers="views"),
    "encoded_decode": InputPath("batched", "encoded", in_workers="decode"),
    "cuda_decoded": InputPath("batched", "decoded", "cuda"),
    "cuda_encoded": InputPath("batched", "encoded", "cuda"),
}


def input_config(image_size: int, augment: str, cache: str = "auto", batch: int = 64, workers: int | None = None,
                 source: str = "synthetic", root: str | Path | None = None, cache_dir: str | Path | None = None,
                 synthetic_size: int | None = None) -> Config:
    """The project's defaults with this input; all images train (no held-out split)."""
    cfg = Config()
    d = cfg.data
    d.source, d.image_size, d.augment, d.cache, d.download, d.val_fraction = source, image_size, augment, cache, False, 0.0
    d.cache_dir = str(cache_dir) if cache_dir else None
    if root:
        d.root = str(root)
    if synthetic_size:
        d.synthetic_size = synthetic_size
    if workers is not None:
        d.num_workers = workers
    cfg.train.batch_size = batch
    validate(cfg)  # an unknown mode stops here, with the config's own message
    return cfg


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


class ViewsInWorker:
    """transform of a store's loader: both views made inside a CPU DataLoader worker."""

    def __init__(self, cfg: Config):
        self.augment = BatchedMoCoV2(cfg.data.image_size, cfg.augment)

    def __call__(self, images, seeds):
        return self.augment.two_views(images, seeds)


def decoded_only(images, seeds):
    """transform of a store's loader: the decoded images, no views."""
    return images


def batches(pipeline, path: InputPath, cfg: Config):
    """The batches of one epoch of `pipeline` as `path` makes them."""
    if not path.in_workers:  # both views of each batch made in full, as the step makes them chunk by chunk
        return ((whole(view_q), whole(view_k)) for view_q, view_k, _ in pipeline.epoch(0, 0))
    keys = EpochBatches(len(pipeline), cfg.train.batch_size, cfg.train.seed, 0)
    transform = ViewsInWorker(cfg) if path.in_workers == "views" else decoded_only
    return pipeline.cache.loader(keys, cfg.data.workers, transform=transform)


def path_rate(pipeline, path: InputPath, cfg: Config, n_batches: int) -> float:
    device = torch.device(path.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    before = torch.get_num_threads()
    if path.threads:
        torch.set_num_threads(path.threads)
    try:
        return images_per_second(batches(pipeline, path, cfg), n_batches, cfg.train.batch_size, sync)
    finally:
        torch.set_num_threads(before)


def open_pipeline(cfg: Config, device: str) -> tuple[object, float]:
    """(the trainer's pipeline for cfg on device, seconds to set it up: a cache's build included)."""
    data = build_datasets(cfg.data)
    started = time.perf_counter()
    pipeline = build_pipeline(data.train, cfg, torch.device(device))
    return pipeline, time.perf_counter() - started


def store_figures(store, setup_s: float) -> dict:
    """A cache's size and build time, from its manifest."""
    m = getattr(store, "manifest", None)
    if not m:
        return dict(open_s=round(setup_s, 2))
    return dict(open_or_build_s=round(setup_s, 2), build_s=m["build_seconds"], bytes_per_image=m["bytes_per_image"],
                median_sides=m["median_sides"], reencoded=m.get("reencoded", 0), shorter_side=getattr(store, "shorter_side", None))


def measure_paths(root: Path, image_size: int, names: list[str], batch: int, n_batches: int, workers: int,
                  cache_dir: Path, rounds: int = 1) -> dict:
    """Two-view images/s of each named path (PATHS) on the images under root; paths on a GPU are
    left out without one. The paths take turns `rounds` times; the best round counts (others'
    load only slows). Also the size and build time of each cache opened (`<cache>_cache`)."""
    names = [n for n in names if PATHS[n].device == "cpu" or torch.cuda.is_available()]
    r = dict(image_size=image_size, batch=batch, workers=workers, rounds=rounds, source=str(root),
             cpu_threads=torch.get_num_threads())
    pipelines = {}
    for name in names:
        path = PATHS[name]
        key = (path.augment, path.cache, path.device)
        if key not in pipelines:
            cfg = input_config(image_size, path.augment, path.cache, batch, workers, "folder", root, cache_dir)
            pipelines[key] = (cfg, *open_pipeline(cfg, path.device))
            if path.augment == "batched":
                r[f"{path.cache}_cache"] = store_figures(pipelines[key][1].cache, pipelines[key][2])
    r["images"] = len(next(iter(pipelines.values()))[1]) if pipelines else 0
    r["batches"] = n_batches = min(n_batches, r["images"] // batch - 1)
    if n_batches < 1:
        raise ValueError(f"{r['images']} images are too few for two batches of {batch}")
    for _ in range(rounds):
        for name in names:
            path = PATHS[name]
            cfg, pipeline, _ = pipelines[(path.augment, path.cache, path.device)]
            r[name] = max(r.get(name, 0.0), path_rate(pipeline, path, cfg, n_batches))
    if torch.cuda.is_available():
        r["cuda_device"] = torch.cuda.get_device_name()
    return r


# section -> (its images: (image_size, count, work_dir, tarball) -> folder, its paths)
SECTIONS = {
    # CIFAR-10 JPEGs at 32 px and below, 500x375 / 375x500 mosaics of them above
    "pipeline": (data_for, ["per_image", "batched_cpu", "batched_cpu_1thread", "batched_cpu_workers", "batched_cuda"]),
    # 640x512 / 512x640 mosaics: every path decodes files with a shorter side of 512 px
    "caches": (lambda size, count, work_dir, tarball: large_photos(count, work_dir, tarball),
               ["per_image", "decoded", "encoded", "none", "encoded_decode", "cuda_decoded", "cuda_encoded"]),
}


def measure_section(section: str, image_size: int, images: int, batch: int, n_batches: int, workers: int = 2,
                    work_dir: Path | str = WORK_DIR, tarball: Path | str = CIFAR10_TARBALL, rounds: int = 1,
                    devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """A section's paths (those on `devices`, and per_image) at `image_size` on its images; see SECTIONS."""
    make_images, names = SECTIONS[section]
    work_dir = Path(work_dir)
    root = make_images(image_size, images, work_dir, Path(tarball))
    if torch.get_num_threads() == 1:  # the same as batched_cpu
        names = [n for n in names if n != "batched_cpu_1thread"]
    names = [n for n in names if n == "per_image" or PATHS[n].device in devices]  # per_image: the reference
    r = measure_paths(root, image_size, names, batch, n_batches, workers, work_dir / "cache" / root.parent.name,
                      rounds)
    best = max((r[n] for n in names if n in r and n != "per_image" and PATHS[n].device == "cpu"), default=None)
    return dict(r, section=section, cpu=cpu_name(), cpu_speedup=round(best / r["per_image"], 2) if best else None)


def measure_inputs(image_size: int, source: str = "synthetic", root: str | None = None, batch: int = 64,
                   n_batches: int = 8, num_workers: int | None = None, device: str = "cpu",
                   modes: tuple[str, ...] = ("per_image", "batched"), threads: int | None = None) -> list[dict]:
    """The suite's data input figure: one record per data.augment mode, a figure or the reason
    there is none."""
    out = []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # the batched mode augments in this process
    with tempfile.TemporaryDirectory(prefix="lowmem-moco-bench-cache-") as cache_dir:
        for mode in modes:
            record = dict(augment=mode, source=source if not root else "folder", image_size=image_size,
                          batch=batch, device=device)
            try:
                cfg = input_config(image_size, mode, batch=batch, workers=num_workers, source=record["source"],
                                   root=root, cache_dir=cache_dir, synthetic_size=batch * (n_batches + 2))
                pipeline, setup_s = open_pipeline(cfg, device)
                timed = min(n_batches, len(pipeline) // batch - 1)
                if timed < 1:
                    raise ValueError(f"{len(pipeline)} images are too few for two batches of {batch}")
                rate = path_rate(pipeline, InputPath(mode, device=device), cfg, timed)
                record.update(images_per_s=rate, setup_s=setup_s, images=len(pipeline),
                              num_workers=cfg.data.workers, timed_batches=timed)
            except Exception as err:  # a mode being written may fail; the rest of the report stands
                record.update(images_per_s=None, note=f"{type(err).__name__}: {err}")
            out.append(record)
    torch.set_num_threads(before)
    return out
