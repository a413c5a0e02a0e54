"""The optimizer and its learning-rate schedule: the one place both are made, for the trainer,
the planner and the benchmarks alike."""

from __future__ import annotations

import math

import torch

from .config import Config, TrainConfig


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(step: int, steps_per_epoch: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step`: linear warm-up, then cosine decay to zero.

    `cosine` decays every step. The official code sets the rate once per epoch, to
    lr * (1 + cos(pi * e / E)) / 2 for epoch e of E: main_moco.py counts e from 0
    (`cosine_epoch_start`), the CIFAR-10 notebook from 1 (`cosine_epoch_end`).
    """
    total_steps, warmup_steps = steps_per_epoch * t.epochs, round(t.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return t.lr * (step + 1) / warmup_steps
    if t.lr_schedule != "cosine":
        epoch = step // steps_per_epoch + (t.lr_schedule == "cosine_epoch_end")
        return cosine_decay(t.lr, epoch / t.epochs)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cosine_decay(t.lr, progress)


def cosine_decay(base: float, fraction: float) -> float:
    """The one cosine: `base` at fraction 0, half of it at 0.5, zero at 1. The training rate,
    the linear probe's rate and the momentum schedule (its distance from 1) all follow it."""
    return base * 0.5 * (1.0 + math.cos(math.pi * fraction))
