"""Labelled image sets for MoCo training and for the kNN monitor.

    splits = build_datasets(cfg.data)        # DataSplits(train, val, classes)
    train = TwoViews(splits.train, mocov2_transform(size), cfg.data.on_bad_image)
    loader = DataLoader(train, batch_size=..., sampler=SeededShuffle(len(train), seed))
    val = EvalImages(splits.val, size)       # (image, label) for kNN features

Sources (`cfg.source`):
    folder       an ImageFolder tree, root/<class>/<image>.jpg; val from val_dir or carved out
    cifar10      torchvision's CIFAR-10 (or a JPEG copy extracted as root/train/<class>/...)
    imagenette   fast.ai's 160-px archives, downloaded once, checksummed, official val split
    imagewoof
    synthetic    drawn on the fly: no download, fixed seed, class = a shape and its fill pattern

Every user mistake raises `DataError` with one sentence saying what is wrong and what to do.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset
from torchvision.datasets.utils import calculate_md5

from .augment import eval_transform
from ..config import DataConfig
from ..errors import DataError

log = logging.getLogger(__name__)

LAYOUT = "<folder>/<class>/<image>.jpg"
# The held-out validation images must not move when the training seed changes.
VAL_SPLIT_SEED = 20200309
SYNTHETIC_SEED = 1729
SYNTHETIC_SIZE = 32

# fast.ai's 160-px archives. Full-file md5s: imagenette's as in torchvision.datasets.Imagenette,
# imagewoof's as in catalyst's Imagewoof160 (fastai's own checks.txt hashes only the first MiB).
ARCHIVES = {
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                   "e793b78cc4c9e9a4ccc0c1155377a412"),
    "imagewoof": ("https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz",
                  "fcd23cc7dfce8837c95a8f9d63a128b7"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


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


# ---------------------------------------------------------------- image folders


def _image_folder(directory: Path, setting: str, classes: list[str] | None = None) -> FileImages:
    """Scan `directory`/<class>/<image> with torchvision's helpers, turning its errors into clear ones.

    `classes` (for a validation folder) is the training set's class list: labels then use
    its indices, and a class folder it lacks is an error.
    """
    if not directory.exists():
        raise DataError(f"image folder {directory} does not exist; set {setting} to a folder laid out as {LAYOUT}")
    if not directory.is_dir():
        raise DataError(f"{directory} is a file, not a folder; set {setting} to a folder laid out as {LAYOUT}")
    try:
        names = find_classes(directory)[0]
    except FileNotFoundError:  # no sub-folders at all
        names = []
    names = [n for n in names if not n.startswith(".")]  # .ipynb_checkpoints and the like
    if not names:
        entries = [e for e in directory.iterdir() if not e.name.startswith(".")]
        if not entries:
            raise DataError(f"image folder {directory} is empty; put one sub-folder of images per class in it "
                            f"({directory}/<class>/<image>.jpg)")
        if any(has_file_allowed_extension(e.name, IMG_EXTENSIONS) for e in entries):
            raise DataError(f"{directory} holds images but no class sub-folders; move them into one sub-folder "
                            f"per class ({directory}/<class>/<image>.jpg; a single class folder is fine)")
        raise DataError(f"{directory} has no class sub-folders; put one sub-folder of images per class in it "
                        f"({directory}/<class>/<image>.jpg)")
    if classes is None:
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"{directory} has class folders the training images lack ({_few(unknown)}); "
                        f"use the training set's class folder names there")
    class_to_idx = {name: classes.index(name) for name in names}
    samples = _list_images(directory, class_to_idx)
    present = {target for _, target in samples}
    empty = [name for name in names if class_to_idx[name] not in present]
    if empty:
        raise DataError(f"class folder(s) {_few(empty)} in {directory} hold no images "
                        f"({', '.join(IMG_EXTENSIONS)}); add images to them or remove them")
    return FileImages([path for path, _ in samples], [target for _, target in samples], classes)


def _list_images(directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, class index) of every image, with empty classes simply contributing nothing."""
    try:
        return make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except TypeError:  # torchvision < 0.17: no allow_empty, and an empty class raises
        samples = []
        for name, index in class_to_idx.items():
            try:
                samples += make_dataset(str(directory), {name: index}, extensions=IMG_EXTENSIONS)
            except FileNotFoundError:
                pass
        return samples


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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


def _check_sizes(splits: DataSplits, where: str) -> DataSplits:
    if len(splits.train) < 2:
        raise DataError(f"{where} has {len(splits.train)} training image(s) after holding out validation images; "
                        f"MoCo needs at least 2 (many more in practice), so add images")
    if splits.val is not None and len(splits.val) < 1:
        raise DataError(f"{where} leaves no images for validation; give each class at least 2 images "
                        f"or set data.val_dir to a labelled folder")
    return splits


