"""The size an image is kept at in a cache, shared by the decoded and the encoded cache.

`shorter_side` is the bound: the smallest crop RandomResizedCrop may draw from an image
whose shorter side is that long still covers the training size, so nothing the views need
is lost. `fit_shorter_side` brings one image down to it (never up).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..sources.decoding import to_rgb


def shorter_side(image_size: int, min_crop_scale: float = 0.2) -> int:
    """Shorter side a cache stores (at most): the smallest crop still covers image_size pixels."""
    return math.ceil(image_size / math.sqrt(min_crop_scale))


def fit_shorter_side(image: Image.Image, side: int) -> np.ndarray:
    """(H, W, 3) uint8, the whole image, shrunk (Pillow's antialiased bilinear) so its shorter
    side is at most `side`; aspect ratio kept, never enlarged."""
    image = to_rgb(image)  # as the per-image path: a set's load() may give any mode
    width, height = image.size
    if min(width, height) > side:
        scale = side / min(width, height)
        image = image.resize((max(side, round(width * scale)), max(side, round(height * scale))), Image.BILINEAR)
    return np.array(image, dtype=np.uint8)
