"""Host-device syncs of one optimizer step on a real GPU, counted with PyTorch's own detector,
and the rehearsal's count for the same step (lowmem_moco/plan/rehearse.py), to set beside it.

What is counted: with `torch.cuda.set_sync_debug_mode("warn")` PyTorch warns "called a
synchronizing CUDA operation" (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync) each time it
passes one of its instrumented waits: a copy it synchronises the stream after (memcpy_and_sync:
`.item()`, `float()`, a tensor copied to the host, a blocking copy to the GPU) and a stream
synchronisation inside an operator (stream_synchronize: nonzero, masked_select, boolean-mask
indexing, ...). One warning is one sync; its site is where our code made it.

What it cannot see: waits PyTorch does not instrument. torch.cuda.synchronize() (device_synchronize)
and Event.synchronize() wait without warning; PyTorch's documentation says torch.distributed and
torch.sparse are not covered; a library calling CUDA itself (cuDNN, cuBLAS, NCCL) and the driver's
own implicit waits (cudaMalloc/cudaFree when the caching allocator grows or frees, a copy from
pageable host memory) stay invisible. So the measured count is a lower bound.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import torch

import lowmem_moco

from .cells import Cell, cell_config
from .results import markdown_table

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # PyTorch appends "(Triggered internally at ...)"
WANTED = "at most 2 wanted: the loss read and, with fp16, the loss scaler's overflow check"
# Our code: a sync's site is the innermost frame here (this file excepted: its hook is on every stack).
OURS = (Path(lowmem_moco.__file__).resolve().parent, Path(__file__).resolve().parents[1])
THIS_FILE = str(Path(__file__).resolve())


def not_measured(reason: str) -> dict:
    return dict(count=None, reason=reason, sites=[])


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return str(path) != THIS_FILE and "site-packages" not in path.parts and any(path.is_relative_to(r) for r in OURS)


def _where(filename: str, lineno: int) -> str:
    """'package/file.py:N': relative to our checkout, to site-packages, or to torch's parent folder."""
    path = Path(filename).resolve()
    if "site-packages" in path.parts:
        last = len(path.parts) - 1 - path.parts[::-1].index("site-packages")
        return f"{Path(*path.parts[last + 1:])}:{lineno}"
    for root in OURS + (Path(torch.__file__).resolve().parent,):
        if path.is_relative_to(root):
            return f"{path.relative_to(root.parent)}:{lineno}"
    return f"{filename}:{lineno}"


@contextlib.contextmanager
def capture():
    """Every warning raised inside, none shown: yields (messages, stacks), parallel lists of the
    warnings.WarningMessage and the Python stack (traceback.FrameSummary list) at which it came."""
    with warnings.catch_warnings(record=True) as messages:
        warnings.simplefilter("always")  # PyTorch's warning at one line would otherwise show once
        stacks: list = []

        # A warning from C++ carries only the innermost Python frame (often inside torch: GradScaler,
        # or autograd replaying the backward's warnings); the stack says which line of ours it served.
        def keep(message, category, filename, lineno, file=None, line=None):
            messages.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
            stacks.append(traceback.extract_stack())

        warnings.showwarning = keep  # catch_warnings restores it
        yield messages, stacks


def summarise(messages: Iterable[warnings.WarningMessage], stacks: Iterable | None = None) -> dict:
    """The sync warnings among `messages`: their count and sites in the order first seen, each
    {"site", "warned_at", "count"}. site: the warning's own location when it is in our code, else
    the innermost frame of ours on its stack (`stacks`, parallel to `messages`), else its location."""
    messages, stacks = list(messages), list(stacks or [])
    sites: dict[tuple[str, str], int] = {}
    for k, msg in enumerate(messages):
        if SYNC_MESSAGE not in str(msg.message):
            continue
        warned_at = _where(msg.filename, msg.lineno)
        site = warned_at if _ours(msg.filename) else next(
            (_where(f.filename, f.lineno) for f in reversed(stacks[k] if k < len(stacks) else []) if _ours(f.filename)),
            warned_at)
        sites[site, warned_at] = sites.get((site, warned_at), 0) + 1
    return dict(count=sum(sites.values()), reason=None,
                sites=[dict(site=s, warned_at=w, count=n) for (s, w), n in sites.items()])


def count_syncs(step: Callable[[], object], device: torch.device) -> dict:
    """The syncs PyTorch's sync debug mode reports in one call of `step` (one optimizer step of a
    warmed-up workload; not inside a timed loop: the warnings cost time). Without a GPU:
    not measured, and `step` is not called."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return not_measured("no GPU")
    torch.cuda.synchronize(device)  # not a counted sync (device_synchronize does not warn)
    with capture() as (messages, stacks):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:  # the rest of the process runs without the warnings, whatever the step did
            torch.cuda.set_sync_debug_mode(0)
    return summarise(messages, stacks)


def card_for(device: str):
    """The card to rehearse as: this machine's GPU as the planner sees it (plan/device.py); without
    one (--smoke) the T4, the card the recipes are planned for."""
    from lowmem_moco.plan.device import detect_gpu
    from lowmem_moco.plan.predict import gpu

    return detect_gpu()[0] if device == "cuda" else gpu("t4")


def rehearsed(cell: Cell, card) -> dict:
    """`lowmem-moco rehearse`'s syncs per step for the GPU version of `cell` (fp16, channels-last,
    as the speed section runs it on a GPU), 2 steps on fake CUDA as `card` (a plan.predict.Gpu). A step the rehearsal
    cannot run is recorded (its message names the site), not raised: the timings stand without it."""
    from lowmem_moco.plan.rehearse import RehearsalError, rehearse

    cfg = cell_config(replace(cell, precision="fp16", channels_last=True))
    cfg.train.precision = "fp16"  # cell_config leaves precision to the step's Accelerator
    try:
        r = rehearse(cfg, card, steps=2)
    except RehearsalError as err:
        return dict(not_measured(f"rehearsal failed: {err}"), gpu=card.name)
    return dict(count=r.syncs_per_step, reason=None, sites=r.sync_sites, syncs=r.syncs, gpu=r.gpu,
                precision=r.precision, seconds=round(r.seconds, 1))


def _measured_sites(m: dict) -> str:
    """'site ×n (warned in torch/...)' for each site; the torch location only where it differs."""
    return "; ".join(f"{s['site']} ×{s['count']}" + (f" (warned in {s['warned_at']})" if s["warned_at"] != s["site"]
                                                       else "") for s in m["sites"]) or "-"


def markdown_lines(syncs: dict, cell: str) -> list[str]:
    """The table of the speed section's syncs: measured on the GPU beside rehearsed (predicted)."""
    m, p = syncs["measured"], syncs["rehearsed"]
    return [f"Host-device syncs in one optimizer step of the MoCo step ({cell}; {WANTED}):", "",
            *markdown_table(["figure", "syncs per step", "where"], [
                ["measured on this GPU (torch.cuda.set_sync_debug_mode, one step after the timed ones; "
                 "a lower bound: see benchmarks/harness/syncs.py)",
                 m["count"] if m["count"] is not None else f"not measured ({m['reason']})", _measured_sites(m)],
                [f"rehearsed, predicted (lowmem-moco rehearse on fake CUDA as a {p['gpu']}"
                 f"{', ' + p['precision'] if p.get('precision') else ''})",
                 p["count"] if p["count"] is not None else f"not rehearsed ({p['reason']})",
                 ", ".join(p["sites"]) or "-"]], align="lrl")]
