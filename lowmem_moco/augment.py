"""Image transforms: the MoCo v2 training view and the plain evaluation view.

Both take a PIL image and return a normalised float tensor (C, H, W). The training
view draws every random number from the torch RNG (torchvision.transforms.v2 does),
so seeding torch before calling it reproduces the view exactly; `data.TwoViews`
relies on that to make each sample's views independent of the worker that made them.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Share of the image kept by the centre crop of the evaluation view (the usual 224/256).
EVAL_CROP_FRACTION = 0.875


def blur_kernel_size(image_size: int) -> int:
    """An odd Gaussian-blur kernel about 10% of the image side (at least 3)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


class RandomGaussianBlur:
    """Gaussian blur with sigma ~ U(sigma) applied with probability p, on a float (C, H, W) tensor.

    Same result as `v2.GaussianBlur` (reflect padding, kernel truncated at `kernel_size`),
    but done as two small matrix products, which is several times faster on CPU than the
    2-D depthwise convolution torchvision uses for a 23-tap kernel.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5):
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def _matrix(self, n: int, taps: torch.Tensor) -> torch.Tensor:
        """(n, n) matrix B with (x @ B) = x blurred along its last axis, reflect-padded."""
        half = self.kernel_size // 2
        src = torch.arange(n)[:, None] + torch.arange(-half, half + 1)[None, :]  # out i, tap t -> input index
        src = src.abs()  # reflect at the start ...
        src = torch.where(src > n - 1, 2 * (n - 1) - src, src).clamp(0, n - 1)  # ... and at the end
        out = torch.arange(n)[:, None].expand_as(src)
        matrix = torch.zeros(n, n)
        matrix.index_put_((src.reshape(-1), out.reshape(-1)), taps.repeat(n), accumulate=True)
        return matrix

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() >= self.p:
            return image
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        offsets = torch.arange(self.kernel_size, dtype=torch.float32) - self.kernel_size // 2
        taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
        taps /= taps.sum()
        height, width = image.shape[-2:]
        return self._matrix(height, taps).T @ image @ self._matrix(width, taps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p})"


def mocov2_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """One MoCo v2 augmented view (Chen et al. 2020), drawn independently per call."""
    return v2.Compose([
        # Crop and colour on the PIL image (Pillow's kernels are the fastest here),
        # then blur, flip and normalise a float tensor.
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        RandomGaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0), p=0.5),
        v2.RandomHorizontalFlip(),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def linear_train_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Training view of the paper's linear protocol: random resized crop and flip."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _EvalView:
    """Resize, centre-crop and normalise; a class (not a closure) so workers can pickle it."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.image_size
        # Small images (e.g. 32-px CIFAR) have no margin worth cropping away.
        resize_to = size if min(image.size) <= size else round(size / EVAL_CROP_FRACTION)
        tensor = v2.functional.pil_to_tensor(image)
        tensor = v2.functional.resize(tensor, resize_to, antialias=True)
        tensor = v2.functional.center_crop(tensor, [size, size])
        tensor = v2.functional.to_dtype(tensor, torch.float32, scale=True)
        return v2.functional.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic view used for kNN features: no augmentation."""
    return _EvalView(image_size)
