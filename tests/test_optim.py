"""train.optimizer: LARS against MoCo v3's update, and which parameters each optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from lowmem_moco.config import load_config
from lowmem_moco.optim import LARS, build_optimizer


def tiny_model() -> nn.Module:
    """Every kind of parameter LARS tells apart: conv and linear weights (scaled, decayed), biases,
    BatchNorm and LayerNorm weights (neither), and a zero-initialised weight (the zero-norm guard)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                          nn.LayerNorm(8), nn.Linear(8, 3))
    nn.init.zeros_(model[6].weight)
    return model


def official_lars_step(params, momenta, lr, weight_decay, momentum=0.9, trust=0.001):
    """facebookresearch/moco-v3 moco/optimizer.py LARS.step, restated on lists of tensors."""
    with torch.no_grad():
        for p, mu in zip(params, momenta):
            dp = p.grad
            if p.ndim > 1:
                dp = dp.add(p, alpha=weight_decay)
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0., torch.where(update_norm > 0, (trust * param_norm / update_norm), one),
                                one)
                dp = dp.mul(q)
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)


def loss_of(model, step):
    g = torch.Generator().manual_seed(step)
    x, target = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 3, (5,), generator=g)
    return nn.functional.cross_entropy(model(x), target)


@pytest.mark.parametrize("lr,weight_decay", [(4.8, 1e-6), (0.3, 1e-4), (1.0, 0.0)])
def test_lars_is_moco_v3s_update(lr, weight_decay):
    """Six steps of ours and of the official update on copies of one model: equal bit for bit."""
    ours, reference = tiny_model(), tiny_model()
    optimizer = LARS(ours.parameters(), lr=lr, weight_decay=weight_decay)
    momenta = [torch.zeros_like(p) for p in reference.parameters()]
    for step in range(6):
        for model in (ours, reference):
            model.zero_grad()
            loss_of(model, step).backward()
        optimizer.step()
        official_lars_step(list(reference.parameters()), momenta, lr, weight_decay)
        for a, b in zip(ours.parameters(), reference.parameters()):
            assert torch.equal(a, b), step
    assert ours[6].weight.abs().sum() > 0  # the zero-initialised weight moved: its ratio was 1


def test_lars_skips_weight_decay_and_trust_ratio_for_one_dimensional_parameters():
    """With a zero gradient, a 1-D parameter does not move (no decay); a matrix decays by lr * wd * w * ratio."""
    w, b = nn.Parameter(torch.full((2, 2), 3.0)), nn.Parameter(torch.full((2,), 3.0))
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    LARS([w, b], lr=1.0, weight_decay=0.5).step()
    assert torch.equal(b, torch.full((2,), 3.0))
    # d = 0.5 w, ratio = 0.001 ||w|| / ||0.5 w|| = 0.002: w - 0.002 * 0.5 w
    assert torch.allclose(w, torch.full((2, 2), 3.0 * (1 - 0.001)), atol=0, rtol=1e-7)


@pytest.mark.parametrize("name,kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)])
def test_every_optimizer_leaves_frozen_parameters_out(name, kind):
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer(model.parameters(), load_config(None, [f"train.optimizer={name}"]))
    assert type(optimizer) is kind
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(stepped) == len(list(model.parameters())) - 1 and all(p is not model[0].weight for p in stepped)


def test_adamw_is_moco_v3s_vit_optimizer():
    """main_moco.py: torch.optim.AdamW(model.parameters(), lr, weight_decay=wd): torch's betas and
    eps, one group, weight decay on every parameter (biases and norms too)."""
    cfg = load_config(None, ["train.optimizer=adamw", "train.lr=0.0006", "train.weight_decay=0.1"])
    optimizer = build_optimizer(tiny_model().parameters(), cfg)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (0.0006, 0.1, (0.9, 0.999), 1e-8)


def test_lars_through_accelerate_steps_and_resumes():
    """The prepared optimizer steps (accelerate passes a closure argument) and its momentum
    buffers survive a state_dict round trip, as a checkpoint keeps them."""
    model = tiny_model()
    accelerator = Accelerator(cpu=True)
    prepared, optimizer = accelerator.prepare(model, LARS(model.parameters(), lr=0.5, weight_decay=1e-6))
    loss_of(prepared, 0).backward()
    optimizer.step()
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    restored = LARS(twin.parameters(), lr=0.5, weight_decay=1e-6)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for model_ in (model, twin):
        model_.zero_grad()
        loss_of(model_, 1).backward()
    optimizer.step()
    restored.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
