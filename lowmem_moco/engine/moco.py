"""The MoCo state: query encoder, its momentum copy, the queue of negatives (v2) or the
predictor (v3), and the losses.

Shapes: N = queries or keys in a batch, C = model.dim, K = moco.queue_size.

Beside the official facebookresearch/moco `moco/builder.py`, the same algorithm is spread
over the engine so that one step can run in micro-batches and key chunks:

    builder.py                                   lowmem-moco
    MoCo.__init__: f_q, f_k = copy of f_q,        MoCo.__init__ (head: backbones.py), queue KxC
      queue normalised along C
    _momentum_update_key_encoder                 MoCo.momentum_update (step.py calls it first)
    _batch_shuffle_ddp / _batch_unshuffle_ddp    keys.encode_keys (one device: chunked BatchNorm)
                                                 keys.encode_batch_keys (several processes)
    forward: q = normalize(f_q(im_q))            step.MoCoStep, per micro-batch
             k = normalize(f_k(im_k)), no grad   keys.encode_keys, for all B keys at once
             l_pos, l_neg, logits / T, labels 0  info_nce (in fp32)
             _dequeue_and_enqueue(k)             MoCo.enqueue, after the optimizer step
    concat_all_gather                            accelerator.gather (keys.py, distributed.py)

The queue is kept KxC here (the official code keeps CxK): one key per row, so enqueueing is
a row write.

MoCo v3 (facebookresearch/moco-v3 `moco/builder.py`): f_q and f_k both end in the projector
(their `head`), the predictor follows f_q only and is not part of the momentum update; there
is no queue (K = 0). Its step is gradcache.GradCacheStep; its loss `in_batch_nce`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import cosine_decay


class MoCo(nn.Module):
    """Holds f_q, f_k and the queue; the training step (step.py) decides when each is used."""

    def __init__(self, encoder: nn.Module, queue_size: int, dim: int, predictor: nn.Module | None = None):
        super().__init__()
        self.encoder_q = encoder
        self.predictor = predictor  # MoCo v3's, on the query side only; None under v2
        # The key encoder is made before any wrapping for mixed precision or data parallel, so
        # it stays a plain module with fp32 parameters that the EMA can update exactly.
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # KxC
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: f_q's parameters, then the predictor's (v3)."""
        return [*self.encoder_q.parameters(), *(self.predictor.parameters() if self.predictor is not None else [])]

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
        # The pointer stays on the queue's device: reading it on the host would wait for the GPU.
        slots = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size  # N rows of the KxC queue
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.add_(n).remainder_(size)


# The denominators of the two losses, per query q_i (s = cosine similarity, T = temperature):
#   infonce: exp(s(q_i, k_i)/T) + sum over the negatives exp(s(q_i, n)/T)
#   dcl:                          sum over the negatives exp(s(q_i, n)/T)
# (Yeh et al. 2021, arXiv 2110.06848, the decoupled loss L_DC,i = -s(q_i, k_i)/T + log U_i:
# the positive pair removed from the denominator U_i). The negatives n are
#   v2: the K queue keys (the batch's own keys are enqueued after the step, so k_i is not among them)
#   v3: the other N - 1 keys k_j, j != i, of the batch (MoCo v3's logits q_i . k_j; the paper's
#       SimCLR-form U_i also counts same-view pairs, which MoCo's loss never had)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             decoupled: bool = False) -> torch.Tensor:
    """Mean InfoNCE (or DCL when `decoupled`) of queries q (NxC, not yet normalised) against
    their keys k (NxC, normalised) and the negatives in queue (KxC). Always computed in fp32."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)  # NxC
        l_pos = (q * k.float()).sum(dim=1, keepdim=True)  # Nx1
        l_neg = q @ queue.float().t()  # NxK
        return _contrastive(l_pos, l_neg, temperature, decoupled)


def in_batch_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, decoupled: bool = False) -> torch.Tensor:
    """MoCo v3's ctr(q, k): queries q (NxC) against keys k (NxC), both not yet normalised; key
    k_j is query i's negative for every j != i. Times 2T, as the official loss. fp32."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).t()  # NxN
        l_pos = logits.diagonal().unsqueeze(1)  # Nx1
        own = torch.eye(len(logits), dtype=torch.bool, device=logits.device)  # NxN
        l_neg = logits.masked_fill(own, float("-inf"))  # NxN: the positive is not a negative
        return _contrastive(l_pos, l_neg, temperature, decoupled) * (2 * temperature)


def _contrastive(l_pos: torch.Tensor, l_neg: torch.Tensor, temperature: float, decoupled: bool) -> torch.Tensor:
    """Mean loss from positive similarities l_pos (Nx1) and negative ones l_neg (NxM; -inf: none)."""
    if decoupled:
        return (torch.logsumexp(l_neg / temperature, dim=1) - l_pos.squeeze(1) / temperature).mean()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+M)
    labels = torch.zeros(l_pos.shape[0], dtype=torch.long, device=l_pos.device)  # N; the positive is column 0
    return F.cross_entropy(logits, labels)


def momentum_at(step: int, total_steps: int, base: float, schedule: str) -> float:
    """EMA coefficient for this step: constant, or cosine-increased from base to 1 (BYOL)."""
    if schedule == "constant" or total_steps <= 1:
        return base
    return 1.0 - cosine_decay(1.0 - base, step / total_steps)
