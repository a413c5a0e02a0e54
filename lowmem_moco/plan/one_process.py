"""accelerate's Accelerator as MoCoStep and `factory.build_step` use it, for one process, where a
real one cannot be made: the planner (plan/predict.py, autocast on the CPU for the GPU's
precision) and the rehearsal (plan/rehearse.py, CUDA autocast and fp16 loss scaling on fake
CUDA tensors). Frames in this file are the accelerator's, not the project's step: the rehearsal
reports a sync here at the step's line that called it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..run_settings import MIXED_DTYPES


class OneProcessAccelerator:
    """The part of accelerate's Accelerator that MoCoStep and `factory.build_step` use, for one
    process, with the autocast of the GPU being planned for: accelerate turns fp16 off on a CPU.
    On device type "cuda" (the rehearsal, plan/rehearse.py) fp16 scales the loss with a
    GradScaler as Accelerator does; on the planner's CPU loss scaling works on scalars and in
    place: nothing to plan."""

    num_processes, process_index = 1, 0

    def __init__(self, precision: str, device_type: str = "cpu"):
        self.dtype, self.device_type = MIXED_DTYPES[precision], device_type
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device_type == "cuda" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def no_sync(self, module):
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, optimizer):
        return model, (optimizer if self.scaler is None else ScaledOptimizer(optimizer, self.scaler))

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()


class ScaledOptimizer:
    """What accelerate's AcceleratedOptimizer does around a step under fp16, for one process:
    the GradScaler unscales the gradients, skips the step if any is not finite, and updates
    its scale. (AcceleratedOptimizer itself needs an initialised Accelerator, which a CPU
    cannot make for a GPU.)"""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def __getattr__(self, name):  # param_groups, state, zero_grad, state_dict: the optimizer's
        return getattr(self.optimizer, name)

    def step(self, closure=None) -> None:
        self.scaler.step(self.optimizer, closure)
        self.scaler.update()


def gpu_optimizer_defaults(optimizer) -> None:
    """PyTorch's default implementation on a GPU (foreach: SGD with weight decay then holds a
    temporary copy of the gradients); fake tensors would otherwise get the per-tensor loop."""
    for group in optimizer.param_groups:
        group["foreach"] = True
