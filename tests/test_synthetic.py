"""The synthetic set (data/synthetic.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lowmem_moco.config import DataConfig
from lowmem_moco.data.sources import build_datasets
from lowmem_moco.data.synthetic import synthetic_images
from lowmem_moco.errors import DataError


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_balanced():
    images, labels = synthetic_images(5000, 10)
    assert images.shape == (5000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    again, labels_again = synthetic_images(5000, 10)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert images.std() > 30  # not blank


def test_synthetic_splits(synthetic):
    assert len(synthetic.train) == 200 and len(synthetic.val) == 50 and len(synthetic.classes) == 10
    assert np.bincount(synthetic.val.targets, minlength=10).min() >= 4
    assert synthetic.train.load(0).size == (32, 32)
    with pytest.raises(DataError, match="synthetic_classes"):
        build_datasets(DataConfig(source="synthetic", synthetic_classes=100))
