"""Image sets (data/images.py): every PIL mode decodes to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from conftest import folder_cfg
from lowmem_moco.data import images
from lowmem_moco.data.sources import build_datasets


# ---------------------------------------------------------------- decoding


def test_every_mode_loads_as_rgb(tmp_path):
    folder = tmp_path / "modes" / "x"
    folder.mkdir(parents=True)
    Image.new("L", (4, 4), 77).save(folder / "l.png")
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(folder / "rgba_clear.png")
    Image.new("RGBA", (4, 4), (0, 0, 255, 255)).save(folder / "rgba_solid.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(folder / "p.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(folder / "i16_white.png")
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(folder / "i16_mid.png")
    Image.fromarray(np.full((4, 4), 1000, np.int32)).save(folder / "i32.tif")
    images = build_datasets(folder_cfg(tmp_path / "modes", val_dir=str(tmp_path / "modes"))).train
    pixel = {Path(images.path(i)).stem: images.load(i) for i in range(len(images))}
    assert all(image.mode == "RGB" for image in pixel.values())
    value = {name: image.getpixel((0, 0)) for name, image in pixel.items()}
    assert value["l"] == (77, 77, 77) and value["p"] == (0, 200, 0)
    assert value["rgba_clear"] == (255, 255, 255) and value["rgba_solid"] == (0, 0, 255)
    assert value["i16_white"] == (255, 255, 255) and value["i16_mid"] == (128, 128, 128)
    assert value["i32"] == (4, 4, 4)  # 1000 / 65535 of full scale, not clipped to white


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.info["transparency"] = 1
    assert images.to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
