"""Evaluation of a frozen backbone: weighted kNN and a linear probe on cached features.

Both work on features extracted once (`extract_features`), so evaluation costs one
forward pass over each split and then only cheap matrix work on small tensors.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import Tensor, nn

from ..optim import cosine_decay


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Put `module` in eval mode, then give every submodule back its own flag: a model with
    some parts deliberately frozen in eval mode (e.g. BatchNorm) comes back exactly as it was."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was_training in modes:
            m.training = was_training


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader,
    device,
    *,
    autocast=contextlib.nullcontext,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run `backbone` over `loader` and return L2-normalised features and labels.

    `loader` yields `(images, labels)`. `autocast` is a zero-argument callable that
    returns a context manager (e.g. `accelerator.autocast`). The backbone is put in
    eval mode for the pass and every submodule's own mode is restored afterwards.

    Returns `(features [N, D] float32, labels [N] int64)`, both on the CPU so that
    large sets do not hold accelerator memory.
    """
    feats, labels = [], []
    with eval_mode(backbone):
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = backbone(images)
            # Normalise in float32: half-precision norms lose accuracy on wide features.
            out = F.normalize(out.float().flatten(1), dim=1)
            feats.append(out.cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    if not feats:
        raise ValueError("extract_features got an empty loader")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores, as in InstDisc and the MoCo CIFAR-10 demo.

    Features must already be L2-normalised, so a dot product is the cosine
    similarity. Each query takes its `k` most similar bank entries (k is clipped to
    the bank size), weights each by `exp(sim / t)` and sums the weights per class.
    Queries are processed `chunk_size` at a time, so memory is O(chunk_size * N_bank)
    rather than O(N_query * N_bank).

    Returns float32 scores `[N_query, num_classes]` on the bank's device.
    Note: with float32, `exp(1 / t)` overflows for t below about 0.0113.
    """
    if bank.dim() != 2 or queries.dim() != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be [N, D] with equal D")
    if bank.shape[0] == 0 or bank.shape[0] != bank_labels.shape[0]:
        raise ValueError("the bank must be non-empty and have one label per row")
    if k < 1 or t <= 0 or chunk_size < 1:
        raise ValueError("need k >= 1, t > 0 and chunk_size >= 1")
    bank = bank.float()
    bank_labels = bank_labels.to(bank.device).long()
    # Check once here: an out-of-range label would otherwise be a device-side assert on GPU.
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes})")
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size].to(bank.device).float()
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / t).exp()
        chunk_scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
        chunk_scores.scatter_add_(1, bank_labels[idx], weights)
        scores.append(chunk_scores)
    if not scores:
        return torch.zeros(0, num_classes, device=bank.device)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracy in percent for each k, as `{"top1": ..., "top5": ...}` (timm.utils.accuracy,
    computed in float32; a k larger than the number of classes is clipped, and so scores 100%)."""
    if scores.shape[0] != labels.shape[0] or scores.shape[0] == 0:
        raise ValueError("need one label per score row and at least one row")
    found = accuracy(scores, labels.to(scores.device).long(), topk=ks)
    return {f"top{k}": float(value) for k, value in zip(ks, found)}


def _ks(num_classes: int) -> tuple[int, ...]:
    # Top-5 says nothing when there are five classes or fewer.
    return (1, 5) if num_classes > 5 else (1,)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=200, t=0.1) -> dict:
    """Weighted-kNN accuracy in percent: `{"top1": ...}` plus `"top5"` when num_classes > 5."""
    scores = knn_predict(bank, bank_labels, queries, num_classes, k=k, t=t)
    return topk_accuracy(scores, query_labels, _ks(num_classes))


