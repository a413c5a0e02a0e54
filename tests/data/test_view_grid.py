"""`lowmem-moco views`: the training views of the first N images, as a picture and a uint8 tensor."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowmem_moco.cli import main
from lowmem_moco.config import load_config
from lowmem_moco.data.sources.registry import build_datasets

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.synthetic_size=64", "data.num_workers=0"]
# Every random operation off and the crop the whole image: a view is then the image itself.
IDENTITY = ["augment.crop_scale=[1,1]", "augment.crop_ratio=[1,1]", "augment.jitter_prob=0",
            "augment.grayscale_prob=0", "augment.blur_prob=0", "augment.flip_prob=0"]


@pytest.mark.parametrize("path", ["batched", "per_image"])
def test_views_are_the_training_images_when_augmentation_is_off(path, tmp_path):
    overrides = [*SMALL, *IDENTITY, f"data.augment={path}", f"data.cache_dir={tmp_path / 'cache'}"]
    tensor = tmp_path / "views.pt"
    assert main(["views", str(REPO / "recipes/demo.yaml"), *overrides, "--out", str(tmp_path / "v.png"),
                 "--n", "3", "--tensor", str(tensor)]) == 0
    views = torch.load(tensor)
    assert views.dtype == torch.uint8 and views.shape == (3, 2, 3, 32, 32)
    train = build_datasets(load_config(REPO / "recipes/demo.yaml", overrides).data).train
    images = torch.stack([torch.from_numpy(np.asarray(train.load(i))).permute(2, 0, 1) for i in range(3)])
    assert torch.equal(views[:, 0], images) and torch.equal(views[:, 1], images)


def test_views_picture_shows_query_and_key_side_by_side(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["views", str(REPO / "recipes/demo.yaml"), *SMALL, f"data.cache_dir={tmp_path / 'cache'}",
                 "--out", str(out), "--n", "2", "--tensor", str(tmp_path / "v.pt")]) == 0
    assert "2 images x 2 views at 32 px" in capsys.readouterr().out
    views = torch.load(tmp_path / "v.pt")
    assert not torch.equal(views[:, 0], views[:, 1])  # two independent MoCo v2 views
    tile, pad = 96, 4  # 32-px views enlarged 3x, 4 tiles in one row
    assert Image.open(out).size == (4 * (tile + pad) + pad, tile + 2 * pad)
    assert main(["views", str(REPO / "recipes/demo.yaml"), *SMALL, "--n", "100000"]) == 2
    assert "more than the 64 training images" in capsys.readouterr().err
