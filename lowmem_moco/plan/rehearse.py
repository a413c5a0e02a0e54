"""`lowmem-moco rehearse RECIPE [key=value ...] --gpu NAME [--steps 2] [--json]`: the trainer's
CUDA path, run on fake CUDA tensors on any machine.

    result = rehearse(cfg, gpu("t4"), steps=2)   # Rehearsal(syncs_per_step=..., peak_bytes=...)

Complete optimizer steps as the trainer takes them on that card: the model from
`factory.build_model`, the optimizer and `MoCoStep` from `factory.build_step`, the precision
from `validation.resolve_precision` with the card's compute capability (fp16 with loss
scaling on a T4), and the batched views (data/lazy_views.py) of a pinned host batch of
uint8 images, augmented on the device per key chunk and micro-batch. The second step sees
the optimizer state and a filled queue. plan/fake_cuda.py runs it on fake CUDA tensors and
counts what makes the host wait for the GPU; MemTracker (plan/memtrack.py) counts the peak.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..config import Config, load_config
from ..data.augment.batched import BatchedMoCoV2
from ..data.lazy_views import BatchedView, CopiedView
from ..data.pipeline import sample_seed
from ..data.stores.ragged import RaggedImages
from ..data.stores.sides import shorter_side
from ..factory import build_model, build_step
from ..run_settings import batched_views, memory_format, view_dtype
from ..validation import resolve_precision
from .fake_cuda import STAND_INS, FakeCuda, RehearsalError, site_of
from .memtrack import CountedAsInputs, peak_by_category, step_tracker
from .one_process import OneProcessAccelerator, gpu_optimizer_defaults
from .predict import GiB, Gpu, gpu

DISTINCT_IMAGES = 8  # the host batch repeats a handful of images: the step sees shapes, not content


@dataclass
class Rehearsal:
    ok: bool
    gpu: str
    precision: str
    steps: int
    syncs_per_step: int  # the most in any rehearsed step
    sync_sites: list  # "file:line", in the order first seen
    syncs: list  # {"site", "reason", "per_step"}: per_step the count in each step
    cuda_ops_per_step: int
    cuda_ops_per_image: float
    peak_bytes: int  # tensor memory at the step's peak, on CUDA's rules (MemTracker over fake CUDA tensors)
    by_category: dict
    stand_ins: list  # names of the stand-ins this rehearsal used (fake_cuda.STAND_INS)
    seconds: float
    notes: list = field(default_factory=list)


def host_batch(cfg: Config, n: int) -> RaggedImages:
    """n uint8 images as the decoded store holds them (shorter side at most `shorter_side`), pinned
    as the loader pins them: DISTINCT_IMAGES of assorted shapes, repeated."""
    side, rng = shorter_side(cfg.data.image_size, cfg.augment.crop_scale[0]), np.random.default_rng(cfg.train.seed)
    shapes = [(side, side + k * side // 8) if k % 2 else (side + k * side // 8, side) for k in range(DISTINCT_IMAGES)]
    distinct = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    return RaggedImages.from_arrays([distinct[i % DISTINCT_IMAGES] for i in range(n)]).pin_memory()


def _views(cfg: Config, images: RaggedImages, precision: str, device: torch.device, step: int) -> list:
    """The pipeline's lazy views of one batch on `device` (data/pipeline.py, per path)."""
    n, size = len(images), cfg.data.image_size
    fmt = memory_format(cfg)
    if not batched_views(cfg, "cuda"):  # per-image views: made whole by the workers, pinned on the host
        return [CopiedView(torch.zeros(n, 3, size, size).pin_memory(), device, fmt) for _ in range(2)]
    seeds = torch.tensor([sample_seed(cfg.train.seed, step, i) for i in range(n)])
    augment = BatchedMoCoV2(size, cfg.augment)
    dtype = view_dtype(cfg, precision, "cuda")
    return [BatchedView(images, seeds, augment, number, device, dtype, fmt) for number in (0, 1)]


