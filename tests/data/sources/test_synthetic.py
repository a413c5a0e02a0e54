"""The synthetic set (data/sources/synthetic.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lowmem_moco.config import DataConfig
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.data.sources.synthetic import synthetic_images
from lowmem_moco.errors import DataError


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_balanced():
    images, labels = synthetic_images(5000, 10)
    assert images.shape == (5000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    again, labels_again = synthetic_images(5000, 10)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert images.reshape(5000, -1).std(axis=1).min() > 10  # every image shows a shape, none is blank
    # The label draws the shape: class-mean images stand apart (11.7 levels RMS at the closest pair;
    # at most 5.6 when labels are shuffled, i.e. when the shape ignored them).
    means = np.stack([images[labels == c].astype(np.float64).mean(axis=0) for c in range(10)])
    apart = np.sqrt(((means[:, None] - means[None]) ** 2).mean(axis=(2, 3, 4)))
    assert apart[np.triu_indices(10, 1)].min() > 8


def test_synthetic_splits(synthetic):
    assert len(synthetic.train) == 200 and len(synthetic.val) == 50 and len(synthetic.classes) == 10
    assert np.bincount(synthetic.val.targets, minlength=10).min() >= 4
    assert synthetic.train.load(0).size == (32, 32)
    with pytest.raises(DataError, match="synthetic_classes"):
        build_datasets(DataConfig(source="synthetic", synthetic_classes=100))
