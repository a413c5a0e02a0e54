"""The optimizer and its learning-rate schedule: the one place both are made, for the trainer,
the planner and the benchmarks alike."""

from __future__ import annotations

import math

import torch

from .config import Config, TrainConfig

MOMENTUM = 0.9  # SGD's (MoCo v2) and LARS's (MoCo v3's --momentum default)
TRUST_COEFFICIENT = 0.001  # LARS's eta: MoCo v3's moco/optimizer.py default


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """train.optimizer over the parameters that train: a frozen one (model.freeze_patch_embed,
    a sin-cos position embedding) is left out, as it has no gradient to step with."""
    t = cfg.train
    params = [p for p in params if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=MOMENTUM, weight_decay=t.weight_decay)
    if t.optimizer == "lars":
        return LARS(params, lr=t.lr, weight_decay=t.weight_decay, momentum=MOMENTUM)
    # MoCo v3 (main_moco.py): torch.optim.AdamW(model.parameters(), lr, weight_decay=wd), every
    # parameter decayed, torch's betas and eps.
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


class LARS(torch.optim.Optimizer):
    """MoCo v3's LARS (moco/optimizer.py): SGD with momentum, the update of each parameter of more
    than one dimension rescaled layer by layer.

    For p.ndim > 1: d = grad + wd * p, then d *= trust * ||p|| / ||d|| (1 where either norm is 0).
    Parameters of one dimension (biases, BatchNorm and LayerNorm weights) take the plain
    gradient: no weight decay and no ratio. Then mu = momentum * mu + d; p -= lr * mu.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = MOMENTUM,
                 trust_coefficient: float = TRUST_COEFFICIENT):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # accelerate and torch's API pass one; the official step takes none
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    # On the device, without a host sync: a zero norm (a zero-initialised layer,
                    # a zero gradient) keeps the update as it is.
                    ratio = torch.where(param_norm > 0, torch.where(
                        update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one), one)
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


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