def knn_monitor(encoder: nn.Module, data, cfg, device, autocast=contextlib.nullcontext) -> float:
    """Weighted kNN top-1 (%) of data.val against a bank of data.train (eval views), as training
    monitors it. eval.knn_features picks the backbone's pooled features or the head's output (the
    official CIFAR-10 notebook's monitor); eval.knn_max_train caps the bank (0: every image)."""
    from ..data.two_views import eval_loader

    train = data.train
    bank_size = min(len(train), cfg.eval.knn_max_train or len(train))
    if bank_size < len(train):  # a fixed random subset: the same bank at every evaluation
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:bank_size].tolist())
    model = encoder if cfg.eval.knn_features == "head" else encoder.backbone
    (bank, bank_y), (val, val_y) = [
        extract_features(model, eval_loader(cfg, images, max(64, cfg.micro_batch), pin_memory=device.type == "cuda"),
                         device, autocast=autocast, channels_last=cfg.train.channels_last)
        for images in (train, data.val)]
    bank, bank_y, val = bank.to(device), bank_y.to(device), val.to(device)  # bank: NxD, val: MxD
    return knn_accuracy(bank, bank_y, val, val_y.to(device), len(data.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t)["top1"]


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 1024,
    device="cpu",
    seed: int = 0,
) -> dict:
    """Train a linear classifier on frozen features and report validation accuracy.

    Features are standardised with the training set's per-dimension mean and std.
    The classifier starts at zero (the problem is convex, so no random init is
    needed) and is trained with AdamW and a per-step cosine schedule; Adam's
    scale-free steps make one default learning rate work across feature widths.
    Shuffling uses a generator seeded with `seed`, so a run is repeatable.
    Both splits are moved to `device` whole (50k x 2048 float32 is about 400 MB).

    Returns `{"top1": ...}` plus `"top5"` when num_classes > 5, in percent.
    """
    if train_feats.shape[0] != train_labels.shape[0] or val_feats.shape[0] != val_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError("need non-empty training and validation sets with equal feature widths")
    if epochs < 1 or batch_size < 1:
        raise ValueError("need epochs >= 1 and batch_size >= 1")

    x_train = train_feats.to(device).float()
    y_train = train_labels.to(device).long()
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True).clamp_min(1e-6)  # constant dims stay finite
    x_train = (x_train - mean) / std
    x_val = (val_feats.to(device).float() - mean) / std
    y_val = val_labels.to(device).long()

    clf = nn.Linear(x_train.shape[1], num_classes).to(device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.0)  # AdamW's default would be 0.01
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                for group in opt.param_groups:
                    group["lr"] = cosine_decay(lr, step / total_steps)
                loss = F.cross_entropy(clf(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1

    with torch.no_grad():
        scores = torch.cat([clf(x_val[i:i + batch_size]) for i in range(0, x_val.shape[0], batch_size)])
    return topk_accuracy(scores, y_val, _ks(num_classes))


def linear_probe_augmented(
    backbone: nn.Module,
    train_loader,
    val_loader,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 30.0,
    device="cpu",
    seed: int = 0,
    autocast=contextlib.nullcontext,
) -> dict:
    """The MoCo paper's linear protocol: a frozen backbone (eval mode), a linear layer on its
    raw pooled features of freshly augmented crops every epoch, SGD (momentum 0.9, no weight
    decay) at lr 30, divided by 10 at 60% and 80% of the epochs; top-1/top-5 on centre crops.

    Costs a backbone forward per image per epoch (the cached probe costs one in all).
    """
    clf = None
    with eval_mode(backbone):
        for epoch in range(epochs):
            scale = 0.1 ** sum(epoch >= round(f * epochs) for f in (0.6, 0.8))
            for images, labels in train_loader:
                with torch.no_grad(), autocast():
                    feats = backbone(images.to(device, non_blocking=True)).float().flatten(1)
                if clf is None:  # the width is known once a batch went through
                    clf, opt = _paper_classifier(feats.shape[1], num_classes, lr, device, seed)
                for group in opt.param_groups:
                    group["lr"] = lr * scale
                with torch.enable_grad():
                    loss = F.cross_entropy(clf(feats), torch.as_tensor(labels).long().to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
        if clf is None:
            raise ValueError("linear_probe_augmented got an empty training loader")
        scores, targets = [], []
        with torch.no_grad():
            for images, labels in val_loader:
                with autocast():
                    feats = backbone(images.to(device, non_blocking=True)).float().flatten(1)
                scores.append(clf(feats).cpu())
                targets.append(torch.as_tensor(labels).long())
    return topk_accuracy(torch.cat(scores), torch.cat(targets), _ks(num_classes))


def _paper_classifier(width: int, num_classes: int, lr: float, device, seed: int):
    clf = nn.Linear(width, num_classes).to(device)
    with torch.no_grad():  # the official linear-classification script's initialisation
        clf.weight.copy_(0.01 * torch.randn(clf.weight.shape, generator=torch.Generator().manual_seed(seed)))
        clf.bias.zero_()
    return clf, torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
