"""Where the images come from (`cfg.data.source`), as DataSplits(train, val, classes):

    folder       an ImageFolder tree, root/<class>/<image>.jpg; val from val_dir or carved out
    cifar10      torchvision's CIFAR-10 (or a JPEG copy extracted as root/train/<class>/...)
    imagenette   fast.ai's 160-px archives, downloaded once, checksummed, official val split
    imagewoof
    synthetic    drawn on the fly (synthetic.py): no download, fixed seed

Every user mistake raises `DataError` with one sentence saying what is wrong and what to do.
"""

from __future__ import annotations

from ...config import DataConfig
from ...errors import DataError
from .downloads import cifar10_source, fastai_source
from .folders import folder_source
from .images import DataSplits
from .synthetic import synthetic_source

SOURCES = {
    "folder": folder_source,
    "cifar10": cifar10_source,
    "imagenette": fastai_source,
    "imagewoof": fastai_source,
    "synthetic": synthetic_source,
}


def build_datasets(cfg: DataConfig) -> DataSplits:
    """The training images and the labelled validation images `cfg` describes."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source {cfg.source!r} is unknown; use one of {', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg)


