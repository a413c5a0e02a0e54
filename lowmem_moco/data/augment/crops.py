"""RandomResizedCrop for a batch: torchvision's box distribution, antialiased resampling.

`crop_boxes` vectorises torchvision's RandomResizedCrop.get_params over images of any
sizes (each its own height and width): up to 10 tries of (area fraction, log aspect ratio),
the first box that fits wins, else the largest centred box with an allowed aspect ratio.
`resized_crops` cuts each box and resizes it with torch's antialiased bilinear
interpolation, the kernel torchvision's tensor RandomResizedCrop(antialias=True) runs:
a triangle filter as wide as the scale factor when shrinking, plain bilinear when enlarging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..stores.ragged import RaggedImages

CROP_TRIES = 10  # torchvision RandomResizedCrop's rejection-sampling attempts
CROP_DRAWS = 2 * CROP_TRIES + 2  # uniforms one box needs: tries x (area, ratio), then top, left


def crop_boxes(u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, scale, ratio) -> torch.Tensor:
    """(N, 4) float64 boxes (top, left, height, width) from uniforms u (N, CROP_DRAWS) in [0, 1)
    for images of heights, widths (N,)."""
    heights, widths = heights.to(u), widths.to(u)
    area = (heights * widths)[:, None]
    target = area * (u[:, :CROP_TRIES] * (scale[1] - scale[0]) + scale[0])  # (N, tries)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(u[:, CROP_TRIES:2 * CROP_TRIES] * (log_hi - log_lo) + log_lo)
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))  # half to even
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    # No try fits: the whole image, narrowed to the nearest allowed aspect ratio.
    in_ratio = widths / heights
    fallback_w = torch.where(in_ratio > max(ratio), torch.round(heights * max(ratio)), widths)
    fallback_h = torch.where(in_ratio < min(ratio), torch.round(widths / min(ratio)), heights)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    u_top, u_left = u[:, 2 * CROP_TRIES], u[:, 2 * CROP_TRIES + 1]
    top = torch.where(found, torch.floor(u_top * (heights - h + 1)), torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(u_left * (widths - w + 1)), torch.floor((widths - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: RaggedImages, source: list[int], boxes: torch.Tensor, flips: torch.Tensor,
                  size: int) -> torch.Tensor:
    """(V, 3, S, S) crop k = boxes[k] (V, 4) of image source[k], resized to S and mirrored where flips[k].

    On a CPU the result is uint8, from torch's vectorised uint8 kernel (bit-identical to
    torchvision's resize of a uint8 tensor); elsewhere float32 in [0, 255], unrounded.
    """
    on_cpu = images.device.type == "cpu"
    sources = images.images()
    resized = []
    for k, (top, left, height, width) in zip(source, boxes.long().tolist()):
        crop = sources[k][None, :, top:top + height, left:left + width]  # (1, 3, h, w) view
        if not on_cpu:
            crop = crop.float()
        resized.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    out = torch.cat(resized)  # (V, 3, S, S)
    # Chosen on the host (flips stay there): a nonzero on the GPU would make the host wait for it.
    mirrored = torch.nonzero(flips.cpu()).squeeze(1).to(out.device, non_blocking=True)
    out[mirrored] = out[mirrored].flip(-1)
    return out