def _folder_source(cfg: DataConfig) -> DataSplits:
    root = Path(cfg.root)
    if cfg.train_dir:
        train_dir, setting = Path(cfg.train_dir), "data.train_dir"
    else:
        train_dir, setting = (root / "train" if (root / "train").is_dir() else root), "data.root"
    train = _image_folder(train_dir, setting)
    if cfg.val_dir:
        val = _image_folder(Path(cfg.val_dir), "data.val_dir", train.classes)
    elif cfg.val_fraction == 0:  # train on every image; test on root/val when there is one
        beside = root / "val"
        val = _image_folder(beside, "data.root", train.classes) if train_dir != beside and beside.is_dir() else None
    else:
        train, val = split_off_val(train, cfg.val_fraction)
    return _check_sizes(DataSplits(train, val, train.classes), str(train_dir))


# ---------------------------------------------------------------- CIFAR-10


def _cifar10_source(cfg: DataConfig) -> DataSplits:
    root = Path(cfg.root)
    jpeg_dir = root / "train"
    if jpeg_dir.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in jpeg_dir.iterdir()):
        images: LabelledImages = _image_folder(jpeg_dir, "data.root")
    else:
        from torchvision.datasets import CIFAR10

        try:
            data = CIFAR10(str(root), train=True, download=cfg.download)
        except RuntimeError:  # not there and download=False, or a corrupt copy
            raise DataError(f"CIFAR-10 is not in {root} (or is damaged); set data.download=true, or put "
                            f"cifar-10-python.tar.gz from {CIFAR10_URL} there") from None
        except OSError as err:  # no network, unwritable root, ...
            raise DataError(f"could not download CIFAR-10 from {CIFAR10_URL} into {root} ({err}); put "
                            f"cifar-10-python.tar.gz (or its cifar-10-batches-py folder) in {root}, or a JPEG "
                            f"copy as {root}/train/<class>/<image>.jpg") from None
        images = ArrayImages(data.data, data.targets, data.classes)
    if cfg.val_fraction > 0:
        train, val = split_off_val(images, cfg.val_fraction)
    else:  # every training image, as the official notebook; the 10,000-image test split when present
        train, val = images, _cifar10_test(cfg, images.classes)
    return _check_sizes(DataSplits(train, val, images.classes), f"CIFAR-10 in {root}")


def _cifar10_test(cfg: DataConfig, classes: list[str]) -> LabelledImages | None:
    """CIFAR-10's test split: a JPEG copy (root/test or root/val) or torchvision's archive; None if absent."""
    root = Path(cfg.root)
    for name in ("test", "val"):
        if (root / name).is_dir():
            return _image_folder(root / name, "data.root", classes)
    from torchvision.datasets import CIFAR10

    try:
        data = CIFAR10(str(root), train=False, download=False)
    except RuntimeError:  # not downloaded: the training images came as JPEGs alone
        return None
    return ArrayImages(data.data, data.targets, data.classes)


# ---------------------------------------------------------------- Imagenette / Imagewoof


def _download(url: str, dest: Path) -> None:
    """Fetch `url` to `dest` with a progress bar; a partial file never takes `dest`'s name."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    partial = dest.with_name(dest.name + ".part")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out, \
                Progress(*columns) as progress:
            size = int(response.headers.get("Content-Length") or 0) or None
            task = progress.add_task(f"downloading {dest.name}", total=size)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                progress.advance(task, len(chunk))
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors; ValueError: a malformed URL
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({err}); check the connection, or download it by hand "
                        f"into {dest.parent}/") from None
    partial.replace(dest)


# Python's "data" filter (3.12, backported to 3.9.17+) refuses absolute paths and links out of the folder.
_SAFE_TAR = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _extract(archive: Path, root: Path, folder: str) -> None:
    """Unpack `archive` (which holds `folder`/) into root/`folder`, all or nothing."""
    scratch = root / f".{folder}.extracting"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, **_SAFE_TAR)
    except (tarfile.TarError, OSError, EOFError) as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DataError(f"could not unpack {archive} ({err}); delete it and run again to download it afresh") from None
    if not (scratch / folder).is_dir():
        shutil.rmtree(scratch, ignore_errors=True)
        raise DataError(f"{archive} does not contain a {folder}/ folder; delete it and run again to download "
                        f"the real archive")
    (scratch / folder).replace(root / folder)
    shutil.rmtree(scratch, ignore_errors=True)


def _fastai_source(cfg: DataConfig) -> DataSplits:
    url, md5 = ARCHIVES[cfg.source]
    root = Path(cfg.root)
    name = url.rsplit("/", 1)[1].removesuffix(".tgz")
    folder = root / name
    if not ((folder / "train").is_dir() and (folder / "val").is_dir()):
        archive = root / f"{name}.tgz"
        if not archive.is_file():
            if not cfg.download:
                raise DataError(f"{name} is not in {root}; set data.download=true, or download {url} "
                                f"into {root}/ (the extracted {name}/ folder works too)")
            _download(url, archive)
        actual = calculate_md5(archive)
        if actual != md5:
            raise DataError(f"{archive} is incomplete or damaged (md5 {actual}, expected {md5}); "
                            f"delete it and run again to download it afresh")
        _extract(archive, root, name)
        log.info("extracted %s into %s", archive, folder)
    train = _image_folder(folder / "train", "data.root")
    val = _image_folder(folder / "val", "data.root", train.classes)
    return _check_sizes(DataSplits(train, val, train.classes), str(folder))


# ---------------------------------------------------------------- synthetic shapes


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


def _synthetic_source(cfg: DataConfig) -> DataSplits:
    names = [name for name, _, _ in synthetic_classes(cfg.synthetic_classes)]
    train_x, train_y = synthetic_images(cfg.synthetic_size, cfg.synthetic_classes, SYNTHETIC_SEED)
    val_x, val_y = synthetic_images(max(1, cfg.synthetic_size // 4), cfg.synthetic_classes, SYNTHETIC_SEED + 1)
    return _check_sizes(DataSplits(ArrayImages(train_x, train_y, names), ArrayImages(val_x, val_y, names), names),
                        "the synthetic set")


SOURCES = {
    "folder": _folder_source,
    "cifar10": _cifar10_source,
    "imagenette": _fastai_source,
    "imagewoof": _fastai_source,
    "synthetic": _synthetic_source,
}


def build_datasets(cfg: DataConfig) -> DataSplits:
    """The training images and the labelled validation images `cfg` describes."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source {cfg.source!r} is unknown; use one of {', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg)


