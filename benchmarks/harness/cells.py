"""A grid cell (one configuration) and the training step it measures.

Three kinds of step, on the same random images:
    lowmem      the project's step: lowmem_moco.engine.step.MoCoStep, built by lowmem_moco.factory as training builds it
    naive       the blog-post loop of benchmarks/harness/naive.py (fp32 only)
    supervised  timm's plain training step: forward, cross-entropy, backward, SGD step
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from lowmem_moco.backbones import build_encoder
from lowmem_moco.config import Config
from lowmem_moco.optim import build_optimizer

KINDS = ("lowmem", "naive", "supervised")
DEFAULTS = Config()  # hyper-parameters come from the project's defaults, for both MoCo steps


@dataclass(frozen=True)
class Cell:
    kind: str = "lowmem"
    arch: str = "resnet18"
    image_size: int = 128
    micro_batch: int = 128
    batch: int = 0  # effective batch (one optimizer step); 0: the micro-batch
    precision: str = "no"  # no | fp16 | bf16
    checkpointing: bool = False
    key_chunks: int = 8  # lowmem only
    channels_last: bool = False
    queue_size: int = 4096
    small_image_stem: bool = False
    compile: bool = False  # lowmem only: train.compile (torch.compile on both backbones)
    version: str = "v2"  # lowmem only: moco.version (v3: the gradient-cache step, the official dim 256)
    timed: bool = True  # False: memory only (saves time on a CPU)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown cell kind {self.kind!r}; use one of {KINDS}")
        if not self.batch:
            object.__setattr__(self, "batch", self.micro_batch)
        if self.batch % self.micro_batch:
            raise ValueError(f"batch {self.batch} is not a multiple of micro-batch {self.micro_batch}")
        if self.kind == "naive" and (self.precision != "no" or self.checkpointing or self.batch != self.micro_batch):
            raise ValueError("the naive baseline is fp32, without checkpointing or accumulation")

    @property
    def group(self) -> str:
        """The configuration without its micro-batch: one line of the memory plot, one slope.
        The effective batch B is part of a lowmem configuration (its micro-batches split it);
        the naive and supervised steps have no accumulation, so their B is the micro-batch."""
        parts = [self.kind, self.arch, f"{self.image_size}px", {"no": "fp32"}.get(self.precision, self.precision)]
        if self.kind == "lowmem":
            parts += [f"B{self.batch}", "ckpt" if self.checkpointing else "no-ckpt", f"{self.key_chunks}ch"]
        if self.channels_last:
            parts.append("NHWC")
        if self.compile:
            parts.append("compiled")
        if self.version != "v2":
            parts.append(f"MoCo {self.version}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        return f"{self.group} mb{self.micro_batch}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _autocast(cell: Cell, device: torch.device):
    if cell.precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if cell.precision == "fp16" else torch.bfloat16)


def _images(cell: Cell, device: torch.device, n: int) -> torch.Tensor:
    fmt = torch.channels_last if cell.channels_last else torch.contiguous_format
    return torch.randn(n, 3, cell.image_size, cell.image_size, device=device).contiguous(memory_format=fmt)


@dataclass
class Workload:
    """What a measurement needs: the step, and the objects whose tensors count."""
    step: Callable[[], float]  # one optimizer step; returns the loss
    modules: list  # modules whose parameters/buffers exist before the step
    optimizer: torch.optim.Optimizer
    inputs: list  # the batch tensors handed to the step
    prime: Callable[[], None]  # creates the optimizer state without a full step


def build(cell: Cell, device: torch.device) -> Workload:
    torch.manual_seed(0)
    return {"lowmem": _lowmem, "naive": _naive, "supervised": _supervised}[cell.kind](cell, device)


def prime_optimizer(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A step with zero gradients: allocates SGD's momentum buffers so that a measured first
    step holds the same optimizer state as a step in the middle of training."""
    def prime():
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return prime


def cell_config(cell: Cell) -> Config:
    """The project's defaults with this cell's model, sizes and step settings: what the trainer
    would be given for it (not validated: cells may measure settings a recipe would refuse)."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg.model.arch, cfg.model.small_image_stem = cell.arch, cell.small_image_stem
    cfg.data.image_size, cfg.moco.queue_size, cfg.moco.key_chunks = cell.image_size, cell.queue_size, cell.key_chunks
    cfg.train.batch_size = cell.batch
    cfg.train.micro_batch_size = cell.micro_batch
    cfg.train.grad_checkpointing, cfg.train.channels_last = cell.checkpointing, cell.channels_last
    cfg.train.compile = cell.compile
    cfg.moco.version = cell.version
    if cell.version == "v3":
        cfg.model.dim = 256  # MoCo v3's; the heads' hidden width is its default 4096
    return cfg


def _lowmem(cell: Cell, device: torch.device) -> Workload:
    from accelerate import Accelerator

    from lowmem_moco.factory import build_model, build_step

    cfg = cell_config(cell)
    moco = build_model(cfg, device)
    acc = Accelerator(mixed_precision=cell.precision, cpu=device.type == "cpu")
    step_fn = build_step(cfg, moco, acc)
    optimizer = step_fn.optimizer
    view_q, view_k = _images(cell, device, cell.batch), _images(cell, device, cell.batch)
    shuffle = torch.Generator().manual_seed(1)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
    return Workload(step=lambda: step_fn(view_q, view_k, cfg.moco.momentum, shuffle).loss,
                    modules=[moco], optimizer=inner, inputs=[view_q, view_k], prime=prime_optimizer(inner))


def _naive(cell: Cell, device: torch.device) -> Workload:
    from .naive import NaiveMoCo

    cfg = DEFAULTS
    encoder = build_encoder(cell.arch, cell.image_size, cell.small_image_stem, cfg.model.dim).to(device)
    if cell.channels_last:
        encoder.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(encoder.parameters(), DEFAULTS)
    naive = NaiveMoCo(encoder, optimizer, cell.queue_size, cfg.model.dim, cfg.moco.temperature,
                      cfg.moco.momentum, device)
    x_q, x_k = _images(cell, device, cell.batch), _images(cell, device, cell.batch)
    return Workload(step=lambda: naive(x_q, x_k), modules=[naive.encoder_q, naive.encoder_k],
                    optimizer=optimizer, inputs=[x_q, x_k, naive.queue], prime=prime_optimizer(optimizer))


def _supervised(cell: Cell, device: torch.device) -> Workload:
    import timm

    model = timm.create_model(cell.arch, num_classes=1000).to(device)
    if cell.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), DEFAULTS)
    scaler = torch.amp.GradScaler(device.type, enabled=cell.precision == "fp16")
    images = _images(cell, device, cell.batch)
    labels = torch.randint(0, 1000, (cell.batch,), device=device)

    def step() -> float:
        with _autocast(cell, device):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return Workload(step=step, modules=[model], optimizer=optimizer, inputs=[images, labels],
                    prime=prime_optimizer(optimizer))
