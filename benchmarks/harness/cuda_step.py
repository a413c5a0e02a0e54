"""The training step of a config on a real GPU, built as lowmem_moco/trainer.py builds it, and its
peak memory: what the planner (lowmem_moco/plan/predict.py) predicts, measured."""

from __future__ import annotations

import copy
import gc

import torch
from accelerate import Accelerator

from lowmem_moco.data.lazy_views import CopiedView
from lowmem_moco.run_settings import view_dtype
from lowmem_moco.factory import build_model, build_step


def cuda_step_peaks(cfg, precision: str, checkpointing: bool, micro_batch: int) -> dict:
    """Bytes: max_memory_allocated and max_memory_reserved over the second step (the first
    creates the optimizer state and runs cuDNN's autotuning), and the memory in use outside
    PyTorch's allocator (the CUDA context, cuDNN/cuBLAS handles)."""
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    cfg = copy.deepcopy(cfg)
    cfg.train.grad_checkpointing = checkpointing
    moco = build_model(cfg, device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    step = build_step(cfg, moco, Accelerator(mixed_precision=precision), micro_batch)
    b, s = cfg.train.batch_size, cfg.data.image_size
    # Lazy views, as the pipeline hands them over: the batch waits in host memory and the step
    # copies one key chunk or micro-batch at a time to the GPU (what the planner plans).
    views = [CopiedView(torch.randn(b, 3, s, s).to(view_dtype(cfg, precision, "cuda")).pin_memory(), device, fmt)
             for _ in range(2)]
    generator = torch.Generator().manual_seed(1)
    try:
        step(*views, cfg.moco.momentum, generator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(*views, cfg.moco.momentum, generator)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return dict(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved(),
                    outside_allocator=total - free - torch.cuda.memory_reserved())
    finally:
        del step, moco, views
        gc.collect()
        torch.cuda.empty_cache()
