"""The batched view path against torchvision's, measured: crop boxes, blur spread, aliasing.

    python -m benchmarks views-statistics   # prints the table, writes benchmarks/results/views-statistics.{json,md}

For photo-sized images (500x375 and 375x500) it compares three ways of making a view:

    torchvision  v2.RandomResizedCrop(antialias=True) on the original image (the per-image path),
                 PIL's GaussianBlur(radius=sigma) (the official MoCo code's blur; in the blur
                 rows the "torchvision" column is PIL's)
    batched      this project's batched path: the decoded cache's copy of the image (shorter side
                 <= ceil(S / sqrt(0.2))), crop_boxes, antialiased resize, blur.gaussian_blur
    before       the batched path before the views were made faithful: a centred square of
                 1.15 S cached, bilinear grid sampling, a blur kernel of 10% of S

tests/data/augment/test_views_statistics.py asserts the same measures against torchvision with tolerances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lowmem_moco.data.augment.blur import effective_sigma, gaussian_blur
from lowmem_moco.data.stores.sides import fit_shorter_side, shorter_side
from lowmem_moco.data.augment.crops import CROP_DRAWS, crop_boxes, resized_crops
from lowmem_moco.data.stores.ragged import RaggedImages
from lowmem_moco.data.augment.sample_rng import uniforms

from ..harness.cli import parser
from ..harness.results import RESULTS, command_line, markdown_table, write_results

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


# ---------------------------------------------------------------------- crop boxes, in original pixels


# Each sampler returns (boxes (n, 4) float64 (top, left, h, w) in the original image's pixels,
# pixels of the image actually sampled per original pixel).


def torchvision_boxes(height: int, width: int, n: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """torchvision's RandomResizedCrop boxes on the original image."""
    torch.manual_seed(seed)
    image = torch.empty(1, height, width)
    return torch.tensor([v2.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)],
                        dtype=torch.float64), 1.0


