"""Predicted peak GPU memory of a recipe's training step, on any machine.

    step = PlannedStep(cfg, precision="fp16", checkpointing=True, card=gpu("t4"))
    prediction = step.predict(micro_batch=128)  # Prediction(peak_bytes=..., by_category={...})

The step is the trainer's own: the model from `factory.build_model`, the optimizer
from `build_optimizer`, the step `factory.make_step` picks (v2's MoCoStep, v3's GradCacheStep)
with its micro-batches and key chunks, and input views made
per key chunk and micro-batch as the pipeline's lazy views are. The model is built for real on
the CPU (timm's constructors read values), then its parameters, buffers and optimizer state
are swapped for fake tensors (torch's FakeTensorMode): every operator runs on shapes only,
and torch's MemTracker (lowmem_moco/plan/memtrack.py) counts the storages it creates and frees.

With a card, on CUDA's rules (what `lowmem-moco plan --gpu` uses): the tensors are fake CUDA
tensors under CUDA autocast, fp16 with the GradScaler on a card without bf16, the backward run
node by node and the card's attention kernel (plan/fake_cuda.py, the rehearsal's machinery).
Without one, on the CPU's rules: fake CPU tensors and CPU autocast, which plan-check compares
with real CPU peaks. As on a GPU, the optimizer uses PyTorch's foreach implementation (SGD
with weight decay then holds a temporary copy of the gradients) and the views are in the
pipeline's dtype.

What fake tensors do not see of a CUDA step: the CUDA context, cuDNN workspaces and the
caching allocator's rounding and fragmentation. `CUDA_MARGIN` covers them; it is provisional
until `python -m benchmarks gpu` measures it on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import Config
from ..errors import ConfigError
from .fake_cuda import FakeCuda, to_fake
from .one_process import OneProcessAccelerator, gpu_optimizer_defaults
from .memtrack import CountedAsInputs, peak_by_category, step_tracker
from ..optim import build_optimizer
from ..run_settings import memory_format, view_dtype
from ..factory import build_model, make_step

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    capacity_gib: float  # assumed: what PyTorch reports as the card's total capacity
    capability: tuple[int, int]  # CUDA compute capability: which mixed precisions run natively


# Assumed capacities (not measured here): PyTorch reports a 16 GB T4 as 14.56-14.76 GiB in
# public out-of-memory messages; the others are their nominal size less the same ~2.5 %.
GPUS = {g.name: g for g in [Gpu("t4", 14.56, (7, 5)), Gpu("l4", 21.9, (8, 9)), Gpu("a100-40", 39.0, (8, 0)),
                            Gpu("a100-80", 78.0, (8, 0)), Gpu("h100", 78.0, (9, 0))]}

# Whose CUDA rules a bare budget (--budget-gb, no card named) is planned on: autocast's tables
# are the same on every card; compute capability 8.0 runs the recipe's precision as asked
# (bf16 natively) and the fused attention kernels of current cards.
UNNAMED_GPU = Gpu("a GPU of unknown kind", 0.0, (8, 0))

# Kept free of the budget for what the fake CPU step cannot see (module docstring):
# PROVISIONAL (no GPU measurement yet): a fraction of the budget plus a fixed amount.
CUDA_MARGIN = {"fraction": 0.10, "fixed_gib": 0.5}


def usable_bytes(budget_bytes: int, margin: dict = CUDA_MARGIN) -> int:
    """The largest predicted peak that fits `budget_bytes` with the margin kept free."""
    return int(budget_bytes * (1 - margin["fraction"]) - margin["fixed_gib"] * GiB)


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ConfigError(f"unknown --gpu {name!r}; known GPUs: {', '.join(GPUS)} (or --gpu auto, or --budget-gb N)")
    return GPUS[name]


@dataclass
class Prediction:
    peak_bytes: int
    by_category: dict  # bytes: params, grads, optimizer, activations, temporaries, inputs, queue, buffers
    precision: str
    micro_batch: int
    checkpointing: bool
    method: str  # "fake" (planned) or "real-cpu" (measured on real CPU tensors)
    seconds: float = 0.0
    notes: list = field(default_factory=list)


def _zero_images(n: int, size: int, dtype: torch.dtype, memory_format, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(n, 3, size, size, dtype=dtype, device=device).contiguous(memory_format=memory_format)  # nx3xSxS


class _PlannedView:
    """A lazy view (engine/views.py) of zero images: rows are made when the step asks, as the
    pipeline's are, in its dtype and layout. The augmentation's own scratch is not planned: it
    exists before a chunk's forward, when activations are smaller than at the peak."""

    def __init__(self, n: int, size: int, dtype: torch.dtype, memory_format, device: str):
        self.n, self.size, self.dtype, self.memory_format, self.device = n, size, dtype, memory_format, device

    def __len__(self) -> int:
        return self.n

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return _zero_images(len(rows), self.size, self.dtype, self.memory_format, self.device)  # rx3xSxS