def rehearse(cfg: Config, card: Gpu, steps: int = 2) -> Rehearsal:
    """`steps` optimizer steps of `cfg` as the trainer takes them on `card`, on fake CUDA tensors."""
    start, notes = time.perf_counter(), []
    precision = resolve_precision(cfg.train.precision, card.capability, card.name)
    cfg = copy.deepcopy(cfg)
    if cfg.train.compile:  # inductor compiles real kernels; the eager operators are the ones rehearsed
        cfg.train.compile = False
        notes.append("train.compile: the eager step is rehearsed")
    torch.manual_seed(cfg.train.seed)
    moco = build_model(cfg, torch.device("cpu"))  # timm's constructors read values: built for real, then moved
    tracker = step_tracker(lean=True)
    try:
        with FakeCuda(card.capability) as cuda:
            cuda.to_device(moco)
            images = host_batch(cfg, cfg.train.batch_size)  # pinned through the stand-in: inside FakeCuda
            accelerator = OneProcessAccelerator(precision, "cuda")
            step_fn = build_step(cfg, moco, accelerator)
            gpu_optimizer_defaults(step_fn.optimizer)
            generator = torch.Generator().manual_seed(cfg.train.seed + 1)
            tracker.track_external(moco, getattr(step_fn.optimizer, "optimizer", step_fn.optimizer))  # unwrapped
            with tracker:
                for number in range(steps):
                    views = [CountedAsInputs(v, tracker) for v in _views(cfg, images, precision, cuda.device, number)]
                    cuda.watch.start_step()
                    result = step_fn(*views, cfg.moco.momentum, generator)
                    float(result.loss)  # the trainer's read of the loss for its log: a float already
    except RehearsalError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the CUDA path becomes one line with its site
        raise RehearsalError(_failure(err)) from err
    return _result(cfg, card, precision, steps, cuda.watch, tracker, time.perf_counter() - start, notes)


def _failure(err: Exception) -> str:
    site = site_of(traceback.extract_tb(err.__traceback__))
    name, text = type(err).__name__, (str(err).strip().splitlines() or [""])[0]
    if name == "FakeTensorDeviceMismatchError":
        what = "a CUDA tensor met a CPU tensor"
    elif name in ("DataDependentOutputException", "DynamicOutputShapeException"):
        what = "a value or shape only the GPU knows, and no stand-in answers it"
    elif any(k in text for k in ("NVIDIA driver", "not compiled with CUDA", "CUDA driver", "cudaGetDevice")):
        what = "a CUDA-only call with no stand-in"
    elif "dtype" in text or "scalar type" in text:
        what = "a dtype error"
    else:
        what = name
    return f"the CUDA path fails at {site}: {what} ({name}: {text})"


def _result(cfg, card, precision, steps, watch, tracker, seconds, notes) -> Rehearsal:
    sites: dict[str, dict] = {}
    for k, record in enumerate(watch.steps):
        for site, reason in record.syncs:
            entry = sites.setdefault(site, {"site": site, "reason": reason, "per_step": [0] * len(watch.steps)})
            entry["per_step"][k] += 1
    by_category = peak_by_category(tracker, "cuda")
    ops = max((r.cuda_ops for r in watch.steps), default=0)
    return Rehearsal(ok=True, gpu=card.name, precision=precision, steps=steps,
                     syncs_per_step=max((len(r.syncs) for r in watch.steps), default=0),
                     sync_sites=list(sites), syncs=list(sites.values()), cuda_ops_per_step=ops,
                     cuda_ops_per_image=ops / cfg.train.batch_size, peak_bytes=by_category.pop("total"),
                     by_category=by_category, stand_ins=sorted(watch.stand_ins_used), seconds=seconds, notes=notes)


def _text(recipe: str, r: Rehearsal) -> list[str]:
    lines = [f"{recipe} rehearsed on fake CUDA as a {r.gpu}: {r.steps} optimizer steps, precision {r.precision}: ok",
             f"  host-device syncs per step: {r.syncs_per_step} (at most 2 wanted: the loss read and, with fp16, "
             f"the loss scaler's overflow check)"]
    lines += [f"    {s['site']}: {s['reason']} (per step: {', '.join(map(str, s['per_step']))})" for s in r.syncs]
    lines += [f"  CUDA operators per step: {r.cuda_ops_per_step} ({r.cuda_ops_per_image:.1f} per image)",
              f"  peak tensor memory on CUDA's rules: {r.peak_bytes / GiB:.2f} GiB (the backward's operators and "
              f"freeing included; lowmem-moco plan adds the margin for what fake tensors cannot see)",
              "  stand-ins for what only a GPU does:"]
    lines += [f"    {name}: {STAND_INS[name]}" for name in r.stand_ins]
    lines += [f"  note: {n}" for n in r.notes] + [f"  {r.seconds:.1f} s on this machine"]
    return lines


def main(recipe: str, overrides: list[str], gpu_name: str, steps: int = 2, as_json: bool = False) -> int:
    cfg, card = load_config(recipe, overrides), gpu(gpu_name)
    try:
        result = rehearse(cfg, card, steps)
    except RehearsalError as err:
        print(json.dumps({"ok": False, "error": str(err)}) if as_json else f"error: {err}", file=sys.stdout
              if as_json else sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=2) if as_json else "\n".join(_text(recipe, result)))
    return 0
