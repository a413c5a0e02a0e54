"""Image transforms: the MoCo training views and the plain evaluation view.

Both take a PIL image and return a float tensor (C, H, W), normalised with the recipe's
mean and std. The training view draws every random number from the torch RNG
(torchvision.transforms.v2 does), so seeding torch before calling it reproduces the view
exactly; `two_views.TwoViews` relies on that to make each sample's views independent of the
worker that made them. Its distribution is the `augment:` section of the configuration,
which the batched path (batched.BatchedMoCoV2) reads too; each view reads its own
probabilities (AugmentConfig.for_view), as MoCo v3's augmentation1 and augmentation2.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from .blur import RandomGaussianBlur
from .colour import SOLARIZE_THRESHOLD
from ...config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

# Share of the image kept by the centre crop of the evaluation view (the usual 224/256).
EVAL_CROP_FRACTION = 0.875


def mocov2_transform(image_size: int, aug: AugmentConfig | None = None,
                     normalize: bool = True, view: int = 0) -> Callable[[Image.Image], torch.Tensor]:
    """One augmented view `view` (0: the query's, 1: the key's), drawn independently per call.

    normalize=False returns the float view in [0, 1] (for looking at it).
    """
    a = (aug or AugmentConfig()).for_view(view)
    steps = [
        # Crop and colour on the PIL image (Pillow's kernels are the fastest here),
        # then blur, solarize, flip and normalise a float tensor.
        v2.RandomResizedCrop(image_size, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio), antialias=True),
        v2.RandomApply([v2.ColorJitter(*a.jitter)], p=a.jitter_prob),
        v2.RandomGrayscale(p=a.grayscale_prob),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        RandomGaussianBlur(tuple(a.blur_sigma), p=a.blur_prob, max_radius=a.blur_max_radius),
    ]
    if a.solarize_prob > 0:  # left out at 0: RandomSolarize draws a number even then, shifting later views
        steps.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=a.solarize_prob))
    steps.append(v2.RandomHorizontalFlip(p=a.flip_prob))
    if normalize:
        steps.append(v2.Normalize(list(a.mean), list(a.std)))
    return v2.Compose(steps)


def view_transforms(image_size: int, aug: AugmentConfig | None = None, normalize: bool = True) -> tuple:
    """(the query's transform, the key's): what TwoViews applies to each image."""
    return tuple(mocov2_transform(image_size, aug, normalize, view) for view in (0, 1))


def linear_train_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                           std: Sequence[float] = IMAGENET_STD) -> Callable[[Image.Image], torch.Tensor]:
    """Training view of the paper's linear protocol: random resized crop and flip."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class _EvalView:
    """Resize, centre-crop and normalise; a class (not a closure) so workers can pickle it."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.image_size
        # Small images (e.g. 32-px CIFAR) have no margin worth cropping away.
        resize_to = size if min(image.size) <= size else round(size / EVAL_CROP_FRACTION)
        tensor = v2.functional.pil_to_tensor(image)
        tensor = v2.functional.resize(tensor, resize_to, antialias=True)
        tensor = v2.functional.center_crop(tensor, [size, size])
        tensor = v2.functional.to_dtype(tensor, torch.float32, scale=True)
        return v2.functional.normalize(tensor, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic view used for kNN features and probes: no augmentation."""
    return _EvalView(image_size, mean, std)
