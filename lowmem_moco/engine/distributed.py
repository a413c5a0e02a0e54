"""What exists only for several processes (and the BatchNorm bookkeeping it needs).

`bn_snapshot` / `restore_bn` record and put back BatchNorm running statistics; the step also
uses them on one process, to undo the second forward that gradient checkpointing runs.
`merge_bn_stats` makes every process's running statistics those of one process that ran
all processes' forward passes in rank order.
"""

from __future__ import annotations

import torch
from torch import nn


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
