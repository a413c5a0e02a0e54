"""Fit finder: the largest micro-batch, and the fastest configuration, under a memory budget.

For each candidate configuration (checkpointing off/on; on a GPU also channels_last off/on)
it measures, in a fresh process each, micro-batches that divide the effective batch (binary
search, since memory grows with the micro-batch), keeps the largest whose peak stays under
budget x (1 - margin), then times it. The fastest is printed as recipe overrides.

What "peak" means here is what runs out: on a GPU the allocator's reserved peak, with the
process capped at the budget so that a larger card behaves like the target one (an
out-of-memory error there is caught and counts as 'does not fit'); on a CPU the process's
peak RSS.
"""

from __future__ import annotations

from typing import Callable

import torch

from .cells import Cell
from .measure import run_cell
from .suite import _chunks


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """Largest candidate for which fits() holds, assuming fits() is monotone (True then False)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


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
        from .suite import default_precisions
        # The mixed precision a GPU runs fastest; fp32 on a CPU (not every CPU has fast bf16).
        precision = default_precisions(device)[-1] if device == "cuda" else "no"
    limit_mb = budget_gb * 1024 * (1 - margin)
    sizes = [m for m in range(2, batch + 1) if batch % m == 0]
    layouts = [False, True] if device == "cuda" else [False]
    probes: dict[Cell, dict] = {}

    def peak(cell: Cell) -> dict:
        if cell not in probes:
            probes[cell] = run_cell(cell, device, breakdown=False, threads=threads,
                                    memory_cap_gb=budget_gb if device == "cuda" else None)
        return probes[cell]

    def used_mb(r: dict) -> float:
        return r.get("reserved_mb") if device == "cuda" else r.get("rss_peak_mb")

    options = []
    for ckpt in (False, True):
        for cl in layouts:
            def cell(mb: int, timed: bool = False) -> Cell:
                return Cell("lowmem", arch, image_size, mb, batch, precision, ckpt, min(key_chunks, _chunks(batch)),
                            cl, max(queue_size, batch), small_image_stem, timed=timed)

            def fits(mb: int) -> bool:
                r = peak(cell(mb))
                ok = not r.get("error") and used_mb(r) <= limit_mb
                log(f"  micro-batch {mb:>4}: " + (r.get("error") or f"{used_mb(r):.0f} MB") +
                    (" fits" if ok else " does not fit"))
                return ok

            log(f"checkpointing {'on' if ckpt else 'off'}, channels_last {'on' if cl else 'off'}:")
            mb = largest_fitting(sizes, fits)
            if mb is None:
                continue
            timed = run_cell(cell(mb, timed=True), device, warmup, repeats, breakdown=False, threads=threads,
                             memory_cap_gb=budget_gb if device == "cuda" else None)
            options.append(dict(micro_batch=mb, checkpointing=ckpt, channels_last=cl, precision=precision,
                                key_chunks=min(key_chunks, _chunks(batch)), batch=batch,
                                used_mb=used_mb(probes[cell(mb)]), images_per_s=timed.get("images_per_s")))
            log(f"  -> micro-batch {mb}, {options[-1]['images_per_s'] or 0:.1f} images/s")
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
