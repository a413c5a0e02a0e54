"""Shared test fixtures: a small real image folder cut from the CIFAR-10 JPEG tarball, the
synthetic set, one CPU thread. Helpers that are not fixtures are in support.py."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest

from lowmem_moco.config import DataConfig
from lowmem_moco.data.sources.registry import build_datasets

from benchmarks.harness.images import CIFAR10_TARBALL as CIFAR_TARBALL  # data/ in the checkout (git-ignored): the one place
IMAGES_PER_CLASS = 40
SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # no paths out of the folder


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """Folder holding 10 CIFAR-10 class folders of IMAGES_PER_CLASS JPEGs each (train/<class>/NNNN.jpg)."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 JPEG tarball not found at {CIFAR_TARBALL} (copy or link it there; README: Tests)")
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


@pytest.fixture(scope="module")
def synthetic():
    return build_datasets(DataConfig(source="synthetic", synthetic_size=200, synthetic_classes=10))
