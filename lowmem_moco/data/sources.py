"""Where the images come from (`cfg.data.source`), as DataSplits(train, val, classes):

    folder       an ImageFolder tree, root/<class>/<image>.jpg; val from val_dir or carved out
    cifar10      torchvision's CIFAR-10 (or a JPEG copy extracted as root/train/<class>/...)
    imagenette   fast.ai's 160-px archives, downloaded once, checksummed, official val split
    imagewoof
    synthetic    drawn on the fly (synthetic.py): no download, fixed seed

Every user mistake raises `DataError` with one sentence saying what is wrong and what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import urllib.request
import warnings
from collections import Counter
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset
from torchvision.datasets.utils import calculate_md5

from ..config import DataConfig
from ..errors import DataError
from .images import ArrayImages, DataSplits, FileImages, LabelledImages, check_sizes, split_off_val
from .synthetic import synthetic_source

log = logging.getLogger(__name__)

LAYOUT = "<folder>/<class>/<image>.jpg"
# What a folder scan reads: torchvision's ImageFolder list and GIF (its first frame). Every
# format is decoded by PIL on the per-image path and into the decoded cache alike.
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif",)


# fast.ai's 160-px archives. Full-file md5s: imagenette's as in torchvision.datasets.Imagenette,
# imagewoof's as in catalyst's Imagewoof160 (fastai's own checks.txt hashes only the first MiB).
ARCHIVES = {
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                   "e793b78cc4c9e9a4ccc0c1155377a412"),
    "imagewoof": ("https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz",
                  "fcd23cc7dfce8837c95a8f9d63a128b7"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"



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
        if any(has_file_allowed_extension(e.name, IMAGE_EXTENSIONS) for e in entries):
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
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images to them or remove them")
    return FileImages([path for path, _ in samples], [target for _, target in samples], classes)


def _list_images(directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, class index) of every image, with empty classes simply contributing nothing.

    Hidden files and folders (.DS_Store, macOS's ._name.jpg copies, .ipynb_checkpoints) and
    files of other types are ignored, with one warning that counts them by kind.
    """
    root = len(os.path.expanduser(str(directory)))  # make_dataset's paths start with it
    ignored: Counter = Counter()  # kind ("hidden", ".txt", ...) -> files

    def is_image(path: str) -> bool:
        hidden = os.sep + "." in path[root:]
        if not hidden and has_file_allowed_extension(path, IMAGE_EXTENSIONS):
            return True
        ignored["hidden" if hidden else os.path.splitext(path)[1].lower() or "no extension"] += 1
        return False

    try:
        samples = make_dataset(str(directory), class_to_idx, is_valid_file=is_image, allow_empty=True)
    except TypeError:  # torchvision < 0.17: no allow_empty, and an empty class raises
        samples = []
        for name, index in class_to_idx.items():
            try:
                samples += make_dataset(str(directory), {name: index}, is_valid_file=is_image)
            except FileNotFoundError:
                pass
    if ignored:
        kinds = _few([f"{count} {kind}" for kind, count in sorted(ignored.items(), key=lambda kc: (-kc[1], kc[0]))])
        warnings.warn(f"ignored {sum(ignored.values())} files in {directory} that are not images or are hidden "
                      f"({kinds}); images are files ending {' '.join(IMAGE_EXTENSIONS)}", stacklevel=2)
    return samples


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
    return check_sizes(DataSplits(train, val, train.classes), str(train_dir))


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
    return check_sizes(DataSplits(train, val, images.classes), f"CIFAR-10 in {root}")


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
    from rich.progress import wrap_file

    partial = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with wrap_file(response, total=size, description=f"downloading {dest.name}") as source:
                shutil.copyfileobj(source, out, 1 << 20)
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
    return check_sizes(DataSplits(train, val, train.classes), str(folder))



SOURCES = {
    "folder": _folder_source,
    "cifar10": _cifar10_source,
    "imagenette": _fastai_source,
    "imagewoof": _fastai_source,
    "synthetic": synthetic_source,
}


def build_datasets(cfg: DataConfig) -> DataSplits:
    """The training images and the labelled validation images `cfg` describes."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source {cfg.source!r} is unknown; use one of {', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg)


