"""`train.micro_batch_size: auto`: the micro-batch chosen when a run starts.

- A run that resumes keeps the micro-batch its newest checkpoint was trained with: BatchNorm
  sees the same groups of images, so the run stays exact.
- On a CUDA GPU, one process: the planner (plan/search.py) predicts the step for every
  micro-batch that divides the effective batch and takes the largest whose peak fits the
  device's free memory with the margin (plan/predict.py: CUDA_MARGIN); checkpointing stays as
  the recipe sets it.
- Otherwise (a CPU, several processes, or a model the planner cannot run): RULE_MAX_MICRO_BATCH,
  i.e. the largest divisor of each process's share of the batch that is at most 64. A CPU
  gains no speed from larger micro-batches, and 64 images per BatchNorm group keep memory
  modest (the official 8-GPU recipe normalises groups of 32).
"""

from __future__ import annotations

import warnings

import torch

from ..config import Config
from ..errors import UserError
from .predict import Gpu
from .search import Planner, nothing_fits, search

AUTO = "auto"
RULE_MAX_MICRO_BATCH = 64


def rule_micro_batch(share: int) -> int:
    return max(m for m in range(1, min(share, RULE_MAX_MICRO_BATCH) + 1) if share % m == 0)


def resumed_micro_batch(meta: dict | None) -> int | None:
    """The micro-batch a resumed run's checkpoint (its meta, as load_latest read it) trained with."""
    if meta is None:
        return None
    saved = meta["config"]["train"]
    return saved.get("micro_batch_size") or saved["batch_size"]


def choose_micro_batch(cfg: Config, device: torch.device, precision: str, processes: int = 1,
                       resumed: dict | None = None) -> tuple[int, str]:
    """(micro-batch, how it was chosen) for a config whose train.micro_batch_size is 'auto';
    `resumed`: the meta of the checkpoint the run resumes from, if any."""
    kept = resumed_micro_batch(resumed)
    if kept is not None:
        return kept, "kept from the checkpoint this run resumes"
    share = cfg.train.batch_size // processes
    rule = rule_micro_batch(share)
    if device.type != "cuda" or processes > 1:
        where = "a CPU" if device.type != "cuda" else f"{processes} processes"
        return rule, f"rule for {where}: largest divisor of {share} up to {RULE_MAX_MICRO_BATCH}"
    free, _ = torch.cuda.mem_get_info(device)
    card = Gpu(torch.cuda.get_device_name(device), free / 2**30, torch.cuda.get_device_capability(device))
    try:
        chosen, peak = plan_micro_batch(cfg, precision, free, card)
    except UserError:
        raise
    except Exception as err:  # the planner is a help, not a requirement
        warnings.warn(f"the planner could not run ({type(err).__name__}: {err}); train.micro_batch_size=auto "
                      f"falls back to {rule}", stacklevel=2)
        return rule, f"rule (the planner failed): largest divisor of {share} up to {RULE_MAX_MICRO_BATCH}"
    return chosen, (f"planner: {peak / 2**30:.2f} GiB predicted, {free / 2**30:.2f} GiB free on "
                    f"{torch.cuda.get_device_name(device)}")


def plan_micro_batch(cfg: Config, precision: str, free_bytes: int, card: Gpu | None = None) -> tuple[int, int]:
    """(largest micro-batch predicted to fit `free_bytes` with the margin, its predicted peak);
    on CUDA's rules for `card` (the GPU training runs on), on the CPU's without one."""
    planner = Planner(cfg, precision, card)
    with torch.random.fork_rng(devices=[]):  # building the model draws numbers: leave the run's alone
        result = search(planner, free_bytes, checkpointing=(cfg.train.grad_checkpointing,))
    if result.choice is None:
        raise nothing_fits(planner, result)
    return result.choice.micro_batch, result.choice.peak_bytes