# ---------------------------------------------------------------- model inputs

_warned: set[str] = set()  # unreadable files already reported by this process


def _load_readable(base: LabelledImages, index: int, on_bad_image: str, known_bad: set[int]
                   ) -> tuple[Image.Image, int, int]:
    """(image, index actually used, files skipped): `index`, or the next readable one after it."""
    last: UnreadableImageError | None = None
    for skipped in range(len(base)):
        i = (index + skipped) % len(base)
        if i in known_bad:
            continue
        try:
            return base.load(i), i, skipped
        except UnreadableImageError as err:
            if on_bad_image == "error":
                raise
            known_bad.add(i)
            last = err
            if err.path not in _warned:
                _warned.add(err.path)
                log.warning("skipping unreadable image %s (%s)", err.path, err.__cause__)
    where = f" (e.g. {last.path})" if last else ""
    raise DataError(f"none of the {len(base)} images could be read{where}; check that the data folder holds images")


def _check_policy(on_bad_image: str) -> str:
    if on_bad_image not in ("skip", "error"):
        raise DataError(f"data.on_bad_image must be skip or error, got {on_bad_image!r}; set one of those")
    return on_bad_image


class TwoViews(Dataset):
    """MoCo input: two independently augmented views of one image.

    Indexed by (index, sample_seed): the views depend only on that key, never on the
    worker process or on what it made before, so runs and resumes are reproducible.
    """

    def __init__(self, base: LabelledImages, transform: Callable, on_bad_image: str = "skip"):
        self.base, self.transform = base, transform
        self.on_bad_image = _check_policy(on_bad_image)
        self._known_bad: set[int] = set()  # per process: each worker keeps its own copy

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not isinstance(key, (tuple, list)):
            raise TypeError("TwoViews is indexed by (index, sample_seed) pairs; sample it with SeededShuffle")
        index, sample_seed = key
        image, _, skipped = _load_readable(self.base, index, self.on_bad_image, self._known_bad)
        # A private RNG stream per sample; the caller's torch RNG state is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_seed) & 0xFFFF_FFFF_FFFF_FFFF)
            view_q = self.transform(image)
            view_k = self.transform(image)
        return view_q, view_k, skipped


class EvalImages(Dataset):
    """(view, label) pairs for probes, by default the deterministic eval view; an unreadable
    file is handled like in TwoViews."""

    def __init__(self, base: LabelledImages, image_size: int, on_bad_image: str = "skip",
                 transform: Callable | None = None):
        self.base, self.transform = base, transform or eval_transform(image_size)
        self.on_bad_image = _check_policy(on_bad_image)
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, used, _ = _load_readable(self.base, i, self.on_bad_image, self._known_bad)
        return self.transform(image), self.base.targets[used]


class SeededShuffle(Sampler):
    """Keys for TwoViews: a fresh shuffle and a fresh seed per sample every epoch.

    Both derive from (seed, epoch) alone, so an epoch can be replayed (or resumed from
    `start`, the number of samples already consumed) exactly.
    """

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed = length, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.length - self.start

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        order = torch.randperm(self.length, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.length,), generator=generator).tolist()
        return iter(list(zip(order, seeds))[self.start:])
