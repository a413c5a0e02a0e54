"""Per-image views (data/augment/per_image.py, data/augment/blur.py) against torchvision."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import v2

from lowmem_moco.config import AugmentConfig
from lowmem_moco.data.augment.per_image import eval_transform, mocov2_transform, view_transforms
from lowmem_moco.data.augment.blur import RandomGaussianBlur


def test_eval_transform_crops_large_and_resizes_small_images():
    big = Image.new("RGB", (300, 200), (255, 0, 0))
    big.paste((0, 0, 255), (0, 0, 40, 200))  # a blue margin that the centre crop removes
    out = eval_transform(128)(big)
    assert out.shape == (3, 128, 128) and out[2].max() < 0  # no blue left (normalised)
    assert eval_transform(64)(Image.new("RGB", (32, 32))).shape == (3, 64, 64)


def test_blur_matches_torchvision_with_an_untruncated_kernel():
    """The per-image blur: torchvision's Gaussian reaching 4 sigma each side (sigma 2 at 32 px: 17 taps)."""
    image = torch.rand(3, 40, 30)
    blur = RandomGaussianBlur(sigma=(0.1, 2.0), p=1.0)
    torch.manual_seed(0)
    ours = blur(image)
    torch.manual_seed(0)
    torch.rand(1)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    k = 2 * math.ceil(4 * sigma) + 1
    assert (ours - v2.functional.gaussian_blur(image, [k, k], [sigma, sigma])).abs().max() <= 1e-5


def test_v3_views_follow_main_moco_augmentation1_and_2():
    """Per view, the official order and probabilities: view 1 blurs always and never solarizes,
    view 2 blurs with p 0.1, then solarizes at 0.5 (PIL's 128 of 255) with p 0.2, before the flip."""
    aug = AugmentConfig(blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2])
    first, second = (t.transforms for t in view_transforms(32, aug))
    names = [type(step).__name__ for step in second]
    assert names.index("RandomGaussianBlur") < names.index("RandomSolarize") < names.index("RandomHorizontalFlip")
    assert "RandomSolarize" not in [type(step).__name__ for step in first]
    blur = {i: next(s for s in steps if isinstance(s, RandomGaussianBlur)).p for i, steps in enumerate((first, second))}
    assert blur == {0: 1.0, 1: 0.1}
    solar = next(s for s in second if isinstance(s, v2.RandomSolarize))
    assert (solar.p, solar.threshold) == (0.2, 0.5)


def test_one_value_per_view_draws_the_views_of_a_single_value():
    """[p, p] is p, and solarize_prob 0 adds no draw: the same views, bit for bit."""
    image = Image.new("RGB", (40, 30), (200, 120, 40))
    doubled = AugmentConfig(blur_prob=[0.5, 0.5], solarize_prob=[0.0, 0.0], flip_prob=[0.5, 0.5])
    for view in (0, 1):
        torch.manual_seed(7)
        expected = [mocov2_transform(24)(image) for _ in range(3)]
        torch.manual_seed(7)
        found = [mocov2_transform(24, doubled, view=view)(image) for _ in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(expected, found))
