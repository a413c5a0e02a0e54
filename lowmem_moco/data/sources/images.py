"""Labelled image sets: images listed by path or held in one array (decoded to RGB by
decoding.py), the warning for images smaller than the crop, the train/val split.
`registry.build_datasets` makes them; `two_views` turns them into model inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ...errors import DataError
from .decoding import UnreadableImageError, to_rgb, unreadable_reason

# The held-out validation images must not move when the training seed changes.
VAL_SPLIT_SEED = 20200309


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

    # Whether shorter_sides() of every image costs next to nothing (no file is opened).
    sizes_are_free = False

    def shorter_sides(self, positions: Sequence[int]) -> np.ndarray:
        """Shorter side in px of the images at `positions` (-1 where unreadable), as cheaply as
        the set allows: file-backed sets read only the file headers."""
        sides = np.full(len(positions), -1, dtype=np.int64)
        for n, i in enumerate(positions):
            try:
                sides[n] = min(self.load(int(i)).size)
            except DataError:
                pass
        return sides

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
        path, image_format = self.path(i), None
        try:
            with open(path, "rb") as file:
                image = Image.open(file)
                image_format = image.format
                image.load()  # decode now, so truncated files fail here and not in a transform
            return to_rgb(image)
        except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
            raise UnreadableImageError(path, unreadable_reason(err, path, image_format)) from err

    def shorter_sides(self, positions: Sequence[int]) -> np.ndarray:
        sides = np.full(len(positions), -1, dtype=np.int64)
        for n, i in enumerate(positions):
            try:
                with Image.open(self.path(int(i))) as image:  # reads the header only, no pixels
                    sides[n] = min(image.size)
            except Exception:  # unreadable: reported when it is loaded
                pass
        return sides

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

    sizes_are_free = True  # one array: every image has its shape

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[self.index[self._position(i)]])

    def shorter_sides(self, positions: Sequence[int]) -> np.ndarray:
        return np.full(len(positions), min(self.array.shape[1:3]), dtype=np.int64)

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



# ---------------------------------------------------------------- images smaller than the crop

# Images whose headers are read to count those smaller than the crop; larger sets are sampled
# evenly. A header took 45-65 us (CIFAR JPEGs in the page cache, a busy 2-core CPU): under a
# second for 10,000; at that rate ImageNet's 1.28M would hold up the start for over a minute.
SIZE_SAMPLE = 10_000


def small_images_line(count: int, total: int, image_size: int, smallest: int, sampled: int | None = None) -> str:
    """The one warning line for images whose shorter side is below the crop size."""
    if sampled is None:
        head = f"{count} of {total} images are"
    else:
        head = f"about {round(count / sampled * total)} of {total} images ({count} of {sampled} looked at) are"
    return (f"{head} smaller than {image_size} px on their shorter side (the smallest: {smallest} px): their "
            f"crops are upscaled; lower data.image_size if that is most of them")


def small_images_report(images: LabelledImages, image_size: int, sample: int = SIZE_SAMPLE) -> str | None:
    """small_images_line() for the images below `image_size` px on their shorter side; None if none.

    Exact when sizes are free or the set has at most `sample` images; else an estimate from
    `sample` images spread evenly through the set (so through every class).
    """
    total = len(images)
    exact = images.sizes_are_free or total <= sample
    positions = np.arange(total) if exact else np.linspace(0, total - 1, sample).round().astype(np.int64)
    sides = images.shorter_sides(positions)
    small = sides[(sides >= 0) & (sides < image_size)]
    if not len(small):
        return None
    return small_images_line(len(small), total, image_size, int(small.min()), None if exact else len(positions))


def warn_small_images(images: LabelledImages, image_size: int) -> None:
    """One warning line, when some images are smaller than the crop (see small_images_report)."""
    note = small_images_report(images, image_size)
    if note:
        warnings.warn(note, stacklevel=2)


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