class PlannedStep:
    """One recipe's step (precision and checkpointing fixed), built once, predicted at any micro-batch.

    card=None predicts on the CPU's rules (fake CPU tensors, CPU autocast; plan-check measures
    this against real CPU peaks); a card predicts on CUDA's (fake CUDA tensors under CUDA
    autocast with its precision and loss scaling, plan/fake_cuda.py). fake=False runs the step
    on real CPU tensors: a measurement, for checking the planner and for models it cannot trace."""

    def __init__(self, cfg: Config, precision: str, checkpointing: bool, fake: bool = True, card: Gpu | None = None):
        self.cfg, self.precision, self.checkpointing, self.fake = cfg, precision, checkpointing, fake
        self.cuda = FakeCuda(card.capability) if fake and card is not None else None
        self.device = "cuda" if self.cuda else "cpu"
        self.mode = self.cuda.mode if self.cuda else (FakeTensorMode(allow_non_fake_inputs=True) if fake else None)
        torch.manual_seed(cfg.train.seed)
        model_cfg = copy.deepcopy(cfg)  # the checkpointing being planned, whatever the recipe says
        model_cfg.train.grad_checkpointing = checkpointing
        self.moco = build_model(model_cfg, torch.device("cpu"))  # the trainer's own model
        self.memory_format = memory_format(cfg)
        if self.cuda:
            with self.cuda:
                self.cuda.to_device(self.moco)
        elif fake:
            to_fake(self.moco, self.mode)
        self.optimizer = build_optimizer(self.moco.trained_parameters(), cfg)
        gpu_optimizer_defaults(self.optimizer)
        with self._mode():  # on CUDA's rules the GradScaler sees the (fake) CUDA it needs
            self.accelerator = OneProcessAccelerator(precision, self.device)
            self._prime_optimizer()

    def _mode(self):
        return self.cuda or (self.mode if self.fake else contextlib.nullcontext())

    def _prime_optimizer(self) -> None:
        """One zero-gradient step: the optimizer state exists, as in the middle of training."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fixed_bytes(self) -> dict:
        """What exists before any image: both encoders' parameters and buffers (with the queue)
        and the optimizer state."""
        def nbytes(tensors) -> int:
            return sum(t.untyped_storage().nbytes() for t in tensors)
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return {"params": nbytes(self.moco.parameters()), "buffers": nbytes(self.moco.buffers()),
                "optimizer": nbytes(state), "queue": nbytes([self.moco.queue])}

    def predict(self, micro_batch: int, lean: bool = True, whole_batch_views: bool = False) -> Prediction:
        """The step's peak at `micro_batch`; whole_batch_views=True plans input views made for the
        whole batch before the step (how the pipeline worked before lazy views), for comparison."""
        cfg, start = self.cfg, time.perf_counter()
        batch = cfg.train.batch_size
        if micro_batch < 2 or batch % micro_batch:
            raise ConfigError(f"train.micro_batch_size={micro_batch} does not divide train.batch_size={batch} "
                              f"into micro-batches of at least 2; use a divisor of {batch}")
        optimizer = self.accelerator.prepare(self.moco.encoder_q, self.optimizer)[1]  # fp16 on CUDA: loss scaling
        step = make_step(cfg, self.moco, optimizer, self.accelerator, micro_batch, guard_bn_stats=self.checkpointing,
                         planning=self.fake)
        size, dtype = cfg.data.image_size, view_dtype(cfg, self.precision, "cuda")
        tracker = step_tracker(lean=lean)
        with self._mode():
            if whole_batch_views:  # both views of the whole batch made before the step: Bx3xSxS each
                views = [_zero_images(batch, size, dtype, self.memory_format, self.device) for _ in range(2)]
            else:  # the pipeline's lazy views: made per key chunk and micro-batch, inside the step
                views = [CountedAsInputs(_PlannedView(batch, size, dtype, self.memory_format, self.device), tracker)
                         for _ in range(2)]
            tracker.track_external(self.moco, self.optimizer, *[v for v in views if torch.is_tensor(v)])
            with tracker:
                step(*views, cfg.moco.momentum, torch.Generator().manual_seed(cfg.train.seed + 1))
        by_category = peak_by_category(tracker, self.device)
        total = by_category.pop("total")
        queue = min(by_category.get("buffers", 0), self.moco.queue.untyped_storage().nbytes())
        by_category["queue"], by_category["buffers"] = queue, by_category.get("buffers", 0) - queue
        return Prediction(total, by_category, self.precision, micro_batch, self.checkpointing,
                          "fake" if self.fake else "real-cpu", time.perf_counter() - start)
