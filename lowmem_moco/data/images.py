"""Labelled image sets: decoding to RGB, images listed by path or held in one array, the
train/val split. `sources.build_datasets` makes them; `two_views` turns them into model inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

# The held-out validation images must not move when the training seed changes.
VAL_SPLIT_SEED = 20200309


# ---------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit scaled down, transparency composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float grey levels: scale to 0..255 instead of clipping
        # (a plain convert("L") turns most of a 16-bit image white).
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        full = 65535.0 if mode.startswith("I;16") or peak > 255 else 1.0 if mode == "F" and peak <= 1 else 255.0
        grey = np.clip(values * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (missing, truncated, corrupt or not an image)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"cannot read image {path} ({reason}); replace or delete the file, "
                         f"or set data.on_bad_image=skip to skip such files")


# ---------------------------------------------------------------- labelled image sets


class LabelledImages(Dataset):
    """A labelled image set: `load(i)` gives an RGB PIL image, `targets[i]` its class index."""

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.load(i), self.targets[i]

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        raise NotImplementedError

    def _position(self, i: int) -> int:
        return range(len(self))[i]  # IndexError for out-of-range, like a list


class _PathTable:
    """Many file paths in two numpy arrays instead of a list of str objects.

    DataLoader workers touching Python objects copy their memory pages (reference
    counts), so a million-path list grows by its full size in every worker.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i else 0
        return self.blob[start:int(self.ends[i])].tobytes().decode("utf-8", "surrogateescape")


class FileImages(LabelledImages):
    """Images read from files on disk (ImageFolder-style sets)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], classes: list[str]):
        self.paths = _PathTable([str(p) for p in paths])
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)

    def path(self, i: int) -> str:
        return self.paths[self._position(i)]

    def load(self, i: int) -> Image.Image:
        path = self.path(i)
        try:
            with open(path, "rb") as file:
                image = Image.open(file)
                image.load()  # decode now, so truncated files fail here and not in a transform
            return to_rgb(image)
        except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
            raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err

    def subset(self, indices: Sequence[int]) -> "FileImages":
        indices = [self._position(i) for i in indices]
        return FileImages([self.paths[i] for i in indices], [self.targets[i] for i in indices], self.classes)


class ArrayImages(LabelledImages):
    """Images held in memory as one uint8 (N, H, W, 3) array; subsets share the array."""

    def __init__(self, array: np.ndarray, targets: Sequence[int], classes: list[str],
                 index: np.ndarray | None = None):
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (N, H, W, 3) array, got {array.dtype} {array.shape}")
        self.array = array
        self.index = np.arange(len(array)) if index is None else np.asarray(index, dtype=np.int64)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        if len(self.targets) != len(self.index):
            raise ValueError(f"{len(self.targets)} targets for {len(self.index)} images")

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[self.index[self._position(i)]])

    def subset(self, indices: Sequence[int]) -> "ArrayImages":
        indices = [self._position(i) for i in indices]
        return ArrayImages(self.array, [self.targets[i] for i in indices], self.classes, self.index[indices])


@dataclass
class DataSplits:
    train: LabelledImages  # what MoCo trains on (its labels are only for reports)
    # Labelled held-out images for the kNN monitor and probes; None when data.val_fraction is 0
    # and the source has no test split of its own (nothing to test on).
    val: LabelledImages | None
    classes: list[str]



# ---------------------------------------------------------------- splits


def split_off_val(images: LabelledImages, fraction: float) -> tuple[LabelledImages, LabelledImages]:
    """Hold out `fraction` of every class (at least one image of each class with two or more).

    Each class is shuffled by its own fixed seed, so the split never depends on the
    training seed, and adding a class leaves the other classes' splits unchanged.
    """
    targets = np.asarray(images.targets)
    train, val = [], []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        members = np.random.default_rng([VAL_SPLIT_SEED, int(label)]).permutation(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return images.subset(sorted(train)), images.subset(sorted(val))


def check_sizes(splits: DataSplits, where: str) -> DataSplits:
    if len(splits.train) < 2:
        raise DataError(f"{where} has {len(splits.train)} training image(s) after holding out validation images; "
                        f"MoCo needs at least 2 (many more in practice), so add images")
    if splits.val is not None and len(splits.val) < 1:
        raise DataError(f"{where} leaves no images for validation; give each class at least 2 images "
                        f"or set data.val_dir to a labelled folder")
    return splits


