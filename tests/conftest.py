"""Shared test fixtures and helpers: a small real image folder cut from the CIFAR-10 JPEG tarball,
image folders drawn on the spot, the synthetic set."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lowmem_moco.config import DataConfig
from lowmem_moco.data.sources import build_datasets

CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-train-jpeg.tar.gz"
IMAGES_PER_CLASS = 40
SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # no paths out of the folder


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """Folder holding 10 CIFAR-10 class folders of IMAGES_PER_CLASS JPEGs each (train/<class>/NNNN.jpg)."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 JPEG tarball not found at {CIFAR_TARBALL}")
    out = tmp_path_factory.mktemp("cifar")
    taken: Counter = Counter()
    with tarfile.open(CIFAR_TARBALL) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or taken[parts[1]] >= IMAGES_PER_CLASS:
                continue
            taken[parts[1]] += 1
            tar.extract(member, out, **SAFE)
    return out / "train"


@pytest.fixture
def one_cpu_thread():
    """Tiny models on tiny inputs run fastest on one thread: with more, threads of a shared
    2-core machine wait for each other (a ResNet-50 step at 32 px: seconds instead of 0.2 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_image(path: Path, size=(8, 8), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            save_image(root / name / f"{i}.png", colour=(10 * i % 255, 50, 100))
    return root


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), **kw)


@pytest.fixture(scope="module")
def synthetic():
    return build_datasets(DataConfig(source="synthetic", synthetic_size=200, synthetic_classes=10))


def write_every_mode(folder: Path) -> dict:
    """One small image file per PIL mode and format a folder may hold; returns, per file name,
    the (H, W, 3) uint8 numpy pixels loading it must give: PIL's convert("RGB") for opaque images,
    16-bit grey scaled to 8 bits, transparency composited on white."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    grey = Image.fromarray(rgb[..., 0])
    sources = {
        "grey.jpg": grey, "grey.png": grey, "bilevel.png": grey.convert("1"),
        "palette.png": Image.fromarray(rgb).quantize(16), "palette.gif": Image.fromarray(rgb).quantize(16),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "rgb.jpg": Image.fromarray(rgb), "rgb.webp": Image.fromarray(rgb), "rgb.bmp": Image.fromarray(rgb),
        "opaque_rgba.png": Image.fromarray(rgb).convert("RGBA"),
    }
    for name, image in sources.items():
        image.save(folder / name, **({"lossless": True} if name.endswith(".webp") else {}))
    expected = {name: np.asarray(Image.open(folder / name).convert("RGB")) for name in sources}

    deep = rng.integers(0, 65536, (12, 10), dtype=np.uint16)  # 16-bit grey PNG: PIL mode I;16
    Image.fromarray(deep).save(folder / "grey16.png")
    expected["grey16.png"] = np.repeat(np.floor(deep / 65535 * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)

    alpha = rng.integers(0, 256, (12, 10, 1), dtype=np.uint8)  # half-transparent: composited on white
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(folder / "clear_rgba.png")
    over_white = (rgb * (alpha / 255.0) + 255 * (1 - alpha / 255.0)).round()
    expected["clear_rgba.png"] = over_white.astype(np.uint8)
    return expected
