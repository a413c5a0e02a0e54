"""The MoCo v2 Gaussian blur, one sigma per image, shared by both view paths.

The official code blurs with PIL's `ImageFilter.GaussianBlur(radius=sigma)`, a Gaussian of
standard deviation sigma that is never cut short. Here the kernel reaches TRUNCATE sigmas
each side (the weights left out are below 4e-4 of the centre's), so its spread is sigma's
for every sampled sigma. `max_radius > 0` caps the half-width: faster, no longer published.

Each image's result depends only on its own sigma, not on the other images of the batch:
taps beyond an image's own radius are exact zeros, and every sum runs in a fixed order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TRUNCATE = 4.0  # kernel half-width, in sigmas


def blur_radius(sigma: torch.Tensor, max_radius: int = 0) -> torch.Tensor:
    """(N,) long half-width of each image's kernel: ceil(TRUNCATE * sigma), capped when max_radius > 0."""
    radius = torch.ceil(TRUNCATE * sigma).long().clamp_(min=1)
    return radius.clamp_(max=max_radius) if max_radius > 0 else radius


def gaussian_taps(sigma: torch.Tensor, radius: torch.Tensor, half: int) -> torch.Tensor:
    """(N, half + 1) one-sided normalised taps (offsets 0..half); zero beyond each image's radius."""
    offsets = torch.arange(half + 1, device=sigma.device, dtype=sigma.dtype)
    taps = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    taps = torch.where(offsets[None, :] <= radius[:, None], taps, 0.0)
    total = taps[:, 0].clone()
    for t in range(1, half + 1):  # a fixed-order sum: zeros change nothing
        total += 2.0 * taps[:, t]
    return taps / total[:, None]


def _blur_axis(x: torch.Tensor, taps: torch.Tensor, dim: int, pair: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) blurred along `dim` (2: H, 3: W) with symmetric taps (N, half + 1), reflect padding.

    `pair` is scratch of x's shape: one buffer for every tap instead of a fresh tensor each.
    """
    half, length = taps.shape[1] - 1, x.shape[dim]
    padded = F.pad(x, (half, half, 0, 0) if dim == 3 else (0, 0, half, half), mode="reflect")
    out = x * taps[:, 0, None, None, None]
    for t in range(1, half + 1):
        torch.add(padded.narrow(dim, half - t, length), padded.narrow(dim, half + t, length), out=pair)
        out.addcmul_(pair, taps[:, t, None, None, None])
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_radius: int = 0) -> torch.Tensor:
    """Float images (N, C, H, W) blurred with sigma[i] (N,) each; a new tensor.

    Separable, reflect padding (torchvision's GaussianBlur border); the half-width is
    also kept below the image's side, which reflect padding needs. Images are blurred in
    groups of equal half-width, so a small sigma does not pay for the batch's largest.
    """
    height, width = x.shape[-2:]
    # The groups are formed on the host (sigma comes from there): their sizes decide shapes, and
    # reading them from a GPU would make the host wait. Taps and rows are copied without waiting.
    sigma = sigma.cpu().to(x.dtype)
    radius = blur_radius(sigma, max_radius).clamp_(max=min(height, width) - 1)
    out = torch.empty_like(x)
    for half in radius.unique().tolist():
        chosen = torch.nonzero(radius == half).squeeze(1)  # (G,) images with this half-width
        group = chosen.to(x.device, non_blocking=True)
        images = x.index_select(0, group)  # (G, C, H, W)
        taps = gaussian_taps(sigma[chosen], radius[chosen], half).to(x.device, non_blocking=True)  # (G, half + 1)
        pair = torch.empty_like(images)
        out.index_copy_(0, group, _blur_axis(_blur_axis(images, taps, 3, pair), taps, 2, pair))
    return out


def effective_sigma(response: torch.Tensor) -> float:
    """Standard deviation (pixels) of a 1-D impulse response: the blur's real spread."""
    response = response.double() / response.sum()
    position = torch.arange(len(response), dtype=torch.float64)
    centre = (response * position).sum()
    return math.sqrt(float((response * (position - centre) ** 2).sum()))


class RandomGaussianBlur:
    """Per-image path: blur a float (C, H, W) tensor with probability p, sigma ~ U(sigma), from torch's RNG."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5, max_radius: int = 0):
        self.sigma, self.p, self.max_radius = tuple(sigma), p, max_radius

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() >= self.p:
            return image
        sigma = torch.empty(1).uniform_(*self.sigma)
        return gaussian_blur(image[None], sigma, self.max_radius)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, p={self.p}, max_radius={self.max_radius})"
