"""One MoCo v3 optimizer step over an effective batch B at any micro-batch, exactly: a
representation-gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup", arXiv 2101.06983).

MoCo v3's loss compares every query with every key of the batch, so, unlike v2's (step.py), it
does not split into per-micro-batch losses. It splits at the backbone's output instead: the
loss needs the backbone only through its B outputs per view, which are small (Bxd).

    1. momentum update of f_k (backbone and projector; the predictor has no momentum copy)
    2. keys, both views: f_k's backbone in `moco.key_chunks` shuffled chunks without autograd
       (keys.encode_keys), then f_k's projector over all B at once
    3. queries, both views: f_q's backbone in micro-batches without autograd; its outputs
       (Bxd per view) are kept, and the RNG state before each micro-batch
    4. projector, predictor and loss over all B with autograd, from the kept outputs as leaf
       tensors: the heads' gradients, and the loss's gradient w.r.t. each output (Bxd per view)
    5. per micro-batch: f_q's backbone again, with autograd and the RNG state of step 3 put back
       (drop path and dropout draw the same masks), then backward from its outputs with their
       cached gradient: the chain rule finishes what step 4 started
    6. one optimizer step

At micro-batch B, steps 3 and 5 are one forward with autograd: no cache, no second forward.

Exactness: the projector's and predictor's BatchNorms see all B of a view, as the official
SyncBatchNorm does across GPUs. A backbone without BatchNorm (a ViT: LayerNorm is per token)
gives each image the output it would give in any batch, so every micro-batch size computes the
whole-batch step (to float rounding). A BatchNorm backbone sees one micro-batch at a time, as
per-GPU BatchNorm does; its running statistics are updated once per image: the second forward's
updates are undone (distributed.bn_snapshot / restore_bn).

Mixed precision: the forwards run under autocast and the loss in fp32 (moco.in_batch_nce).
Loss scaling (fp16) is applied exactly once, by `accelerator.backward` in step 4: the cached
gradients are those of the scaled loss, and step 5's backward passes them on unchanged, so
every gradient carries the scale once and the optimizer step unscales them all.

Memory: the backbone's autograd graph exists for one micro-batch at a time (step 5); the
whole batch costs its outputs, their gradients and the heads' activations (Bx4096 per layer).
Time: one more backbone forward over both views than the whole-batch step. Lazy views
(views.py) are made three times per step (key chunks, both passes); each sample's view is a
function of its own seed, so every pass sees the same images.

One process only (validation.validate_for_processes). Shapes: B = effective batch, m =
micro_batch, d = the backbone's width, C = model.dim.
"""

from __future__ import annotations

import contextlib

import torch

from .distributed import bn_snapshot, restore_bn
from .keys import encode_keys
from .moco import MoCo, in_batch_nce
from .step import StepResult, optimizer_step
from .views import View, take, whole


def rng_state(device: torch.device) -> tuple:
    """The global RNG state random ops on `device` draw from: (CPU state, CUDA state or None)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_rng(state: tuple, device: torch.device):
    """Runs the block from the RNG `state` (rng_state's), then leaves the global RNG as it was
    before the block: a replayed forward draws the same numbers and consumes none."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class GradCacheStep:
    """MoCo v3's step (module docstring); the same call and result as step.MoCoStep."""

    def __init__(self, moco: MoCo, optimizer, accelerator, *, micro_batch: int, key_chunks: int,
                 temperature: float, decoupled: bool = False, encoder_q=None, guard_bn_stats: bool = False,
                 planning: bool = False):
        self.moco = moco
        self.encoder_q = encoder_q if encoder_q is not None else moco.encoder_q  # what the trainer reads
        self.backbone, self.projector = moco.encoder_q.backbone, moco.encoder_q.head
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.micro_batch = micro_batch
        self.key_chunks = key_chunks
        self.temperature = temperature
        self.decoupled = decoupled  # moco.loss=dcl
        # Checkpointing re-runs the forward in backward: its BatchNorm updates are undone (step.py).
        self.guard_bn_stats = guard_bn_stats
        self.planning = planning  # fake tensors (plan/predict.py): no loss value to read
        self.device = next(moco.encoder_q.parameters()).device

    def __call__(self, view_q: View, view_k: View, momentum: float,
                 generator: torch.Generator | None = None) -> StepResult:
        acc, moco = self.accelerator, self.moco
        moco.momentum_update(momentum)  # theta_k <- m theta_k + (1 - m) theta_q
        views = (view_q, view_k)  # Bx3xHxW each (or lazy)
        with acc.autocast():
            keys = [self._keys(view, generator) for view in views]  # 2 x BxC, of views 1 and 2
        cached = self.micro_batch < len(view_q)
        if cached:
            outputs, states = zip(*(self._encode_without_graph(view) for view in views))
            features = [f.detach().requires_grad_() for f in outputs]  # 2 x Bxd, leaves of step 4's graph
        else:
            with acc.autocast():
                features = [self.backbone(whole(view)) for view in views]  # 2 x Bxd, with autograd
        with acc.autocast():
            q = [moco.predictor(self.projector(f)) for f in features]  # 2 x BxC
        # MoCo v3: ctr(q1, k2) + ctr(q2, k1), each query against all B keys of the other view
        loss = (in_batch_nce(q[0], keys[1], self.temperature, self.decoupled)
                + in_batch_nce(q[1], keys[0], self.temperature, self.decoupled))  # scalar, fp32
        saved = bn_snapshot(self.backbone) if self.guard_bn_stats and not cached else []
        acc.backward(loss)  # the one loss scaling: the cached gradients below are of the scaled loss
        restore_bn(saved)
        if cached:
            for view, f, view_states in zip(views, features, states):
                self._backward_through_backbone(view, f.grad, view_states)  # f.grad: Bxd
        return optimizer_step(self.optimizer, loss.detach(), self.planning)

    def _parts(self, n: int) -> list[slice]:
        return [slice(i, i + self.micro_batch) for i in range(0, n, self.micro_batch)]

    @torch.no_grad()
    def _keys(self, view: View, generator: torch.Generator | None) -> torch.Tensor:
        """f_k's outputs (BxC, not normalised): the backbone in shuffled key chunks, the
        projector over the whole batch (its BatchNorm sees all B, as for the queries)."""
        features = encode_keys(self.moco.encoder_k.backbone, view, self.key_chunks, generator, normalize=False)  # Bxd
        return self.moco.encoder_k.head(features)  # BxC

    @torch.no_grad()
    def _encode_without_graph(self, view: View) -> tuple[torch.Tensor, list[tuple]]:
        """(f_q's backbone outputs, Bxd; the RNG state before each micro-batch's forward)."""
        outputs, states = [], []
        for part in self._parts(len(view)):
            states.append(rng_state(self.device))
            with self.accelerator.autocast():
                outputs.append(self.backbone(take(view, part)))  # mxd; the micro-batch's views freed after
        return torch.cat(outputs), states

    def _backward_through_backbone(self, view: View, grad: torch.Tensor, states: list[tuple]) -> None:
        """Step 5: each micro-batch's forward again, with autograd, then its backward from `grad`."""
        for part, state in zip(self._parts(len(view)), states):
            # The first forward updated the running statistics for these images already.
            saved = bn_snapshot(self.backbone)
            with replayed_rng(state, self.device), self.accelerator.autocast():
                outputs = self.backbone(take(view, part))  # mxd, the same values as in step 3
            torch.autograd.backward(outputs, grad_tensors=grad[part])  # grad[part]: mxd
            restore_bn(saved)
