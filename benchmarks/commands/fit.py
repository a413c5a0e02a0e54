"""The largest micro-batch, and the fastest configuration, under a memory budget.

    python -m benchmarks fit --arch resnet50 --image-size 224 --budget-gb 15

For each candidate configuration (checkpointing off/on; on a GPU also channels_last off/on)
the planner (lowmem_moco/plan/predict.py) predicts the step's peak for the micro-batches that divide
the effective batch and keeps the largest that fits budget x (1 - margin); that one is then
measured (peak and throughput, in a fresh process, the GPU capped at the budget) and the
fastest that really fits is printed as recipe overrides. One search, the planner's: this
module only adds the measurement.
"""

from __future__ import annotations

import torch

from lowmem_moco.config import load_config
from lowmem_moco.plan.search import Planner, largest_fitting, micro_batch_candidates  # noqa: F401 (re-export)

from ..harness.cells import Cell
from ..harness.cli import parser, pick_device, step_options
from ..harness.measure import run_cell
from ..harness.suite import default_precisions, key_chunks_for


def default_budget_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("cannot read the available memory; pass --budget-gb")


def find_fit(arch: str, image_size: int, budget_gb: float, device: str, batch: int = 256,
             queue_size: int = 65536, key_chunks: int = 8, precision: str | None = None, margin: float = 0.1,
             small_image_stem: bool = False, repeats: int = 3, warmup: int = 1,
             threads: int | None = None, log=print) -> dict:
    if precision is None:
        # The mixed precision a GPU runs fastest; fp32 on a CPU (not every CPU has fast bf16).
        precision = default_precisions(device)[-1] if device == "cuda" else "no"
    limit_mb = budget_gb * 1024 * (1 - margin)
    chunks = min(key_chunks, key_chunks_for(batch))
    layouts = [False, True] if device == "cuda" else [False]

    def used_mb(r: dict) -> float:
        return r.get("reserved_mb") if device == "cuda" else r.get("rss_peak_mb")

    options = []
    for ckpt in (False, True):
        cfg = load_config(None, [f"model.arch={arch}", f"data.image_size={image_size}", f"train.batch_size={batch}",
                                 f"moco.queue_size={max(queue_size, batch)}", f"moco.key_chunks={chunks}",
                                 f"model.small_image_stem={small_image_stem}", f"train.grad_checkpointing={ckpt}"])
        planner = Planner(cfg, precision)
        mb = largest_fitting(micro_batch_candidates(batch),
                             lambda m: planner.predict(ckpt, m).peak_bytes <= limit_mb * 2**20)
        log(f"checkpointing {'on' if ckpt else 'off'}: planner -> micro-batch {mb} "
            f"({planner.predict(ckpt, mb).peak_bytes / 2**20:.0f} MB predicted)" if mb else
            f"checkpointing {'on' if ckpt else 'off'}: nothing fits (planner)")
        if mb is None:
            continue
        for cl in layouts:
            cell = Cell("lowmem", arch, image_size, mb, batch, precision, ckpt, chunks, cl, max(queue_size, batch),
                        small_image_stem, timed=True)
            r = run_cell(cell, device, warmup, repeats, breakdown=False, threads=threads,
                         memory_cap_gb=budget_gb if device == "cuda" else None)
            ok = not r.get("error") and used_mb(r) <= budget_gb * 1024
            log(f"  channels_last {'on' if cl else 'off'}: " + (r.get("error") or f"{used_mb(r):.0f} MB measured, "
                f"{r.get('images_per_s') or 0:.1f} images/s") + ("" if ok else " (does not fit)"))
            if ok:
                options.append(dict(micro_batch=mb, checkpointing=ckpt, channels_last=cl, precision=precision,
                                    key_chunks=chunks, batch=batch, used_mb=used_mb(r),
                                    predicted_mb=planner.predict(ckpt, mb).peak_bytes / 2**20,
                                    images_per_s=r.get("images_per_s")))
    best = max(options, key=lambda o: o["images_per_s"] or 0.0, default=None)
    return dict(arch=arch, image_size=image_size, budget_gb=budget_gb, margin=margin, device=device,
                limit_mb=limit_mb, options=options, best=best, overrides=overrides(best) if best else None)


def overrides(best: dict) -> str:
    return " ".join([
        f"train.batch_size={best['batch']}", f"train.micro_batch_size={best['micro_batch']}",
        f"moco.key_chunks={best['key_chunks']}", f"train.precision={best['precision']}",
        f"train.grad_checkpointing={str(best['checkpointing']).lower()}",
        f"train.channels_last={str(best['channels_last']).lower()}",
    ])


def main(argv: list[str]) -> int:
    fit = parser("fit", __doc__)
    fit.add_argument("--arch", default="resnet50")
    fit.add_argument("--image-size", type=int, default=224)
    fit.add_argument("--budget-gb", type=float, default=None, help="default: the GPU's memory (or free RAM)")
    fit.add_argument("--margin", type=float, default=0.1, help="safety margin kept free (fraction of the budget)")
    fit.add_argument("--batch", type=int, default=256, help="effective batch (train.batch_size)")
    fit.add_argument("--queue-size", type=int, default=65536)
    fit.add_argument("--key-chunks", type=int, default=8)
    fit.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None)
    fit.add_argument("--small-image-stem", action="store_true")
    step_options(fit)
    args = fit.parse_args(argv)
    device = pick_device(args.device)
    budget = args.budget_gb or default_budget_gb(device)
    print(f"fit: {args.arch} at {args.image_size} px on {device}, budget {budget:.1f} GB "
          f"(keeping {args.margin:.0%} free), effective batch {args.batch}")
    found = find_fit(args.arch, args.image_size, budget, device, args.batch, args.queue_size, args.key_chunks,
                     args.precision, args.margin, args.small_image_stem, args.repeats,
                     warmup=1 if args.warmup is None else args.warmup, threads=args.threads)
    if found["best"] is None:
        print(f"nothing fits: even micro-batch 2 exceeds {found['limit_mb']:.0f} MB; "
              f"try a smaller --image-size or model")
        return 1
    b = found["best"]
    print(f"fastest that fits: micro-batch {b['micro_batch']} ({b['used_mb']:.0f} MB, "
          f"{b['images_per_s'] or 0:.1f} images/s)")
    print(found["overrides"])
    return 0