def batched_boxes(height: int, width: int, n: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """The batched path's boxes, drawn in the cached copy's pixels and mapped back to the original's."""
    cached_h, cached_w = fit_shorter_side(Image.new("RGB", (width, height)), shorter_side(image_size)).shape[:2]
    u = uniforms(torch.arange(n, dtype=torch.int64) + seed * n, 0, CROP_DRAWS)
    boxes = crop_boxes(u, torch.full((n,), cached_h), torch.full((n,), cached_w), SCALE, RATIO)
    return boxes * torch.tensor([height / cached_h, width / cached_w] * 2, dtype=torch.float64), cached_h / height


def before_boxes(height: int, width: int, n: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """The old batched path's boxes: inside a centred square of round(1.15 S) px, mapped back."""
    side = min(round(1.15 * image_size), height, width)
    u = uniforms(torch.arange(n, dtype=torch.int64) + seed * n, 0, CROP_DRAWS)
    boxes = crop_boxes(u, torch.full((n,), side), torch.full((n,), side), SCALE, RATIO)
    square = min(height, width)
    offset = torch.tensor([(height - square) / 2, (width - square) / 2, 0, 0], dtype=torch.float64)
    return boxes * (square / side) + offset, side / square


def box_summary(boxes: torch.Tensor, height: int, width: int, sampled_per_pixel: float = 1.0) -> dict:
    """Share of boxes reaching each border (within 1% of the side), share reaching into the side
    bands outside the centred square, and the median source side sqrt(h * w) in original pixels
    and in pixels of the image actually sampled."""
    top, left, h, w = boxes.unbind(dim=1)
    near_y, near_x = 0.01 * height, 0.01 * width
    band = (max(height, width) - min(height, width)) / 2  # the bands a centred square leaves out
    start, length, extent = (left, w, width) if width > height else (top, h, height)
    return dict(top=(top <= near_y).double().mean().item(), bottom=(top + h >= height - near_y).double().mean().item(),
                left=(left <= near_x).double().mean().item(), right=(left + w >= width - near_x).double().mean().item(),
                side_bands=((start < band - 0.5) | (start + length > extent - band + 0.5)).double().mean().item(),
                median_side=torch.sqrt(h * w).median().item(),
                median_sampled_side=torch.sqrt(h * w).median().item() * sampled_per_pixel)


# ---------------------------------------------------------------------- blur and aliasing


def blur_spread(sigma: float, size: int) -> dict:
    """Effective sigma (std of the impulse response, px) of each blur at view size `size`."""
    impulse = torch.zeros(1, 1, size, size)
    impulse[..., size // 2, size // 2] = 1.0
    ours = gaussian_blur(impulse, torch.tensor([sigma]))[0, 0].sum(dim=0)
    old_k = max(3, int(0.1 * size)) | 1  # the old kernel: 10% of the view side, odd
    before = TF.gaussian_blur(impulse[0], [old_k, old_k], [sigma, sigma])[0].sum(dim=0)
    # PIL blurs uint8 only: measure its line spread (the derivative of a blurred edge), which
    # rounding disturbs far less than a single-pixel impulse.
    edge = np.zeros((size, size), np.uint8)
    edge[:, size // 2:] = 255
    pil = np.asarray(Image.fromarray(edge).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64)
    return dict(torchvision=effective_sigma(torch.from_numpy(np.diff(pil[size // 2]))), batched=effective_sigma(ours),
                before=effective_sigma(before))


def above_nyquist_noise(side: int, factor: int = 4, seed: int = 0) -> torch.Tensor:
    """uint8 (3, side, side) noise whose spectrum lies wholly above the Nyquist frequency of a
    `factor`-times smaller image: any of it left after downscaling is aliasing."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.fft.fft2(torch.randn(3, side, side, generator=g))
    frequency = torch.fft.fftfreq(side).abs()
    low = (frequency[:, None] <= 0.5 / factor) & (frequency[None, :] <= 0.5 / factor)
    noise = torch.fft.ifft2(spectrum * ~low).real
    return (128 + 40 * noise / noise.std()).round().clamp(0, 255).to(torch.uint8)


def aliasing_energy(size: int, factor: int = 4) -> dict:
    """Output variance / input variance of above-Nyquist noise shrunk `factor` times (0 is ideal)."""
    source = above_nyquist_noise(size * factor, factor)
    energy = source.float().var().item()
    box = torch.tensor([[0.0, 0.0, size * factor, size * factor]], dtype=torch.float64)
    ours = resized_crops(RaggedImages.from_tensor(source[None]), [0], box, torch.zeros(1, dtype=torch.bool), size)
    reference = TF.resize(source, [size, size], antialias=True)
    before = F.interpolate(source[None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return {name: out.float().var().item() / energy
            for name, out in (("torchvision", reference), ("batched", ours), ("before", before))}


# ---------------------------------------------------------------------- the table


HEADS = ["measure", "image", "torchvision", "batched", "before"]
PATHS = ("torchvision", "batched", "before")


def table(image_size: int = 224, n: int = 20000) -> list[list[str]]:
    """Rows under HEADS: the crop boxes on both photo shapes, the blur's spread, the aliasing."""
    rows = []
    for height, width in ((375, 500), (500, 375)):
        shape = f"{width}x{height}"
        found = {name: box_summary(*sampler(height, width, n, *extra)[:1], height, width,
                                   sampler(height, width, 1, *extra)[1]) for name, sampler, extra in
                 (("torchvision", torchvision_boxes, ()), ("batched", batched_boxes, (image_size,)),
                  ("before", before_boxes, (image_size,)))}
        for key, label, fmt in (("left", "crops reaching the left border", "{:.3f}"),
                                ("right", "... the right border", "{:.3f}"), ("top", "... the top border", "{:.3f}"),
                                ("bottom", "... the bottom border", "{:.3f}"),
                                ("side_bands", "crops reaching outside the centred square", "{:.3f}"),
                                ("median_side", "median crop side sqrt(h w), original px", "{:.0f}"),
                                ("median_sampled_side", "... in px of the image sampled (cache)", "{:.0f}")):
            rows.append([label, shape, *(fmt.format(found[k][key]) for k in PATHS)])
    for view in (32, image_size):
        for sigma in (1.0, 2.0):
            spread = blur_spread(sigma, view)
            rows.append([f"effective blur sigma, sigma {sigma}", f"{view} px view", *(f"{spread[k]:.2f}" for k in PATHS)])
    for view in (32, image_size):
        energy = aliasing_energy(view)
        rows.append(["aliased energy, 4x downscale", f"{view} px view", *(f"{energy[k]:.4f}" for k in PATHS)])
    return rows


def main(argv: list[str]) -> int:
    p = parser("views-statistics", __doc__)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--draws", type=int, default=20000, help="crop boxes per sampler and image")
    p.add_argument("--out", type=Path, default=RESULTS / "views-statistics", help="results path without suffix")
    args = p.parse_args(argv)
    rows = table(args.image_size, args.draws)
    text = "\n".join(markdown_table(HEADS, rows))
    print(text)
    write_results(args.out, [dict(zip(HEADS, row)) for row in rows],
                  f"# Views: torchvision vs the batched path (view size {args.image_size} px, {args.draws} crops per "
                  f"sampler)\n\nCommand: `{command_line('views-statistics', argv)}`\n\n{text}\n")
    return 0
