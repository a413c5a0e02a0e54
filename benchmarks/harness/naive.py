"""The naive single-GPU MoCo v2 step, as a user writes it from the blog posts.

It is the baseline the suite compares the project's step (lowmem_moco/engine/step.py) with, so it
keeps every habit that costs memory or speed and nothing else:

- fp32 throughout, no checkpointing;
- the key encoder is a plain deep copy, so its parameters still require gradients and its
  forward records a full autograd graph (activations kept) until the keys are `.detach()`ed;
- the whole key batch goes through the key encoder at once: no shuffle, no split;
- the queue is a tensor that grows by concatenation and is trimmed back to K.

The model (lowmem_moco.backbones.build_encoder), loss maths, optimizer and hyper-parameters
are the project's, so a ratio between the two steps compares like with like.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class NaiveMoCo:
    """One call = one optimizer step on a batch of (query views, key views)."""

    def __init__(self, encoder: nn.Module, optimizer: torch.optim.Optimizer, queue_size: int, dim: int,
                 temperature: float, momentum: float, device: torch.device):
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)  # requires_grad left on, as in the blog code
        self.optimizer = optimizer
        self.queue_size, self.temperature, self.momentum = queue_size, temperature, momentum
        # Start from a full queue so that every measured step sees K negatives, like the project's.
        self.queue = F.normalize(torch.randn(queue_size, dim, device=device), dim=1)

    def __call__(self, x_q: torch.Tensor, x_k: torch.Tensor) -> float:
        self.optimizer.zero_grad()
        q = self.encoder_q(x_q)
        k = self.encoder_k(x_k)  # autograd graph and activations kept until the detach
        k = k.detach()
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)

        l_pos = (q * k).sum(dim=1, keepdim=True)  # Nx1
        l_neg = q @ self.queue.t()  # NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        self.optimizer.step()

        self.queue = torch.cat([self.queue, k])  # enqueue ...
        if self.queue.shape[0] > self.queue_size:
            self.queue = self.queue[-self.queue_size:]  # ... and dequeue the oldest
        for p_k, p_q in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            p_k.data.copy_(self.momentum * p_k.data + p_q.data * (1.0 - self.momentum))
        return loss.item()
