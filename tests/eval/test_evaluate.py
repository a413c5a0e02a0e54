import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowmem_moco.eval.probes import (
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    linear_probe_augmented,
    topk_accuracy,
)

# Three unit vectors: class 0 on the x axis, class 1 on both ends of the y axis.
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
BANK_LABELS = torch.tensor([0, 1, 1])


def test_knn_weighted_vote_beats_majority():
    # Query on the x axis: sims are 1, 0, 0. With t=0.1 class 0 gets e^10 while
    # class 1 gets e^0 + e^0 = 2, so the weighted vote picks 0 though 1 has the majority.
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(BANK, BANK_LABELS, q, num_classes=2, k=3, t=0.1)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(10.0), 2.0]]))
    assert scores.argmax(1).item() == 0


def test_knn_k_larger_than_bank_and_k_cut():
    # Sims of (0.6, 0.8) to the bank are 0.6, 0.8, -0.8; t=0.5 doubles them.
    q = torch.tensor([[0.6, 0.8]])
    all_three = [math.exp(1.2), math.exp(1.6) + math.exp(-1.6), 0.0]
    scores = knn_predict(BANK, BANK_LABELS, q, num_classes=3, k=50, t=0.5)  # k clipped to 3
    torch.testing.assert_close(scores, torch.tensor([all_three]))
    top_two = knn_predict(BANK, BANK_LABELS, q, num_classes=3, k=2, t=0.5)  # drops the -0.8 neighbour
    torch.testing.assert_close(top_two, torch.tensor([[math.exp(1.2), math.exp(1.6), 0.0]]))


def test_knn_chunking_matches_single_pass():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    queries = F.normalize(torch.randn(37, 16, generator=g), dim=1)
    whole = knn_predict(bank, labels, queries, 7, k=20, t=0.1, chunk_size=4096)
    for chunk in (1, 5):
        torch.testing.assert_close(knn_predict(bank, labels, queries, 7, k=20, t=0.1, chunk_size=chunk), whole, rtol=1e-5, atol=0)


def test_knn_accuracy_keys():
    acc = knn_accuracy(BANK, BANK_LABELS, BANK, BANK_LABELS, num_classes=2, k=1)
    assert acc == {"top1": 100.0}  # no top5 with two classes
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    labels = torch.arange(40) % 10
    acc = knn_accuracy(feats, labels, feats, labels, num_classes=10, k=1)
    assert acc == {"top1": 100.0, "top5": 100.0}  # each query finds itself


def test_topk_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2], [0.5, 0.0, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == {"top1": 50.0, "top2": 100.0, "top5": 100.0}  # k=5 clipped to 3 classes


def _clusters(n_per_class, num_classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + 0.5 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_linear_probe_separable():
    x_tr, y_tr = _clusters(20, 10, 64, seed=0)
    g = torch.Generator().manual_seed(99)
    centers_only = _clusters(1, 10, 64, seed=0)[0]  # same centres, fresh noise for validation
    x_va = centers_only.repeat_interleave(20, 0) + 0.5 * torch.randn(200, 64, generator=g)
    y_va = torch.arange(10).repeat_interleave(20)
    acc = linear_probe(x_tr, y_tr, x_va, y_va, 10, epochs=20, batch_size=100)
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0


def test_linear_probe_random_labels_near_chance_and_deterministic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 64, generator=g)
    y = torch.randint(0, 10, (1000,), generator=g)
    args = (x[:500], y[:500], x[500:], y[500:], 10)
    acc = linear_probe(*args, epochs=20, batch_size=250, seed=5)
    assert acc["top1"] < 20.0  # chance is 10%; nothing to learn that generalises
    assert linear_probe(*args, epochs=20, batch_size=250, seed=5) == acc


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_extract_features():
    torch.manual_seed(0)
    net = _TinyNet()
    net.train()
    net.head.eval()  # a submodule deliberately left in eval must stay that way
    images = torch.randn(10, 3, 8, 8)
    loader = [(images[i:i + 4], torch.arange(i, min(i + 4, 10))) for i in range(0, 10, 4)]
    running_mean = net.bn.running_mean.clone()
    calls = []

    def autocast():
        calls.append(1)
        return contextlib.nullcontext()

    feats, labels = extract_features(net, loader, "cpu", autocast=autocast, channels_last=True)

    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert feats.shape == (10, 5) and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert torch.equal(labels, torch.arange(10))
    assert len(calls) == len(loader)
    # Modes restored per submodule, and BN statistics untouched by the pass.
    assert net.training and net.conv.training and net.bn.training and not net.head.training
    assert torch.equal(net.bn.running_mean, running_mean)
    # The pass ran in eval mode: outputs match an eval-mode forward.
    net.eval()
    with torch.no_grad():
        expected = F.normalize(net(images), dim=1)
    torch.testing.assert_close(feats, expected)

def test_extract_features_restores_mode_on_error():
    net = _TinyNet().train()

    def bad_loader():
        yield torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        extract_features(net, bad_loader(), "cpu")
    assert net.training and net.bn.training


def _colour_batches(n_batches, seed):
    """Images of 3 classes told apart by their dominant colour channel, plus noise."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, 3, (30,), generator=g)
        images = 0.3 * torch.randn(30, 3, 4, 4, generator=g)
        images[torch.arange(30), labels] += 1.0
        batches.append((images, labels))
    return batches


def test_paper_linear_protocol_learns_separable_data_and_leaves_the_backbone_alone():
    backbone = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        backbone[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        backbone[0].bias.zero_()
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    acc = linear_probe_augmented(backbone, _colour_batches(10, 0), _colour_batches(4, 1), 3, epochs=5)
    assert acc["top1"] == 100.0
    assert backbone.training  # mode restored
    after = backbone.state_dict()  # frozen: no weight or BatchNorm statistic moved
    assert all(torch.equal(before[k], after[k]) for k in before)
