"""Measuring cells: peak memory of one full step, then steady-state throughput.

Memory: every cell in a fresh Python process (`run_cell`), so that its peak RSS is its own and
an out-of-memory failure ends one cell, not the suite. There:
1. build the step; create the optimizer state with a zero-gradient step (`Workload.prime`)
2. one full step under the memory probe:
     CUDA: torch.cuda.max_memory_allocated / max_memory_reserved after reset_peak_memory_stats
           (and one more step under MemTracker for the categories)
     CPU:  PyTorch's MemTracker, peak tensor memory by category (the allocator's caching
           makes process RSS a blurred figure, so RSS is reported beside it, not instead)

Throughput: the first step of a workload is never timed; then `warmup` untimed steps and
`repeats` timed ones, device synchronised, median. `time_together` interleaves the steps of
several cells in one process (a CPU shared with other work slows them all alike).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from lowmem_moco.plan.memtrack import peak_by_category, step_tracker

from .cells import Cell, build
from .results import REPO_ROOT
from .syncs import count_syncs

MB = 2**20
RESULT_MARK = "BENCHMARK-CELL-RESULT "


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tracked_step(work, device: torch.device) -> tuple[float, dict]:
    """One step under MemTracker (lowmem_moco.plan.memtrack): (loss, peak MB by category, with 'total')."""
    tracker = step_tracker()
    tracker.track_external(*work.modules, work.optimizer, *work.inputs)
    with tracker:
        loss = work.step()
    return loss, {k: v / MB for k, v in peak_by_category(tracker, device.type).items()}


def step_memory(work, device: torch.device, breakdown: bool = True, rss_start: float | None = None) -> dict:
    """Peak memory of one full step of a built, primed workload (cells.Workload): on CUDA
    max_memory_allocated / max_memory_reserved, on a CPU MemTracker's peak by category."""
    rss_start = rss_mb() if rss_start is None else rss_start
    result: dict = {"device": str(device), "rss_import_mb": rss_start, "rss_base_mb": rss_mb()}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        result["loss"] = work.step()
        _sync(device)
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        result["reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
        inputs = sum(t.untyped_storage().nbytes() for t in work.inputs) / MB
        result["peak_no_input_mb"] = result["peak_mb"] - inputs
        if breakdown:  # the categories, from one more step (slower: every op goes through Python)
            _, result["breakdown_mb"] = _tracked_step(work, device)
    else:
        result["loss"], result["breakdown_mb"] = _tracked_step(work, device)
        result["peak_mb"] = result["breakdown_mb"]["total"]
        result["peak_no_input_mb"] = result["peak_mb"] - result["breakdown_mb"].get("inputs", 0.0)
    result["rss_peak_mb"] = peak_rss_mb()
    result["rss_growth_mb"] = result["rss_peak_mb"] - rss_start  # beyond Python + libraries
    return result


def interleaved_timings(batches: list[int], works: list, device: torch.device, warmup: int = 0,
                        repeats: int = 3) -> list[dict]:
    """Steps of all `works` (each of `batches` images) in turn (A B C, A B C, ...), so that a
    background load on the machine slows every one of them alike and their ratios stay fair."""
    for _ in range(warmup):
        for work in works:
            work.step()
    times = [[] for _ in works]
    for _ in range(repeats):
        for work, bucket in zip(works, times):
            _sync(device)
            start = time.perf_counter()
            work.step()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return [dict(step_s=statistics.median(t), step_s_all=t, images_per_s=b / statistics.median(t),
                 timed_with=len(works)) for b, t in zip(batches, times)]


def measure(memory: Cell | None, timed: list[Cell], device: torch.device, warmup: int = 1, repeats: int = 3,
            breakdown: bool = True, memory_cap_gb: float | None = None, syncs: bool = False) -> dict:
    """Peak memory of one step of `memory` (first, while the process is fresh), then the
    interleaved timings of the `timed` cells, and with `syncs` each timed cell's host-device
    syncs in one more step (harness/syncs.py). Returns {"memory": {...}, "time": [{...}]}."""
    if device.type == "cuda" and memory_cap_gb:
        # Behave like a card of that size: allocations past it raise OutOfMemoryError.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gb * 2**30 / total), device)
    rss_start = rss_mb()
    built: dict[Cell, object] = {}

    def workload(cell: Cell):
        if cell not in built:
            built[cell] = build(cell, device)
            built[cell].prime()
        return built[cell]

    out: dict = {"memory": None, "time": []}
    if memory is not None:
        out["memory"] = step_memory(workload(memory), device, breakdown, rss_start)
    if timed:
        # The memory step above was the first step of `memory`; the others get theirs here.
        works = [workload(c) for c in timed]
        for cell, work in zip(timed, works):
            if cell != memory:
                work.step()
        out["time"] = interleaved_timings([c.batch for c in timed], works, device, warmup, repeats)
        if syncs:  # after the timed steps: warm, and the debug mode's warnings slow no timed step
            for timing, work in zip(out["time"], works):
                timing["syncs"] = count_syncs(work.step, device)
    out["threads"] = torch.get_num_threads()
    return out


def cell_main(argv: list[str]) -> int:
    """Child side: `python -m benchmarks cell '<json>'`; prints one result line."""
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    memory = Cell.from_dict(spec["memory"]) if spec.get("memory") else None
    timed = [Cell.from_dict(c) for c in spec.get("time", [])]
    try:
        result = measure(memory, timed, torch.device(spec.get("device", "cpu")), spec.get("warmup", 1),
                         spec.get("repeats", 3), spec.get("breakdown", True), spec.get("memory_cap_gb"),
                         spec.get("syncs", False))
    except torch.OutOfMemoryError as err:
        result = {"oom": True, "error": f"out of memory: {str(err).splitlines()[0]}"}
    except RuntimeError as err:  # the CPU allocator's out-of-memory is a plain RuntimeError
        if "alloc" not in str(err).lower():
            raise
        result = {"oom": True, "error": f"out of memory: {str(err).splitlines()[0]}"}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def _run_child(spec: dict, threads: int | None, timeout_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "cell", json.dumps(dict(spec, threads=threads))],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_MARK):])
    elif proc.returncode < 0:
        result = {"error": f"killed by signal {-proc.returncode} (out of memory?)", "oom": proc.returncode == -9}
    else:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": f"exit {proc.returncode}: {tail}"}
    result["wall_s"] = time.perf_counter() - start
    return result


