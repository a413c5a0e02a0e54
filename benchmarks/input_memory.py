"""`python -m benchmarks input-memory`: the input views' share of one step's peak memory, with
views made for the whole batch before the step vs made lazily per key chunk and micro-batch.

    python -m benchmarks input-memory                               # 1024 px, batch 64, micro-batches 2,4,8
    python -m benchmarks input-memory --image-size 512 --micro-batches 4 --batch 32

One real training step on the CPU, built as training builds it (train.build_model,
train.build_step), fed the batched pipeline's way: source photos (uint8, 1280x1024 and
1024x1280) turned into views by BatchedMoCoV2, either both views of the whole batch before the
step (how the pipeline worked before lazy views) or data/lazy_views.BatchedView, which the step
calls per key chunk and micro-batch. torch's MemTracker (plan/memtrack.py) counts every tensor
from the views' augmentation to the enqueue; the views themselves are counted as inputs, the
source photos (host memory on a GPU) are left out. The planner's fake-tensor prediction for
the same step is printed beside it.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from lowmem_moco.config import Config, validate
from lowmem_moco.data.augment.batched import BatchedMoCoV2
from lowmem_moco.data.lazy_views import BatchedView
from lowmem_moco.data.stores.ragged import RaggedImages
from lowmem_moco.plan.memtrack import CountedAsInputs, peak_by_category, step_tracker
from lowmem_moco.plan.predict import PlannedStep
from lowmem_moco.factory import build_model, build_step

RESULTS = Path(__file__).resolve().parent / "results"
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
    rng = np.random.default_rng(seed)
    shapes = [(1024, 1280) if i % 2 == 0 else (1280, 1024) for i in range(n)]
    return RaggedImages.from_arrays([np.repeat(np.repeat(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8),
                                                         16, axis=0), 16, axis=1) for h, w in shapes])


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


def markdown(rows: list[dict], command: str) -> str:
    arch, kwargs = SMALL_BACKBONE
    lines = [f"# Input memory of one step: views of the whole batch vs lazy views, {datetime.date.today()}", "",
             f"`{command}` on this machine's CPU (measured: torch MemTracker over one real step, fp32, "
             f"{arch} with timm_kwargs {kwargs}, key chunks of the micro-batch's size, K 4096; views made by the batched "
             f"augmentation from 1280x1024 / 1024x1280 photos). 'planned' is the planner's fake-tensor "
             f"prediction of the same step (no augmentation scratch).", "",
             "| size | batch | micro-batch | views | peak MiB | inputs MiB | inputs share | planned MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_size']} | {r['batch']} | {r['micro_batch']} | {r['views']} | {r['peak_mib']:.1f} "
                     f"| {r['inputs_mib']:.1f} | {r['inputs_mib'] / r['peak_mib']:.0%} | {r['planned_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks input-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batches", default="2,4,8", help="comma-separated")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = run(args.image_size, args.batch, tuple(int(x) for x in args.micro_batches.split(",")))
    command = "python -m benchmarks input-memory " + " ".join(argv or [])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"input-memory-cpu-{datetime.date.today()}.md"
    path.write_text(markdown(rows, command.strip()))
    print(f"wrote {path}")
    return 0
