"""Colour operations on batches of float images in [0, 1], one parameter per image.

Each follows the definition of the torchvision.transforms.v2.functional operation of the
same name (grayscale weights, blends clamped to [0, 1], hue through HSV), so that a view
made here matches the per-image path's for the same parameters; tests/data/augment/test_views_statistics.py
measures the difference.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# PIL's ImageOps.solarize inverts uint8 values >= 128, MoCo v3's Solarize. On floats in [0, 1] the
# threshold is 0.5: i / 255 >= 0.5 exactly when i >= 128, and an unrounded value (after the blur)
# is inverted exactly when it would round to 128 or more.
SOLARIZE_THRESHOLD = 0.5
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision ColorJitter's fn_idx numbering


class Buffers:
    """Named scratch tensors, grown on demand and handed out as views of the size asked for."""

    def __init__(self):
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        size = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            buf = self.store[name] = torch.empty(size, dtype=dtype, device=like.device)
        return buf[:size].view(shape)


def on_subset(x: torch.Tensor, mask: torch.Tensor, work: Buffers,
              fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """x[mask] = fn(x[mask], indices), in place; fn may return a tensor broadcastable to the subset.

    `mask` and the indices fn gets are on the host: the subset's size decides shapes, and
    reading it from a GPU would make the host wait for the GPU."""
    index = torch.nonzero(mask.cpu()).squeeze(1)
    k = index.numel()
    if k == 0:
        return
    if k == x.shape[0]:
        x.copy_(fn(x, index).expand_as(x))
        return
    rows = index.to(x.device, non_blocking=True)
    subset = torch.index_select(x, 0, rows, out=work.get("subset", (k,) + x.shape[1:], x))
    x.index_copy_(0, rows, fn(subset, index).expand_as(subset))


def grayscale(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 1, H, W) luma of (N, 3, H, W) with torchvision's weights."""
    out = torch.mul(x[:, 0:1], GRAY_WEIGHTS[0], out=out)
    return out.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def solarize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's solarize of float images at SOLARIZE_THRESHOLD: x >= 0.5 becomes 1 - x, in place."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x, out=x)


def shift_hue(x: torch.Tensor, shift: torch.Tensor, work: Buffers | None = None) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by shift[i] turns in HSV (S and V kept), in place.

    Torchvision's adjust_hue definition (HSV, hue sector by the largest channel, red first on
    ties), written with preallocated planes because on a CPU fresh tensors (page faults) cost
    more than the arithmetic. It agrees with torchvision's to float rounding (~1e-6).
    """
    work = work or Buffers()
    shift = shift.to(x.device, non_blocking=True)
    plane = (x.shape[0],) + x.shape[2:]
    r, g, b = x.unbind(dim=1)
    value = torch.maximum(torch.maximum(r, g, out=work.get("value", plane, x)), b, out=work.get("value", plane, x))
    low = torch.minimum(torch.minimum(r, g, out=work.get("low", plane, x)), b, out=work.get("low", plane, x))
    chroma = torch.sub(value, low, out=work.get("chroma", plane, x))  # = V * S
    # Hue in sixths of a turn, by the sector of the largest channel (red, then green, then blue on ties).
    blue = torch.sub(r, g, out=work.get("hue_a", plane, x)).add_(chroma, alpha=4.0)
    other = torch.sub(b, r, out=work.get("hue_b", plane, x)).add_(chroma, alpha=2.0)
    mask = torch.eq(value, g, out=work.get("mask", plane, x, torch.bool))
    hue6 = torch.where(mask, other, blue, out=work.get("hue_c", plane, x))
    other = torch.sub(g, b, out=work.get("hue_b", plane, x))
    mask = torch.eq(value, r, out=work.get("mask", plane, x, torch.bool))
    hue6 = torch.where(mask, other, hue6, out=work.get("hue_a", plane, x))
    divisor = torch.clamp(chroma, min=1e-12, out=work.get("hue_b", plane, x))  # gray pixels: 0 / tiny = 0
    hue6.div_(divisor).add_(6.0 * shift[:, None, None])
    wrapped = torch.mul(hue6, 1.0 / 6.0, out=work.get("hue_b", plane, x)).floor_()
    hue6.sub_(wrapped, alpha=6.0)  # in [0, 6)
    # HSV -> RGB: channel = min + C * clamp(d - 1, 0, 1), d the circular distance (in sixths) from
    # the hue to the channel's opposite (cyan 3, magenta 5, yellow 1 for R, G, B). With
    # s = 3 - d = |(|hue - opposite|) - 3|, that is (min + 2C) - C * clamp(s, 1, 2).
    t = torch.sub(hue6[:, None], _OPPOSITE.to(x.device, non_blocking=True), out=work.get("ramp", x.shape, x))
    t.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    return torch.addcmul(low.add_(chroma, alpha=2.0)[:, None], chroma[:, None], t, value=-1.0, out=x)


_OPPOSITE = torch.tensor([3.0, 5.0, 1.0]).view(1, 3, 1, 1)


def jitter(x: torch.Tensor, jittered: torch.Tensor, order: torch.Tensor, factors: torch.Tensor,
           work: Buffers) -> torch.Tensor:
    """ColorJitter in place on (N, 3, H, W): each image whose `jittered` (N,) is set runs
    brightness, contrast, saturation and hue with its factors (N, 4) in its own order (N, 4)."""
    # jittered, order and factors are on the host: each slot's per-image weights are worked out
    # there and copied without waiting, and the hue subset is chosen there (on_subset).
    brightness, contrast, saturation, hue = factors.unbind(dim=1)
    ones, zeros = torch.ones_like(brightness), torch.zeros_like(brightness)
    gray = work.get("gray", (x.shape[0], 1) + x.shape[2:], x)
    for slot in range(4):  # every image runs the operation its own order puts in this slot
        op = torch.where(jittered, order[:, slot], -1)  # -1: this image is not jittered
        # Brightness, contrast and saturation are all clamp(a*x + g*gray(x) + d, 0, 1):
        # brightness a=b; contrast a=c, d=(1-c)*mean(gray); saturation a=s, g=1-s.
        # Any other image gets a=1, g=d=0, which leaves it exactly as it is.
        a = torch.where(op == BRIGHTNESS, brightness,
                        torch.where(op == CONTRAST, contrast, torch.where(op == SATURATION, saturation, ones)))
        g = torch.where(op == SATURATION, 1.0 - saturation, zeros)
        contrast_weight = torch.where(op == CONTRAST, 1.0 - contrast, zeros)
        a, g, contrast_weight = (v.to(x.device, non_blocking=True) for v in (a, g, contrast_weight))
        grayscale(x, out=gray)
        d = contrast_weight * gray.mean(dim=(1, 2, 3))
        gray.mul_(g[:, None, None, None]).add_(d[:, None, None, None])
        x.mul_(a[:, None, None, None]).add_(gray).clamp_(0.0, 1.0)
        # Hue is not affine: rotate only the images whose order puts it in this slot.
        on_subset(x, op == HUE, work, lambda y, i: shift_hue(y, hue[i], work))
    return x
