"""MoCo v2 views for a whole batch at once, on the device that trains.

    augment = BatchedMoCoV2(image_size=224, aug=cfg.augment)
    view_q, view_k = augment.two_views(images, seeds, dtype=torch.bfloat16)

`images` is a RaggedImages batch (any sizes; what the decoded cache yields) or a uint8
tensor (N, 3, H, W); `seeds` (N,) int64 are the samples' own seeds (pipeline.sample_seed).
Every random number of a view is a hash of (seed, view, draw) (sample_rng), so a sample's
views do not depend on its batch. The distributions are the per-image path's
(per_image.mocov2_transform), read from the same `augment:` section, each view with its own
probabilities (AugmentConfig.for_view): RandomResizedCrop (torchvision's box distribution in
each image's own size, antialiased resize), ColorJitter in a per-sample random order,
grayscale, Gaussian blur (blur.py), solarize, horizontal flip, normalise.

How it stays cheap: each crop is cut and resized on its own (a view of the cached image and
one antialiased interpolate call; on a CPU the uint8 kernel); then brightness, contrast and
saturation are per-sample affine maps over the whole batch, and only hue, grayscale and blur
run on the subset that needs them. On a CPU the colour work goes in cache-sized chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .blur import gaussian_blur
from .colour import Buffers, grayscale, jitter, on_subset, solarize
from ...config import AugmentConfig
from .crops import CROP_DRAWS, crop_boxes, resized_crops
from ..stores.ragged import RaggedImages
from .sample_rng import uniforms

# Position of each parameter's uniform draw(s) among a view's draws (after the crop's). Draw j
# depends on j alone (sample_rng), so solarize's, added last, left every earlier draw as it was.
_FLIP, _JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _SIGMA, _SOLARIZE = (CROP_DRAWS + k for k in
                                                                     (0, 1, 2, 6, 10, 11, 12, 13))
VIEW_DRAWS = CROP_DRAWS + 14


@dataclass
class ViewParams:
    """The random parameters of V views, one row per view (exposed for tests and debugging)."""

    box: torch.Tensor  # (V, 4) float64 crop box (top, left, height, width) in source pixels, integer values
    flip: torch.Tensor  # (V,) bool
    jitter: torch.Tensor  # (V,) bool: colour jitter applied
    order: torch.Tensor  # (V, 4) long: the jitter operations in the order they run
    factors: torch.Tensor  # (V, 4) float32 brightness, contrast, saturation, hue
    gray: torch.Tensor  # (V,) bool
    blur: torch.Tensor  # (V,) bool
    sigma: torch.Tensor  # (V,) float32 blur sigma
    solarize: torch.Tensor  # (V,) bool

    def to(self, device) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def __getitem__(self, rows) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def cat(parts: list["ViewParams"]) -> "ViewParams":
        return ViewParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ViewParams)})


class BatchedMoCoV2:
    """uint8 images on any device -> MoCo v2 views (V, 3, S, S), contiguous, in `dtype`."""

    cpu_chunk_elements = 2**20  # float32 values per chunk of views on a CPU (4 MB: stays in cache)
    gpu_chunk_elements = 2**25  # on a GPU (128 MB: ~220 views at 224 px; peak scratch ~1 GB)

    def __init__(self, image_size: int, aug: AugmentConfig | None = None):
        self.size, self.aug = image_size, aug or AugmentConfig()

    def __repr__(self) -> str:
        a = self.aug
        return (f"{type(self).__name__}(size={self.size}, crop scale={a.crop_scale} ratio={a.crop_ratio}, "
                f"jitter={a.jitter} p={a.jitter_prob}, gray p={a.grayscale_prob}, blur sigma={a.blur_sigma} "
                f"p={a.blur_prob} max_radius={a.blur_max_radius}, solarize p={a.solarize_prob}, flip p={a.flip_prob})")

    # ------------------------------------------------------------------ entry points

    def __call__(self, images, seeds: torch.Tensor, dtype: torch.dtype = torch.float32,
                 normalize: bool = True, number: int = 0) -> torch.Tensor:
        """View `number` (0: the query's, 1: the key's) of every image."""
        images = _ragged(images)
        return self.apply(images, self.sample_params(seeds, images.shapes, views=(number,)), dtype, normalize)

    def two_views(self, images, seeds: torch.Tensor, dtype: torch.dtype = torch.float32,
                  normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The query and key views (view numbers 0 and 1) of every image, made in one pass."""
        images = _ragged(images)
        n = len(images)
        views = self.apply(images, self.sample_params(seeds, images.shapes, views=(0, 1)), dtype, normalize)
        return views[:n], views[n:]

    # ------------------------------------------------------------------ random parameters

    def sample_params(self, seeds: torch.Tensor, shapes: torch.Tensor, views=(0,)) -> ViewParams:
        """Parameters of views `views` of N images of shapes (N, 2) (height, width), by seed (N,).

        Rows: view views[0] of every image, then views[1], ...; all on the CPU.
        """
        seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu()
        return ViewParams.cat([self._params(uniforms(seeds, v, VIEW_DRAWS), shapes, v) for v in views])

    def _params(self, u: torch.Tensor, shapes: torch.Tensor, view: int) -> ViewParams:
        a = self.aug.for_view(view)

        def between(column, lo, hi):
            return (u[:, column] * (hi - lo) + lo).float()

        b, c, s, h = a.jitter
        factors = torch.stack([between(_FACTORS, max(0.0, 1 - b), 1 + b), between(_FACTORS + 1, max(0.0, 1 - c), 1 + c),
                               between(_FACTORS + 2, max(0.0, 1 - s), 1 + s), between(_FACTORS + 3, -h, h)], dim=1)
        return ViewParams(
            box=crop_boxes(u[:, :CROP_DRAWS], shapes[:, 0], shapes[:, 1], a.crop_scale, a.crop_ratio),
            flip=u[:, _FLIP] < a.flip_prob,
            jitter=u[:, _JITTER] < a.jitter_prob,
            order=u[:, _ORDER:_ORDER + 4].argsort(dim=1),  # a uniformly random permutation per row
            factors=factors,
            gray=u[:, _GRAY] < a.grayscale_prob,
            blur=u[:, _BLUR] < a.blur_prob,
            sigma=between(_SIGMA, *a.blur_sigma),
            solarize=u[:, _SOLARIZE] < a.solarize_prob,
        )

    # ------------------------------------------------------------------ the pass

    def apply(self, images: RaggedImages, p: ViewParams, dtype: torch.dtype = torch.float32,
              normalize: bool = True) -> torch.Tensor:
        """Views with parameters p (V rows); view k is made from image k % N."""
        n, device, size = len(images), images.device, self.size
        views = p.box.shape[0]
        if n == 0 or views % n:
            raise ValueError(f"{views} sets of view parameters for {n} images")
        crops = resized_crops(images, [k % n for k in range(views)], p.box, p.flip, size)  # (V, 3, S, S)
        # p stays on the host: which views get hue, grayscale or blur is decided there, and each
        # colour operation copies the parameters it needs without waiting (colour.py, blur.py).
        # Contiguous (NCHW): the pipeline lays views out as the model wants (channels_last or not),
        # and writing channels_last here would transpose every chunk on a CPU.
        out = torch.empty(views, 3, size, size, dtype=dtype, device=device)
        mean, std = (self.aug.mean, self.aug.std) if normalize else ((0.0,) * 3, (1.0,) * 3)
        scale = (1.0 / torch.tensor(std)).view(1, 3, 1, 1)
        shift = (-torch.tensor(mean) * scale.flatten()).view(1, 3, 1, 1).to(device, non_blocking=True)
        scale = scale.to(device, non_blocking=True)
        # A CPU runs the many elementwise passes several times faster on chunks that stay in
        # cache; a GPU prefers large launches, in chunks that cap the scratch memory.
        limit = self.cpu_chunk_elements if device.type == "cpu" else self.gpu_chunk_elements
        chunk = max(1, limit // (3 * size * size))
        work = Buffers()  # scratch reused by every chunk: fresh CPU memory costs page faults
        for start in range(0, views, chunk):
            rows = slice(start, min(views, start + chunk))
            x = crops[rows].float().mul_(1.0 / 255)
            x = self._colour(x, p[rows], work)
            out[rows] = x.mul_(scale).add_(shift)  # normalise in place (a 3-operand addcmul is ~5x slower), cast
        return out

    def _colour(self, x: torch.Tensor, p: ViewParams, work: Buffers) -> torch.Tensor:
        """Jitter, grayscale, blur and solarize, in place, of one chunk of float views in [0, 1]; p on the host."""
        jitter(x, p.jitter, p.order, p.factors, work)
        on_subset(x, p.gray, work, lambda y, i: grayscale(y, out=work.get("gray", (len(i), 1) + y.shape[2:], y)))
        on_subset(x, p.blur, work, lambda y, i: gaussian_blur(y, p.sigma[i], self.aug.blur_max_radius))
        on_subset(x, p.solarize, work, lambda y, i: solarize(y))
        return x


def _ragged(images) -> RaggedImages:
    if isinstance(images, RaggedImages):
        return images
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RaggedImages or a uint8 batch (N, 3, H, W), got {getattr(images, 'shape', images)}")
    return RaggedImages.from_tensor(images)
