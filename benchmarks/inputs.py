"""Images per second that the training input alone delivers (two views per image).

Set beside a step's images/s, it tells whether data or compute limits training. It times the
trainer's own input, `lowmem_moco.data.pipeline.build_pipeline`, once per `data.augment` mode:

    per_image  PIL images augmented one by one in DataLoader workers
    batched    a decoded uint8 cache, each batch augmented in one pass on the device

The data comes from `data.source` (default `synthetic`) or an image folder. A mode that
fails is reported as 'not measured' with the reason, never as a failure of the suite. `benchmarks/data_pipeline.py` compares these paths in more detail, on
real CIFAR-10 JPEG files.
"""

from __future__ import annotations

import tempfile
import time

import torch

from lowmem_moco.config import Config, validate
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.data.pipeline import build_pipeline
from lowmem_moco.engine.views import whole

from .data_pipeline import images_per_second


def _measure(mode: str, image_size: int, source: str, root: str | None, batch: int, n_batches: int,
             num_workers: int | None, device: torch.device, cache_dir: str) -> dict:
    cfg = Config()
    d = cfg.data
    d.source, d.image_size, d.augment, d.download, d.cache_dir = source, image_size, mode, False, cache_dir
    d.synthetic_size = batch * (n_batches + 2)  # only what the timed batches need
    if root:
        d.root = root
    if num_workers is not None:
        d.num_workers = num_workers
    cfg.train.batch_size = batch
    validate(cfg)  # an unknown mode stops here, with the config's own message
    data = build_datasets(d)
    started = time.perf_counter()
    pipeline = build_pipeline(data.train, cfg, device)  # the batched mode builds its cache here
    setup_s = time.perf_counter() - started
    n_batches = min(n_batches, len(pipeline) // batch - 1)
    if n_batches < 1:
        raise ValueError(f"{len(pipeline)} images are too few for two batches of {batch}")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # Both views of each batch made in full, as the step would make them chunk by chunk.
    views = ((whole(view_q), whole(view_k)) for view_q, view_k, _ in pipeline.epoch(0, 0))
    return dict(images_per_s=images_per_second(views, n_batches, batch, sync), setup_s=setup_s,
                images=len(pipeline), num_workers=d.workers, timed_batches=n_batches)


def measure_inputs(image_size: int, source: str = "synthetic", root: str | None = None, batch: int = 64,
                   n_batches: int = 8, num_workers: int | None = None, device: str = "cpu",
                   modes: tuple[str, ...] = ("per_image", "batched"), threads: int | None = None) -> list[dict]:
    out = []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # the batched mode augments in this process
    with tempfile.TemporaryDirectory(prefix="lowmem-moco-bench-cache-") as cache_dir:
        for mode in modes:
            record = dict(augment=mode, source=source if not root else "folder", image_size=image_size,
                          batch=batch, device=device)
            try:
                record.update(_measure(mode, image_size, source, root, batch, n_batches, num_workers,
                                       torch.device(device), cache_dir))
            except Exception as err:  # a mode being written may fail; the rest of the report stands
                record.update(images_per_s=None, note=f"{type(err).__name__}: {err}")
            out.append(record)
    torch.set_num_threads(before)
    return out
