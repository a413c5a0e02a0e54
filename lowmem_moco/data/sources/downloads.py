"""Sources fetched from the network once: CIFAR-10 (torchvision's archive, or a JPEG copy of
it) and fast.ai's Imagenette / Imagewoof archives (downloaded, checksummed, unpacked all or
nothing). Each returns DataSplits; an image folder found in place is used as is.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import urllib.request
from pathlib import Path

from torchvision.datasets.utils import calculate_md5

from ...config import DataConfig
from ...errors import DataError
from .folders import image_folder
from .images import ArrayImages, DataSplits, LabelledImages, check_sizes, split_off_val

log = logging.getLogger(__name__)

# fast.ai's 160-px archives. Full-file md5s: imagenette's as in torchvision.datasets.Imagenette,
# imagewoof's as in catalyst's Imagewoof160 (fastai's own checks.txt hashes only the first MiB).
ARCHIVES = {
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                   "e793b78cc4c9e9a4ccc0c1155377a412"),
    "imagewoof": ("https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz",
                  "fcd23cc7dfce8837c95a8f9d63a128b7"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# ---------------------------------------------------------------- CIFAR-10


def cifar10_source(cfg: DataConfig) -> DataSplits:
    root = Path(cfg.root)
    jpeg_dir = root / "train"
    if jpeg_dir.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in jpeg_dir.iterdir()):
        images: LabelledImages = image_folder(jpeg_dir, "data.root")
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
            return image_folder(root / name, "data.root", classes)
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


def fastai_source(cfg: DataConfig) -> DataSplits:
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
    train = image_folder(folder / "train", "data.root")
    val = image_folder(folder / "val", "data.root", train.classes)
    return check_sizes(DataSplits(train, val, train.classes), str(folder))
