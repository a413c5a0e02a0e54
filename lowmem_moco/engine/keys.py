"""Shuffle BN on one GPU: the key batch is permuted, encoded chunk by chunk, un-permuted.

With data parallel MoCo, each GPU normalises its keys with the BatchNorm statistics of its
own share of a shuffled batch, so a query and its key never share statistics. On one
device a permutation alone changes nothing (BatchNorm over a whole batch ignores order):
the statistics must be split, which running the chunks one after another does, at the
activation memory of a single chunk since no autograd graph is kept.

Under N processes (`encode_batch_keys`) each process encodes its own share in
`moco.key_chunks` chunks, and the keys of all processes are gathered in rank order, which is
the order of the effective batch. With `moco.shuffle_across_processes` the key images are
first gathered and permuted with a seed every process shares, as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import bn_snapshot, merge_bn_stats


@torch.no_grad()
def encode_keys(encoder_k: nn.Module, images: torch.Tensor, num_chunks: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised keys (NxC, fp32, in the order of `images`) from `num_chunks` equal chunks.

    Works for any norm layer (nn.BatchNorm2d, timm's BatchNormAct2d, ...) and memory
    format: the batch is split along its first dimension, never reshaped.
    """
    n = images.shape[0]
    perm = torch.randperm(n, generator=generator).to(images.device)  # n
    keys = _encode_in_chunks(encoder_k, _same_layout(images[perm], images), num_chunks)  # nxC, shuffled order
    unshuffled = torch.empty_like(keys)  # nxC
    unshuffled[perm] = keys  # back to the order of `images`
    return unshuffled


def _same_layout(selected: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Indexing returns a contiguous tensor: keep channels_last inputs channels_last."""
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
        return selected.contiguous(memory_format=torch.channels_last)
    return selected


def _encode_in_chunks(encoder_k: nn.Module, images: torch.Tensor, num_chunks: int) -> torch.Tensor:
    keys = torch.cat([encoder_k(chunk) for chunk in images.chunk(num_chunks)])  # nxC; BatchNorm per chunk
    return F.normalize(keys.float(), dim=1)


@torch.no_grad()
def encode_batch_keys(encoder_k: nn.Module, images: torch.Tensor, num_chunks: int,
                      generator: torch.Generator | None, accelerator,
                      shuffle_across_processes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys of the whole effective batch, keys of this process's `images`), both in batch order.

    `images` is this process's share; `generator` must be in the same state on every process.
    The first result is the same on every process (it is what gets enqueued). With one
    process both are `encode_keys(encoder_k, images, num_chunks, generator)`.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        keys = encode_keys(encoder_k, images, num_chunks, generator)
        return keys, keys
    n = images.shape[0]
    before = bn_snapshot(encoder_k)
    if shuffle_across_processes:
        # Every process holds the whole key batch in rank order, draws the same permutation,
        # encodes its own slice of it: a single process with N x num_chunks chunks and the same
        # generator forms exactly the same BatchNorm groups.
        everything = accelerator.gather(images)  # (world*n)x3xHxW, rank order
        perm = torch.randperm(world * n, generator=generator).to(images.device)  # world*n
        mine = _same_layout(everything[perm[rank * n:(rank + 1) * n]], images)  # nx3xHxW
        shuffled = accelerator.gather(_encode_in_chunks(encoder_k, mine, num_chunks))  # (world*n)xC
        all_keys = torch.empty_like(shuffled)
        all_keys[perm] = shuffled  # (world*n)xC, batch order
    else:
        all_keys = accelerator.gather(encode_keys(encoder_k, images, num_chunks, generator))  # (world*n)xC
    merge_bn_stats(before, accelerator)  # the key encoder's running statistics stay identical everywhere
    return all_keys, all_keys[rank * n:(rank + 1) * n]
