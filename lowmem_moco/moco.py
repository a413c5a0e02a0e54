"""The MoCo v2 state: query encoder, its momentum copy, the queue of negatives, the loss.

Shapes: N = queries or keys in a batch, C = model.dim, K = moco.queue_size.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class MoCo(nn.Module):
    """Holds f_q, f_k and the queue; the training step (step.py) decides when each is used."""

    def __init__(self, encoder: nn.Module, queue_size: int, dim: int):
        super().__init__()
        self.encoder_q = encoder
        # The key encoder is made before any wrapping for mixed precision or data parallel, so
        # it stays a plain module with fp32 parameters that the EMA can update exactly.
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # KxC
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only, in fp32.

        Buffers (BatchNorm running statistics) stay the key encoder's own, as in the paper.
        """
        k_params = [p for p in self.encoder_k.parameters()]
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO insert of NxC normalised keys, wrapping around the end for any K and N <= K."""
        n, size = keys.shape[0], self.queue.shape[0]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of queries q (NxC, not yet normalised) against their keys k (NxC,
    normalised) and the negatives in queue (KxC). Always computed in fp32."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        l_pos = (q * k.float()).sum(dim=1, keepdim=True)  # Nx1
        l_neg = q @ queue.float().t()  # NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
        return F.cross_entropy(logits, labels)


def momentum_at(step: int, total_steps: int, base: float, schedule: str) -> float:
    """EMA coefficient for this step: constant, or cosine-increased from base to 1 (BYOL)."""
    if schedule == "constant" or total_steps <= 1:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


# ---------------------------------------------------------------- BatchNorm statistics under N processes


def bn_snapshot(module: nn.Module) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(layer, running_mean, running_var, num_batches_tracked) of every BatchNorm that tracks stats."""
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def restore_bn(snapshot: list) -> None:
    """Put back the running statistics a `bn_snapshot` recorded."""
    for m, mean, var, n in snapshot:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(n)


@torch.no_grad()
def merge_bn_stats(snapshot: list, accelerator) -> None:
    """Set the running statistics, on every process, to what one process would hold had it run
    all processes' forward passes since `snapshot` one after another in rank order.

    Each process started from the same statistics and made n updates on its own share. An
    update is affine in the statistics (x <- (1 - mu) x + mu b, or a cumulative average when
    momentum is None), so the sequential result is a weighted sum of the processes' results:
    the running statistics then match the single-process run, not just rank 0's share.
    """
    if accelerator.num_processes == 1 or not snapshot:
        return
    flat = torch.cat([torch.cat([m.running_mean.flatten(), m.running_var.flatten()]).float()
                      for m, *_ in snapshot])
    every = accelerator.gather(flat[None])  # world x total, rank order
    counts_before = torch.stack([s[3] for s in snapshot])
    counts_after = torch.stack([s[0].num_batches_tracked for s in snapshot])
    starts, updates = counts_before.tolist(), (counts_after - counts_before).tolist()  # one device sync
    world, offset = every.shape[0], 0
    for (m, mean0, var0, _), n0, n in zip(snapshot, starts, updates):
        size = m.running_mean.numel()
        for buf, x0 in ((m.running_mean, mean0), (m.running_var, var0)):
            r = every[:, offset:offset + size].view(world, *buf.shape)
            offset += size
            if n == 0:
                continue
            x0 = x0.float()
            if m.momentum is None:  # cumulative average over all (n0 + world * n) batches
                sums = (n0 + n) * r - n0 * x0
                merged = (n0 * x0 + sums.sum(0)) / (n0 + world * n)
            else:
                d = (1.0 - m.momentum) ** n  # what n updates leave of the starting value
                merged = d ** world * x0
                for j in range(world):
                    merged = merged + d ** (world - 1 - j) * (r[j] - d * x0)
            buf.copy_(merged)
        if n:
            m.num_batches_tracked.fill_(n0 + world * n)
