"""The model and the step a config describes: the one place training, the planner and the
benchmarks build them from, so each measures exactly what training runs.

    moco = build_model(cfg, device)                  # f_q, f_k and the queue
    step = build_step(cfg, moco, accelerator)        # the optimizer (prepared) and MoCoStep
"""

from __future__ import annotations

import torch

from .backbones import enable_grad_checkpointing, encoder_from_config
from .compiled import compile_encoders
from .config import Config
from .engine.moco import MoCo
from .engine.step import MoCoStep
from .optim import build_optimizer
from .timm_args import BackbonePlan


def build_model(cfg: Config, device, plan: BackbonePlan | None = None) -> MoCo:
    """f_q (timm backbone + head), its momentum copy f_k and the queue, on `device`: the model
    that training, the benchmarks and the GPU check all start from. `plan`: the backbone's, when
    the caller has already worked it out (the trainer does, before any data work)."""
    encoder = encoder_from_config(cfg, plan)
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(encoder.backbone, cfg.model.arch)
    moco = MoCo(encoder, cfg.moco.queue_size, cfg.model.dim).to(device)
    if cfg.train.channels_last:
        moco.to(memory_format=torch.channels_last)
    return moco


def build_step(cfg: Config, moco: MoCo, accelerator, micro_batch: int | None = None) -> MoCoStep:
    """The optimizer over f_q, prepared by `accelerator`, and the step that uses it
    (`step.encoder_q`, `step.optimizer`: the prepared ones). With train.compile, f_q's and f_k's
    backbones are compiled in place first (compiled.py: eager again if compiling fails)."""
    if cfg.train.compile:
        compile_encoders(moco)
    encoder_q, optimizer = accelerator.prepare(moco.encoder_q, build_optimizer(moco.encoder_q.parameters(), cfg))
    return MoCoStep(moco, optimizer, accelerator, micro_batch=micro_batch or cfg.micro_batch,
                    key_chunks=cfg.moco.key_chunks, temperature=cfg.moco.temperature, symmetric=cfg.moco.symmetric,
                    encoder_q=encoder_q, guard_bn_stats=cfg.train.grad_checkpointing,
                    shuffle_across_processes=cfg.moco.shuffle_across_processes)
