"""A synthetic labelled set drawn on the fly: no download, fixed seed, class = a shape and its
fill pattern. Used by recipes/demo.yaml and by the tests."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...config import DataConfig
from ...errors import DataError
from .images import ArrayImages, DataSplits, check_sizes

SYNTHETIC_SEED = 1729
SYNTHETIC_SIZE = 32


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float) -> np.ndarray:
    """Inside of a regular polygon (apothem `radius`) centred at the origin."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        angle = np.pi / 2 + 2 * np.pi * k / sides
        inside &= u * np.cos(angle) + v * np.sin(angle) < radius
    return inside


def _dots(u: np.ndarray, v: np.ndarray, centres: list[tuple[float, float]], radius: float) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    for cu, cv in centres:
        inside |= (u - cu) ** 2 + (v - cv) ** 2 < radius ** 2
    return inside


def _lattice(t: np.ndarray, period: float) -> np.ndarray:
    """Distance of `t` to the nearest point of a lattice with this period (offset by half a period)."""
    return np.abs((t % period) - period / 2)


def _box(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(abs(u), abs(v))


# A synthetic class is an outline filled with a pattern, both drawn in shape coordinates (u, v):
# x right, y down, the shape spanning about [-1, 1]. Shapes are not rotated: orientation is
# part of the structure, and no class is the mirror image of another, so flips keep classes
# apart. The fill makes the class visible in small crops too, which MoCo's views often are.
Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]
SHAPES: dict[str, Mask] = {
    "disc": lambda u, v: u * u + v * v < 0.8,
    "ring": lambda u, v: (u * u + v * v < 0.9) & (u * u + v * v > 0.3),
    "square": lambda u, v: _box(u, v) < 0.75,
    "frame": lambda u, v: (_box(u, v) < 0.8) & (_box(u, v) > 0.45),
    "triangle": lambda u, v: _polygon(u, v, 3, 0.45),
    "plus": lambda u, v: ((abs(u) < 0.25) | (abs(v) < 0.25)) & (_box(u, v) < 0.95),
    "two dots": lambda u, v: _dots(u, v, [(-0.55, 0.0), (0.55, 0.0)], 0.38),
    "four dots": lambda u, v: _dots(u, v, [(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)], 0.3),
    "bars": lambda u, v: (_box(u, v) < 0.85) & (_lattice(v + 0.85, 0.6) < 0.12),
    "dot grid": lambda u, v: (_box(u, v) < 0.95) & (_lattice(u + 0.95, 0.633) ** 2 + _lattice(v + 0.95, 0.633) ** 2
                                                    < 0.17 ** 2),
    "hexagon ring": lambda u, v: _polygon(u, v, 6, 0.85) & ~_polygon(u, v, 6, 0.5),
    "L": lambda u, v: ((abs(u) < 0.8) & (v > 0.35) & (v < 0.8)) | ((u > -0.8) & (u < -0.35) & (abs(v) < 0.8)),
    "crescent": lambda u, v: (u * u + v * v < 0.8) & ((u - 0.45) ** 2 + v * v > 0.5),
    "cross": lambda u, v: ((abs(u - v) < 0.35) | (abs(u + v) < 0.35)) & (u * u + v * v < 0.9),
    "bar": lambda u, v: (abs(v) < 0.22) & (abs(u) < 0.95),
    "three dots": lambda u, v: _dots(u, v, [(0.0, 0.6), (-0.52, -0.3), (0.52, -0.3)], 0.33),
}
FILLS: dict[str, Mask] = {
    "solid": lambda u, v: np.ones(u.shape, dtype=bool),
    "h-stripes": lambda u, v: _lattice(v, 0.5) < 0.13,
    "v-stripes": lambda u, v: _lattice(u, 0.5) < 0.13,
    "dotted": lambda u, v: _lattice(u, 0.5) ** 2 + _lattice(v, 0.5) ** 2 < 0.14 ** 2,
    "checkered": lambda u, v: (np.floor(u / 0.4) + np.floor(v / 0.4)) % 2 == 0,
    "rings": lambda u, v: _lattice(np.sqrt(u * u + v * v), 0.45) < 0.12,
    "grid": lambda u, v: (_lattice(u, 0.5) < 0.08) | (_lattice(v, 0.5) < 0.08),
    "d-stripes": lambda u, v: _lattice(u + v, 0.6) < 0.15,
    "bands": lambda u, v: _lattice(v, 1.0) < 0.3,
    "holes": lambda u, v: _lattice(u, 0.7) ** 2 + _lattice(v, 0.7) ** 2 > 0.2 ** 2,
}


