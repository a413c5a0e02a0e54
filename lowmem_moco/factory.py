"""The model and the step a config describes: the one place training, the planner and the
benchmarks build them from, so each measures exactly what training runs.

    moco = build_model(cfg, device)                  # f_q, f_k and the queue (v2) or the predictor (v3)
    step = build_step(cfg, moco, accelerator)        # the optimizer (prepared) and the step
"""

from __future__ import annotations

import torch

from .backbones import enable_grad_checkpointing, encoder_from_config, predictor_from_config
from .compiled import compile_encoders
from .config import Config
from .engine.gradcache import GradCacheStep
from .engine.moco import MoCo
from .engine.step import MoCoStep
from .optim import build_optimizer
from .timm_args import BackbonePlan


def build_model(cfg: Config, device, plan: BackbonePlan | None = None) -> MoCo:
    """f_q (timm backbone + head), its momentum copy f_k and the queue (v2) or the predictor
    (v3, no queue), on `device`: the model that training, the benchmarks and the GPU check all
    start from. `plan`: the backbone's, when the caller has already worked it out (the trainer
    does, before any data work)."""
    encoder = encoder_from_config(cfg, plan)
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(encoder.backbone, cfg.model.arch)
    queue_size = cfg.moco.queue_size if cfg.moco.version == "v2" else 0
    moco = MoCo(encoder, queue_size, cfg.model.dim, predictor_from_config(cfg)).to(device)
    if cfg.train.channels_last:
        moco.to(memory_format=torch.channels_last)
    return moco


def build_step(cfg: Config, moco: MoCo, accelerator, micro_batch: int | None = None) -> MoCoStep | GradCacheStep:
    """The optimizer over f_q (and the predictor), prepared by `accelerator`, and the step that
    uses it (`step.encoder_q`, `step.optimizer`: the prepared ones). With train.compile, f_q's and
    f_k's backbones are compiled in place first (compiled.py: eager again if compiling fails)."""
    if cfg.train.compile:
        compile_encoders(moco)
    encoder_q, optimizer = accelerator.prepare(moco.encoder_q, build_optimizer(moco.trained_parameters(), cfg))
    return make_step(cfg, moco, optimizer, accelerator, micro_batch or cfg.micro_batch, encoder_q=encoder_q)


def make_step(cfg: Config, moco: MoCo, optimizer, accelerator, micro_batch: int, encoder_q=None,
              guard_bn_stats: bool | None = None, planning: bool = False) -> MoCoStep | GradCacheStep:
    """The step moco.version runs: v2's MoCoStep, v3's GradCacheStep (engine/gradcache.py).
    The planner calls this too, with its own optimizer and accelerator."""
    m = cfg.moco
    common = dict(micro_batch=micro_batch, key_chunks=m.key_chunks, temperature=m.temperature, encoder_q=encoder_q,
                  guard_bn_stats=cfg.train.grad_checkpointing if guard_bn_stats is None else guard_bn_stats,
                  planning=planning)
    if m.version == "v3":
        return GradCacheStep(moco, optimizer, accelerator, decoupled=m.loss == "dcl", **common)
    return MoCoStep(moco, optimizer, accelerator, symmetric=m.symmetric, decoupled=m.loss == "dcl",
                    shuffle_across_processes=m.shuffle_across_processes, **common)
