"""`lowmem-moco plan RECIPE [key=value ...] [--gpu NAME | --gpu auto | --budget-gb N] [--json]`: the
predicted peak by category, the capacity and headroom, and the overrides that fit."""

from __future__ import annotations

import json

from ..config import Config, load_config
from ..errors import ConfigError
from ..validation import resolve_precision
from .device import AUTO, detect_gpu
from .predict import CUDA_MARGIN, GPUS, UNNAMED_GPU, GiB, Gpu, Prediction, gpu, usable_bytes
from .search import Planner, SearchResult, nothing_fits, overrides, search

ORDER = ("params", "grads", "optimizer", "activations", "temporaries", "inputs", "queue", "buffers")


def plan(recipe: str, overrides_: list[str], gpu_name: str | None = None, budget_gb: float | None = None) -> dict:
    """Everything the report prints, as the JSON object `--json` writes."""
    if gpu_name is not None and budget_gb is not None:
        raise ConfigError("give either --gpu or --budget-gb, not both")
    if budget_gb is not None and budget_gb <= 0:
        raise ConfigError(f"--budget-gb must be positive; got {budget_gb}")
    card, found = detect_gpu() if gpu_name == AUTO else (gpu(gpu_name) if gpu_name else None, None)
    budget = int(card.capacity_gib * GiB) if card else (int(budget_gb * GiB) if budget_gb else None)
    cfg = load_config(recipe, overrides_)
    # The precision training would run on that card (a T4 has no native bf16); a bare budget
    # is a GPU of unknown kind, which runs what the recipe asks.
    precision = resolve_precision(cfg.train.precision, card.capability, card.name) if card else cfg.train.precision
    planner = Planner(cfg, precision, card or UNNAMED_GPU)  # on CUDA's rules (fake CUDA, CUDA autocast)
    result: SearchResult | None = search(planner, budget) if budget is not None else None
    if cfg.train.micro_batch_size == "auto":  # what the trainer would choose on this budget
        if result is None:
            raise ConfigError("train.micro_batch_size=auto is chosen for a memory budget: add --gpu or --budget-gb")
        chosen = [p.micro_batch for p in result.tried if p.checkpointing == cfg.train.grad_checkpointing
                  and p.peak_bytes <= result.usable_bytes]
        cfg.train.micro_batch_size = max(chosen, default=2)
    own = planner.predict(cfg.train.grad_checkpointing, cfg.micro_batch)
    out = {
        "peak_bytes": own.peak_bytes,
        "by_category": {k: own.by_category.get(k, 0) for k in ORDER},
        "precision": precision,
        "budget_bytes": budget,
        "fits": None if budget is None else own.peak_bytes <= usable_bytes(budget),
    }
    if result is not None:
        out["choice"] = overrides(cfg, result.choice) if result.choice else None
        out["tried"] = [dict(micro_batch=p.micro_batch, checkpointing=p.checkpointing, peak_bytes=p.peak_bytes,
                             fits=p.peak_bytes <= result.usable_bytes) for p in result.tried]
    out["_text"] = ([found] if found else []) + _text(cfg, recipe, own, precision, card, budget, result, planner)
    if result is not None and result.choice is None:
        out["_error"] = nothing_fits(planner, result)
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _text(cfg: Config, recipe: str, own: Prediction, precision: str, card: Gpu | None, budget: int | None,
          result: SearchResult | None, planner: Planner) -> list[str]:
    t = cfg.train
    method = (f"predicted on CUDA's rules: fake CUDA tensors, CUDA autocast{f' as on a {card.name}' if card else ''}"
              if own.method == "fake" else "measured on real CPU tensors (the arch cannot be traced)")
    lines = [f"plan: {recipe}: {cfg.model.arch} {cfg.data.image_size} px, batch {t.batch_size} = "
             f"{own.micro_batch} x {t.batch_size // own.micro_batch} micro-batches, {cfg.moco.key_chunks} key chunks, "
             f"{f'K {cfg.moco.queue_size}' if cfg.moco.version == 'v2' else 'in-batch negatives (v3)'}, precision {precision}"
             f"{' (fp16 autocast with loss scaling: no native bf16)' if card and card.capability < (8, 0) and precision == 'fp16' else ''}"
             f", checkpointing {'on' if own.checkpointing else 'off'}",
             f"peak by category ({method}):"]
    lines += [f"  {k:<12} {_gib(own.by_category.get(k, 0)):>10}" for k in ORDER]
    lines.append(f"  {'total':<12} {_gib(own.peak_bytes):>10}   ({own.seconds:.1f} s)")
    if budget is None:
        lines.append(f"no budget given: add --gpu ({', '.join(GPUS)}, or {AUTO} for this machine's) or --budget-gb N "
                     f"to search for what fits")
        return lines
    usable = usable_bytes(budget)
    where = ("--budget-gb" if card is None else f"{card.name}, assumed capacity" if GPUS.get(card.name) is card
             else f"{card.name}, its total memory")
    lines += [f"capacity  {_gib(budget)} ({where}); usable {_gib(usable)} after the margin kept free "
              f"({CUDA_MARGIN['fraction']:.0%} + {CUDA_MARGIN['fixed_gib']} GiB, provisional until measured on a GPU)",
              f"headroom  {_gib(budget - own.peak_bytes)} ({_gib(usable - own.peak_bytes)} after the margin): "
              f"{'fits' if own.peak_bytes <= usable else 'DOES NOT FIT'}",
              "search (micro-batch, checkpointing -> predicted peak):"]
    for p in sorted(result.tried, key=lambda p: (p.checkpointing, p.micro_batch)):
        lines.append(f"  {p.micro_batch:>5}  {'on ' if p.checkpointing else 'off'}  {_gib(p.peak_bytes):>10}"
                     f"  {'fits' if p.peak_bytes <= usable else 'too big'}")
    if result.choice is not None:
        c = result.choice
        lines += [f"fastest that fits: micro-batch {c.micro_batch}, checkpointing {'on' if c.checkpointing else 'off'}"
                  f" ({_gib(c.peak_bytes)} predicted); overrides:",
                  "  " + " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                  for k, v in overrides(cfg, c).items())]
    return lines


def main(recipe: str, overrides_: list[str], gpu_name: str | None, budget_gb: float | None, as_json: bool) -> None:
    out = plan(recipe, overrides_, gpu_name, budget_gb)
    text, error = out.pop("_text"), out.pop("_error", None)
    if as_json:
        print(json.dumps(out))
    else:
        print("\n".join(text))
    if error is not None:
        raise error
