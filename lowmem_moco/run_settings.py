"""What a run decides when it starts, from its config and the machine, in one place.

The config stays as validated; the decisions (the precision accelerate runs, the micro-batch
that `train.micro_batch_size: auto` became, the views' dtype) live in `RunSettings`, and the
config the run records (config.yaml, checkpoints) is a copy with the micro-batch filled in.
The planner and the benchmarks take the same decisions through the same functions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import Config

# accelerate's mixed_precision -> the autocast dtype (None: fp32, no autocast).
MIXED_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def batched_views(cfg: Config, device_type: str) -> bool:
    """Whether views are made in batches on the device (data.augment=auto picks them on a GPU)."""
    return cfg.data.augment == "batched" or (cfg.data.augment == "auto" and device_type == "cuda")


def view_dtype(cfg: Config, precision: str, device_type: str) -> torch.dtype:
    """The input views' dtype: on a GPU the batched path writes them in the mixed-precision dtype
    (half the bytes, and autocast would cast them anyway); per-image views and CPUs keep fp32."""
    if device_type != "cuda" or not batched_views(cfg, device_type):
        return torch.float32
    return MIXED_DTYPES[precision] or torch.float32


def memory_format(cfg: Config) -> torch.memory_format:
    """The layout of the input views: the model's (train.channels_last), so no step converts them."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


@dataclass(frozen=True)
class RunSettings:
    precision: str  # accelerate's mixed_precision on this device (validation.resolve_precision)
    micro_batch: int  # train.micro_batch_size, resolved when the recipe says auto
    micro_batch_how: str | None  # how auto was resolved; None when the recipe gave the number
    view_dtype: torch.dtype
    processes: int

    def recorded_config(self, cfg: Config) -> Config:
        """The config as the run records it: `cfg` with the micro-batch the run trains with."""
        recorded = copy.deepcopy(cfg)
        recorded.train.micro_batch_size = self.micro_batch
        return recorded
