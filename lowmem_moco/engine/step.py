"""One MoCo v2 optimizer step over an effective batch B, in micro-batches.

    1. momentum update of f_k (once per step, before the keys, as the official code does)
    2. keys for all B key views: shuffled, chunked, no autograd (keys.py)
    3. per micro-batch: queries under autocast, fp32 loss against that micro-batch's own keys
       and the queue as it stood before the step; backward (gradients accumulate)
    4. one optimizer step, then one enqueue of the B keys

Since a query's loss depends only on (q_i, k_i, queue), accumulating micro-batches gives the
gradient of the whole batch; BatchNorm sees one micro-batch at a time, exactly like per-GPU
BatchNorm in the 8-GPU recipe. Peak memory follows the micro-batch and chunk size, not B.

Under N processes (DDP through accelerate) each process gets B/N images: its micro-batches
sync gradients only on the last one, DDP averages the processes' gradients (each already the
mean over its share), so the update is the one of the whole-batch mean loss. Keys are
gathered in rank order and enqueued identically everywhere, and BatchNorm running
statistics are merged to the values a single process would hold (distributed.merge_bn_stats).

The views are tensors or lazy views (views.py): lazy ones are made one key chunk and one
micro-batch at a time, so neither view of the whole batch ever exists at once (except the key
view under `moco.shuffle_across_processes`, whose images every process gathers).

Shapes: n = this process's share of the effective batch B, m = micro_batch, C = model.dim,
K = moco.queue_size, world = number of processes (n x world = B).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .keys import encode_batch_keys
from .distributed import bn_snapshot, merge_bn_stats, restore_bn
from .moco import MoCo, info_nce
from .views import View, take


@dataclass
class StepResult:
    loss: float  # mean per-query loss over the effective batch, all processes (sum of both directions if symmetric)
    skipped: bool  # True when the loss was not finite and nothing was updated


class MoCoStep:
    def __init__(self, moco: MoCo, optimizer, accelerator, *, micro_batch: int, key_chunks: int,
                 temperature: float, symmetric: bool = False, decoupled: bool = False,
                 encoder_q: nn.Module | None = None,
                 guard_bn_stats: bool = False, shuffle_across_processes: bool = False, planning: bool = False):
        self.moco = moco
        self.encoder_q = encoder_q if encoder_q is not None else moco.encoder_q  # may be DDP-wrapped
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.micro_batch = micro_batch
        self.key_chunks = key_chunks
        self.temperature = temperature
        self.symmetric = symmetric
        self.decoupled = decoupled  # moco.loss=dcl (moco.py: which terms each loss's denominator holds)
        self.shuffle_across_processes = shuffle_across_processes
        # Checkpointing re-runs the forward in backward, which would update BatchNorm running
        # statistics twice; they are put back after each backward.
        self.guard_bn_stats = guard_bn_stats
        # The planner (plan/predict.py) runs this step on fake tensors, which have shapes but no values:
        # it reads no loss and takes the finite-loss branch.
        self.planning = planning

    def __call__(self, view_q: View, view_k: View, momentum: float,
                 generator: torch.Generator | None = None) -> StepResult:
        acc, moco = self.accelerator, self.moco
        moco.momentum_update(momentum)  # theta_k <- m theta_k + (1 - m) theta_q
        world = acc.num_processes
        with acc.autocast():
            # (whole batch for the queue, this process's share for the loss): all_k (world*n)xC, keys_k nxC
            all_k, keys_k = encode_batch_keys(moco.encoder_k, view_k, self.key_chunks, generator, acc,
                                              self.shuffle_across_processes)
            all_q, keys_q = encode_batch_keys(moco.encoder_k, view_q, self.key_chunks, generator, acc,
                                              self.shuffle_across_processes) if self.symmetric else (None, None)
        queue = moco.queue  # KxC; enqueued only after every micro-batch's backward
        bn_before = bn_snapshot(moco.encoder_q) if world > 1 else []

        pairs = [(view_q, keys_k)] + ([(view_k, keys_q)] if self.symmetric else [])
        n_micro = len(view_q) // self.micro_batch  # view_q, view_k: nx3xHxW (this process's share)
        total = torch.zeros((), device=keys_k.device)
        for i in range(n_micro):
            part = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            last = i == n_micro - 1
            # Gradients are synchronised across processes on the final micro-batch only.
            with contextlib.nullcontext() if last else acc.no_sync(self.encoder_q):
                for images, keys in pairs:
                    with acc.autocast():
                        # The micro-batch's views are made here (lazy views) and freed after its backward.
                        q = self.encoder_q(take(images, part))  # mxC, m = micro_batch, not yet normalised
                    loss = info_nce(q, keys[part], queue, self.temperature, self.decoupled) / n_micro  # scalar; keys[part]: mxC
                    saved = bn_snapshot(moco.encoder_q) if self.guard_bn_stats else []
                    acc.backward(loss)
                    restore_bn(saved)
                    total += loss.detach()

        merge_bn_stats(bn_before, acc)
        if world > 1:  # every process takes the same decision to step or skip
            total = acc.reduce(total, reduction="mean")
        result = optimizer_step(self.optimizer, total, self.planning)
        if not result.skipped:
            moco.enqueue(torch.cat([all_q, all_k]) if self.symmetric else all_k)  # (world*n)xC, twice if symmetric
        return result


def optimizer_step(optimizer, total: torch.Tensor, planning: bool) -> StepResult:
    """The optimizer step when the loss `total` (a scalar) is finite, else no update; gradients
    cleared either way. `planning` (fake tensors, no values): no loss read, always a step."""
    # One read of the loss serves the log and the finite check: each read waits for the GPU.
    loss_value = float("nan") if planning else float(total)
    skipped = not planning and not math.isfinite(loss_value)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, skipped=skipped)
