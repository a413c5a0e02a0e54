"""The grids, the run over them, and the figures derived across cells.

    report = run_suite(quick_grid(), RESULTS)  # benchmarks.harness.results.RESULTS
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch

from . import report as reports
from . import targets
from .cells import Cell
from .machine import environment
from .measure import run_cell, time_together
from .results import RESULTS


# ---------------------------------------------------------------- grids


def key_chunks_for(batch: int, wanted: int = 8) -> int:
    return max(1, min(wanted, batch // 2))  # at least 2 keys per chunk for BatchNorm


def quick_grid() -> list[Cell]:
    """The CPU grid: every cell the CPU targets need, a second micro-batch for the slopes and
    a bf16 cell. Sized for < 10 minutes on 2 cores, one thread per cell."""
    base = dict(arch="resnet18", image_size=128, queue_size=4096)
    return [
        # the target cells: micro-batch 128, K 4096, fp32, 8 key chunks; timed together with
        # timm's supervised step at the same batch (added by with_references)
        Cell("naive", micro_batch=128, **base),
        Cell("lowmem", micro_batch=128, checkpointing=True, **base),
        Cell("lowmem", micro_batch=128, checkpointing=False, **base),
        # memory only from here on (a CPU step of 128 images takes 10-20 s)
        Cell("lowmem", micro_batch=128, batch=256, checkpointing=True, timed=False, **base),
        # bf16 (native on CPUs with AVX512-BF16 or AMX); channels_last is left to the GPU grid
        Cell("lowmem", micro_batch=128, checkpointing=True, precision="bf16", timed=False, **base),
        # a second micro-batch for each slope, same effective batch
        Cell("naive", micro_batch=32, timed=False, **base),
        Cell("lowmem", micro_batch=32, batch=128, checkpointing=True, timed=False, **base),
        Cell("lowmem", micro_batch=32, batch=128, checkpointing=False, timed=False, **base),
    ]


def full_grid(arch: str, image_size: int, micro_batches: list[int], batch: int, queue_size: int,
              precisions: list[str], channels_last: list[bool], naive: bool = True) -> list[Cell]:
    """The grid for a GPU (or a patient CPU): micro-batch x precision x checkpointing x layout,
    the naive loop at each micro-batch, and key chunks fixed at 8 (the official 8-GPU split)."""
    cells = []
    for mb in micro_batches:
        B = max(batch, mb)
        if naive:
            cells.append(Cell("naive", arch, image_size, mb, queue_size=max(queue_size, mb)))
        for precision in precisions:
            for cl in channels_last:
                for ckpt in (False, True):
                    cells.append(Cell("lowmem", arch, image_size, mb, B, precision, ckpt, key_chunks_for(B), cl,
                                      max(queue_size, B)))
    return cells


def default_precisions(device: str) -> list[str]:
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability()
        return ["no", "bf16" if major >= 8 else "fp16"]  # bf16 is emulated (slow) below sm 8.0
    return ["no", "bf16"]  # fp16 autocast has no fast path on a CPU


def with_references(cells: list[Cell]) -> list[Cell]:
    """Adds timm's supervised step for every timed MoCo configuration (batch = micro-batch,
    same precision and layout, no checkpointing): the denominator of 'vs sup'."""
    have = {_ref_key(c) for c in cells if c.kind == "supervised"}
    out = list(cells)
    for c in cells:
        if c.kind == "lowmem" and c.timed and _ref_key(c) not in have:
            have.add(_ref_key(c))
            out.append(Cell("supervised", c.arch, c.image_size, c.micro_batch, precision=c.precision,
                            channels_last=c.channels_last))
    return out


def _ref_key(c: Cell | dict) -> tuple:
    g = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
    return g("arch"), g("image_size"), g("micro_batch"), g("precision"), g("channels_last")


# ---------------------------------------------------------------- derived figures


def derive(cells: list[dict]) -> None:
    """Adds the figures that need several cells: the slope of each configuration (least squares
    over its micro-batches, MB per extra image) and the fraction of the supervised step."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        if c.get("peak_mb") is not None:
            groups.setdefault(c["group"], []).append(c)
    for members in groups.values():
        xs = [c["micro_batch"] for c in members]
        if len(set(xs)) < 2:
            continue
        ys = [c["peak_mb"] for c in members]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        for c in members:
            c["slope_mb_per_image"] = slope
    refs = {_ref_key(c): c for c in cells if c["kind"] == "supervised" and c.get("images_per_s")}
    for c in cells:
        ref = refs.get(_ref_key(c))
        if c["kind"] == "lowmem" and c.get("images_per_s") and ref:
            c["vs_supervised"] = c["images_per_s"] / ref["images_per_s"]
            c["limit"] = targets.LIMIT_CKPT if c["checkpointing"] else targets.LIMIT_NO_CKPT
            c["vs_limit"] = c["vs_supervised"] / c["limit"]


