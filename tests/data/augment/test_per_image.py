"""Per-image views (data/augment/per_image.py, data/augment/blur.py) against torchvision."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import v2

from lowmem_moco.data.augment.per_image import eval_transform
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
