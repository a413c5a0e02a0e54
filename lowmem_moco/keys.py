"""Shuffle BN on one GPU: the key batch is permuted, encoded chunk by chunk, un-permuted.

With data parallel MoCo, each GPU normalises its keys with the BatchNorm statistics of its
own share of a shuffled batch, so a query and its key never share statistics. On one
device a permutation alone changes nothing (BatchNorm over a whole batch ignores order):
the statistics must be split, which running the chunks one after another does, at the
activation memory of a single chunk since no autograd graph is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def encode_keys(encoder_k: nn.Module, images: torch.Tensor, num_chunks: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised keys (NxC, fp32, in the order of `images`) from `num_chunks` equal chunks.

    Works for any norm layer (nn.BatchNorm2d, timm's BatchNormAct2d, ...) and memory
    format: the batch is split along its first dimension, never reshaped.
    """
    n = images.shape[0]
    perm = torch.randperm(n, generator=generator).to(images.device)
    shuffled = images[perm]
    if images.is_contiguous(memory_format=torch.channels_last) and images.dim() == 4:
        shuffled = shuffled.contiguous(memory_format=torch.channels_last)
    keys = torch.cat([encoder_k(chunk) for chunk in shuffled.chunk(num_chunks)])
    keys = F.normalize(keys.float(), dim=1)
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys
    return unshuffled