def run_cell(cell: Cell, device: str = "cpu", warmup: int = 1, repeats: int = 3, breakdown: bool = True,
             memory_cap_gb: float | None = None, threads: int | None = None, timed: bool | None = None,
             timeout_s: float = 1800) -> dict:
    """Memory (and, if `timed`, default cell.timed, throughput) of one cell in a fresh process,
    as one flat dict; failures come back as {'error': ...}."""
    timed = cell.timed if timed is None else timed
    spec = dict(memory=cell.to_dict(), time=[cell.to_dict()] if timed else [], device=device, warmup=warmup,
                repeats=repeats, breakdown=breakdown, memory_cap_gb=memory_cap_gb)
    r = _run_child(spec, threads, timeout_s)
    if r.get("error"):
        return r
    return {**r["memory"], **(r["time"][0] if r["time"] else {}), "threads": r["threads"], "wall_s": r["wall_s"]}


def time_together(cells: list[Cell], device: str = "cpu", warmup: int = 1, repeats: int = 3,
                  threads: int | None = None, timeout_s: float = 3600, syncs: bool = False) -> list[dict]:
    """Throughput of several cells measured in one fresh process, their steps interleaved; with
    `syncs`, each cell's host-device syncs per step besides ("syncs", harness/syncs.py)."""
    spec = dict(memory=None, time=[c.to_dict() for c in cells], device=device, warmup=warmup, repeats=repeats,
                syncs=syncs)
    r = _run_child(spec, threads, timeout_s)
    if r.get("error"):
        return [{"error": r["error"]} for _ in cells]
    return [dict(t, timing_wall_s=r["wall_s"]) for t in r["time"]]