def _record(cell: Cell, result: dict) -> dict:
    record = dict(label=cell.label, group=cell.group, **cell.to_dict(), **result)
    for name, mb in result.get("breakdown_mb", {}).items():
        record[f"{name}_mb"] = mb
    return record


# ---------------------------------------------------------------- the run


def run_suite(cells: list[Cell], out_dir: Path = RESULTS, device: str = "cpu", warmup: int = 1,
              repeats: int = 3, budget_gb: float | None = None, data_input: dict | None = None,
              command: str | None = None, stem: str | None = None, show: bool = True,
              threads: int | None = None, interleave: bool | None = None) -> dict:
    """Measures every cell in a fresh process, then writes and prints the reports.
    `interleave` (default: on a CPU) times comparable cells together in one more process."""
    from rich.console import Console

    console = Console(stderr=True)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]  # other work on the machine blurs the timings
    # On a CPU the timed cells that are compared with each other run interleaved in one
    # process after the memory pass; on a GPU (not shared) each cell is timed where it is measured.
    together = device == "cpu" if interleave is None else interleave
    records = []
    for i, cell in enumerate(cells, 1):
        console.print(f"[{i}/{len(cells)}] {cell.label} ...", end=" ")
        result = run_cell(cell, device, warmup, repeats, memory_cap_gb=budget_gb, threads=threads,
                          timed=cell.timed and not together)
        records.append(_record(cell, result))
        console.print(_summary(result))
    if together:
        groups: dict[tuple, list[int]] = {}
        for i, cell in enumerate(cells):
            if cell.timed and not records[i].get("error"):
                groups.setdefault(_ref_key(cell), []).append(i)
        for members in groups.values():
            console.print(f"timing together: {', '.join(cells[i].label for i in members)} ...", end=" ")
            timings = time_together([cells[i] for i in members], device, warmup, repeats, threads)
            for i, t in zip(members, timings):
                records[i].update(t)
            console.print(", ".join(f"{t['images_per_s']:.1f}" if t.get("images_per_s") else t.get("error", "?")
                                    for t in timings) + " img/s")
    derive(records)
    report = dict(suite="lowmem-moco benchmarks", command=command or " ".join(["python -m benchmarks", *sys.argv[1:]]),
                  created=datetime.datetime.now().isoformat(timespec="seconds"),
                  environment=dict(environment(device, threads), load_avg_at_start=load_at_start),
                  settings=dict(warmup=warmup, repeats=repeats, budget_gb=budget_gb), cells=records,
                  targets=targets.check(records, device), data_input=[], notes=[])
    if data_input is not None:
        from .inputs import measure_inputs
        report["data_input"] = measure_inputs(**data_input, threads=threads)
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        report["notes"].append(f"the machine was busy when the run started (1-minute load {load_at_start:.1f} on "
                               f"{os.cpu_count()} cores): timings may be low and noisy")
    if device == "cpu" and budget_gb:
        report["notes"].append("--budget-gb caps GPU memory only; on a CPU it is recorded, not enforced")
    report["wall_s"] = time.perf_counter() - started
    stem = stem or f"{socket.gethostname()}-{datetime.date.today().isoformat()}"
    report["files"] = {k: str(v) for k, v in reports.write(report, Path(out_dir), stem).items()}
    if show:
        reports.print_report(report)
        console.print(f"wrote {', '.join(report['files'].values())} in {report['wall_s']:.0f} s")
    return report


def _summary(r: dict) -> str:
    if r.get("error"):
        return f"[red]{r['error']}[/]"
    speed = f", {r['images_per_s']:.1f} img/s" if r.get("images_per_s") else ""
    return f"peak {r['peak_mb']:.0f} MB{speed} ({r['wall_s']:.0f} s)"
