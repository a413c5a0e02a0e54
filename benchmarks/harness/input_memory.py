"""The input views' share of one step's peak memory, with views made for the whole batch before
the step vs made lazily per key chunk and micro-batch (`python -m benchmarks inputs memory`).

One real training step on the CPU, built as training builds it (lowmem_moco.factory.build_model,
build_step), fed the batched pipeline's way: source photos (uint8, 1280x1024 and
1024x1280) turned into views by BatchedMoCoV2, either both views of the whole batch before the
step (how the pipeline worked before lazy views) or data/lazy_views.BatchedView, which the step
calls per key chunk and micro-batch. torch's MemTracker (plan/memtrack.py) counts every tensor
from the views' augmentation to the enqueue; the views themselves are counted as inputs, the
source photos (host memory on a GPU) are left out. The planner's fake-tensor prediction for
the same step is printed beside it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from lowmem_moco.config import Config, validate
from lowmem_moco.data.augment.batched import BatchedMoCoV2
from lowmem_moco.data.lazy_views import BatchedView
from lowmem_moco.data.stores.ragged import RaggedImages
from lowmem_moco.plan.memtrack import CountedAsInputs, peak_by_category, step_tracker
from lowmem_moco.plan.predict import PlannedStep
from lowmem_moco.factory import build_model, build_step

from .images import smooth_photos

MiB = 2**20
SMALL_BACKBONE = ("resnet18", {"channels": [8, 16, 32, 64]})  # ResNet-18 at 1/8 of its width


def step_config(image_size: int, batch: int, micro_batch: int) -> Config:
    """Key chunks as large as the micro-batch, as with one GPU per micro-batch in the 8-GPU recipe."""
    key_chunks = batch // micro_batch
    cfg = Config()
    cfg.model.arch, cfg.model.timm_kwargs = SMALL_BACKBONE
    cfg.data.image_size, cfg.data.augment = image_size, "batched"
    cfg.train.batch_size, cfg.train.micro_batch_size = batch, micro_batch
    cfg.moco.key_chunks, cfg.moco.queue_size = key_chunks, 4096
    validate(cfg)
    return cfg


def photos(n: int, seed: int = 0) -> RaggedImages:
    """n smooth random photos, landscape (1024x1280) and portrait (1280x1024) in turn."""
    return RaggedImages.from_arrays(smooth_photos(n, 16, seed))


def measured_peak(cfg: Config, lazy: bool, source: RaggedImages) -> dict:
    """MiB by category at the peak of one real CPU step, views included."""
    torch.manual_seed(0)
    moco = build_model(cfg, torch.device("cpu"))
    step = build_step(cfg, moco, Accelerator(cpu=True))
    augment, seeds = BatchedMoCoV2(cfg.data.image_size, cfg.augment), torch.arange(len(source)) + 1000
    tracker = step_tracker(lean=True)
    # The source photos stay in host memory on a GPU; counted (as inputs) here, then taken out.
    tracker.track_external(moco, step.optimizer.optimizer, source.pixels)
    with tracker:
        if lazy:
            view_q, view_k = (CountedAsInputs(BatchedView(source, seeds, augment, number, torch.device("cpu")), tracker)
                              for number in (0, 1))
        else:
            view_q, view_k = augment.two_views(source, seeds)  # Bx3xSxS each, before the step
            tracker.track_external(view_q, view_k)
        step(view_q, view_k, cfg.moco.momentum, torch.Generator().manual_seed(1))
        del view_q, view_k
    peak = peak_by_category(tracker, "cpu")
    for key in ("inputs", "total"):
        peak[key] -= source.pixels.untyped_storage().nbytes()
    return {k: v / MiB for k, v in peak.items()}


def run(image_size: int = 1024, batch: int = 64, micro_batches=(2, 4, 8), log=print) -> list[dict]:
    source = photos(batch)
    rows = []
    for mb in micro_batches:
        cfg = step_config(image_size, batch, mb)
        for lazy in (False, True):
            peak = measured_peak(cfg, lazy, source)
            planned = PlannedStep(cfg, "no", False).predict(mb, whole_batch_views=not lazy)
            row = dict(image_size=image_size, batch=batch, micro_batch=mb, views="lazy" if lazy else "whole batch",
                       peak_mib=peak["total"], inputs_mib=peak.get("inputs", 0.0),
                       planned_mib=planned.peak_bytes / MiB)
            rows.append(row)
            log(f"{image_size} px, batch {batch}, micro-batch {mb:>2}, {row['views']:>11} views: peak "
                f"{row['peak_mib']:8.1f} MiB, inputs {row['inputs_mib']:7.1f} MiB "
                f"({row['inputs_mib'] / row['peak_mib']:.0%}), planned {row['planned_mib']:8.1f} MiB")
    return rows
