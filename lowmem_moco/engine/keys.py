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
from .views import View, same_layout, take, whole


@torch.no_grad()
def encode_keys(encoder_k: nn.Module, images: View, num_chunks: int,
                generator: torch.Generator | None = None, normalize: bool = True) -> torch.Tensor:
    """Normalised keys (NxC, fp32, in the order of `images`) from `num_chunks` equal chunks;
    normalize=False: `encoder_k`'s outputs as they are (MoCo v3 runs the key backbone here and
    its projector over the whole batch after).

    `images` is a tensor or a lazy view (views.py): each chunk's images are taken (made) just
    before it is encoded. Works for any norm layer (nn.BatchNorm2d, timm's BatchNormAct2d, ...)
    and memory format: the batch is split along its first dimension, never reshaped.
    """
    perm = torch.randperm(len(images), generator=generator)  # n, on the CPU
    keys = _encode_in_chunks(encoder_k, images, perm.chunk(num_chunks), normalize)  # nxC, shuffled order
    unshuffled = torch.empty_like(keys)  # nxC
    unshuffled[perm.to(keys.device, non_blocking=True)] = keys  # back to the order of `images`
    return unshuffled


def _encode_in_chunks(encoder_k: nn.Module, images: View, chunks: tuple[torch.Tensor, ...],
                      normalize: bool = True) -> torch.Tensor:
    # One chunk's views exist at a time; BatchNorm sees one chunk at a time.
    keys = torch.cat([encoder_k(take(images, rows)) for rows in chunks])  # nxC
    return F.normalize(keys.float(), dim=1) if normalize else keys


@torch.no_grad()
def encode_batch_keys(encoder_k: nn.Module, images: View, num_chunks: int,
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
    n = len(images)
    before = bn_snapshot(encoder_k)
    if shuffle_across_processes:
        # Every process holds the whole key batch in rank order, draws the same permutation,
        # encodes its own slice of it: a single process with N x num_chunks chunks and the same
        # generator forms exactly the same BatchNorm groups.
        local = whole(images)  # nx3xHxW: the shuffle across processes needs this share's key views made
        everything = same_layout(accelerator.gather(local), local)  # (world*n)x3xHxW, rank order
        perm = torch.randperm(world * n, generator=generator)  # world*n
        mine = perm[rank * n:(rank + 1) * n]  # n rows of `everything`
        shuffled = accelerator.gather(_encode_in_chunks(encoder_k, everything, mine.chunk(num_chunks)))  # (world*n)xC
        all_keys = torch.empty_like(shuffled)
        all_keys[perm.to(shuffled.device)] = shuffled  # (world*n)xC, batch order
    else:
        all_keys = accelerator.gather(encode_keys(encoder_k, images, num_chunks, generator))  # (world*n)xC
    merge_bn_stats(before, accelerator)  # the key encoder's running statistics stay identical everywhere
    return all_keys, all_keys[rank * n:(rank + 1) * n]
