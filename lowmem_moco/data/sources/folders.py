"""Image folders: a tree root/<class>/<image> scanned into a FileImages set (`image_folder`),
with every layout mistake turned into one clear DataError, and the `folder` source.

`image_folder` is shared: the CIFAR-10 JPEG copy and the downloaded archives (downloads.py)
are folders of this layout too.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from ...config import DataConfig
from ...errors import DataError
from .images import DataSplits, FileImages, check_sizes, split_off_val

LAYOUT = "<folder>/<class>/<image>.jpg"
# What a folder scan reads: torchvision's ImageFolder list and GIF (its first frame). Every
# format is decoded by PIL on the per-image path and into the decoded cache alike.
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif",)


def image_folder(directory: Path, setting: str, classes: list[str] | None = None) -> FileImages:
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


def folder_source(cfg: DataConfig) -> DataSplits:
    root = Path(cfg.root)
    if cfg.train_dir:
        train_dir, setting = Path(cfg.train_dir), "data.train_dir"
    else:
        train_dir, setting = (root / "train" if (root / "train").is_dir() else root), "data.root"
    train = image_folder(train_dir, setting)
    if cfg.val_dir:
        val = image_folder(Path(cfg.val_dir), "data.val_dir", train.classes)
    elif cfg.val_fraction == 0:  # train on every image; test on root/val when there is one
        beside = root / "val"
        val = image_folder(beside, "data.root", train.classes) if train_dir != beside and beside.is_dir() else None
    else:
        train, val = split_off_val(train, cfg.val_fraction)
    return check_sizes(DataSplits(train, val, train.classes), str(train_dir))