def synthetic_classes(classes: int) -> list[tuple[str, Mask, Mask]]:
    """(name, shape, fill) of each class: shape c with fill c (fills repeat after 10 classes)."""
    if not 2 <= classes <= len(SHAPES):
        raise DataError(f"data.synthetic_classes is {classes}, but the synthetic set has 2 to {len(SHAPES)} "
                        f"classes; set it in that range")
    fills = list(FILLS.items())
    return [(f"{shape_name} ({fills[c % len(fills)][0]})", shape, fills[c % len(fills)][1])
            for c, (shape_name, shape) in enumerate(list(SHAPES.items())[:classes])]


def _tinted(rng: np.random.Generator, n: int, darkest: float, lightest: float) -> np.ndarray:
    """(n, 3) colours: a grey level in [darkest, lightest] plus a random tint of any hue."""
    grey = rng.uniform(darkest, lightest, (n, 1))
    hue = rng.standard_normal((n, 3))
    hue -= hue.mean(axis=1, keepdims=True)  # orthogonal to grey: changes hue, not brightness
    hue /= np.linalg.norm(hue, axis=1, keepdims=True) + 1e-6
    return (grey + hue * rng.uniform(0.0, 0.25, (n, 1))).astype(np.float32)


def synthetic_images(n: int, classes: int, seed: int = SYNTHETIC_SEED, size: int = SYNTHETIC_SIZE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`n` (size x size) RGB uint8 images and their labels, class-balanced; see SHAPES and FILLS.

    Everything but the class's shape and fill is a random nuisance drawn independently of
    the class: position, size, colours, background shading and noise. Colours vary only
    moderately (MoCo's colour jitter spans them): with strong colours the easiest way to
    tell two images apart is colour, and short runs then learn little about structure.
    """
    kinds = synthetic_classes(classes)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    def per_image(low: float, high: float) -> np.ndarray:  # one value per image, broadcast over pixels
        return rng.uniform(low, high, n).astype(np.float32)[:, None, None]

    # Shape coordinates: centre within the middle fifth, 11 to 15 pixels per unit (at 32 px).
    scale = per_image(0.34, 0.46) * size
    u = (x - per_image(0.4, 0.6) * size) / scale
    v = (y - per_image(0.4, 0.6) * size) / scale
    mask = np.empty((n, size, size), dtype=bool)
    for label, (_, shape, fill) in enumerate(kinds):
        chosen = labels == label
        mask[chosen] = shape(u[chosen], v[chosen]) & fill(u[chosen], v[chosen])

    # A light shape on a darker background, so grayscale views keep it.
    fg, bg = _tinted(rng, n, 0.55, 0.95), _tinted(rng, n, 0.05, 0.45)
    image = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    # Shading: a linear ramp in a random direction, then pixel noise.
    angle = per_image(0, 2 * np.pi)
    ramp = ((x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)) * per_image(0, 0.6 / size)
    image += ramp[..., None]
    image += rng.standard_normal(image.shape, dtype=np.float32) * per_image(0, 0.04)[..., None]
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), labels


def synthetic_source(cfg: DataConfig) -> DataSplits:
    names = [name for name, _, _ in synthetic_classes(cfg.synthetic_classes)]
    train_x, train_y = synthetic_images(cfg.synthetic_size, cfg.synthetic_classes, SYNTHETIC_SEED)
    val_x, val_y = synthetic_images(max(1, cfg.synthetic_size // 4), cfg.synthetic_classes, SYNTHETIC_SEED + 1)
    return check_sizes(DataSplits(ArrayImages(train_x, train_y, names), ArrayImages(val_x, val_y, names), names),
                        "the synthetic set")

