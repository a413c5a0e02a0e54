"""Image sets (data/sources/images.py, decoding.py): every PIL mode decodes to RGB; unreadable files say why; images
smaller than the crop are counted from their headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from support import folder_cfg, write_every_mode
from lowmem_moco.data.sources import images
from lowmem_moco.data.sources.images import ArrayImages, FileImages, UnreadableImageError, small_images_report
from lowmem_moco.data.sources.registry import build_datasets


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


def test_each_format_and_mode_loads_as_pil_converts_it(tmp_path):
    """L, 1, P (PNG, GIF), CMYK (JPEG, TIFF), RGB(A) in JPEG/PNG/WebP/BMP, 16-bit grey: exact pixels."""
    expected = write_every_mode(tmp_path / "x")
    names = sorted(expected)
    files = FileImages([str(tmp_path / "x" / n) for n in names], [0] * len(names), ["x"])
    for i, name in enumerate(names):
        image = files.load(i)
        assert image.mode == "RGB", name
        assert np.array_equal(np.asarray(image), expected[name]), name


# ---------------------------------------------------------------- unreadable files


def files_of(paths) -> FileImages:
    return FileImages([str(p) for p in paths], [0] * len(paths), ["x"])


def test_unreadable_files_say_why_with_their_path(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "whole.jpg", quality=90)
    jpeg = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # header intact, scan data cut
    (tmp_path / "no_end.jpg").write_bytes(jpeg[:-2])  # only the end-of-image marker missing
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    png = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "half.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "text.png").write_text("not an image")
    names = ["half.jpg", "no_end.jpg", "half.png", "text.png", "gone.jpg", "whole.jpg"]
    files = files_of([tmp_path / n for n in names])
    reasons = {}
    for i, name in enumerate(names[:-1]):
        with pytest.raises(UnreadableImageError) as caught:
            files.load(i)
        assert caught.value.path == str(tmp_path / name) and str(tmp_path / name) in str(caught.value)
        assert caught.value.skipped_line == f"skipped {tmp_path / name}: {caught.value.reason}"
        reasons[name] = caught.value.reason
    assert reasons == {"half.jpg": "truncated JPEG", "no_end.jpg": "truncated JPEG", "half.png": "truncated PNG",
                       "text.png": "not an image (or too damaged to tell its format)", "gone.jpg": "file not found"}
    assert files.load(5).size == (80, 64)
    # No dependency may switch PIL to padding truncated files with grey: they must fail loudly.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_unreadable_error_survives_the_dataloader_worker_round_trip(tmp_path):
    """A worker's exception is rebuilt from its traceback text: it must still be one line with the path."""
    def round_trip(error):
        return UnreadableImageError(f"Caught UnreadableImageError in DataLoader worker process 0.\nOriginal "
                                    f"Traceback (most recent call last):\n  File ...\n"
                                    f"lowmem_moco.data.sources.decoding.UnreadableImageError: {error}\n")

    original = UnreadableImageError(str(tmp_path / "a.jpg"), "damaged JPEG (OSError: broken data stream)")
    rebuilt = round_trip(original)
    assert str(rebuilt) == str(original) and (rebuilt.path, rebuilt.reason) == (original.path, original.reason)
    odd_name = UnreadableImageError(str(tmp_path / "a: b.jpg"), "truncated JPEG")
    assert str(round_trip(odd_name)) == str(odd_name)  # the message is kept whole


# ---------------------------------------------------------------- images smaller than the crop


def test_small_images_are_counted_from_headers_exactly_or_by_an_even_sample(tmp_path):
    sides = [8, 40, 12, 40, 40, 40, 40, 40]  # shorter sides; two below 16 px
    paths = []
    for n, side in enumerate(sides):
        Image.new("RGB", (side + 3, side), (9, 9, 9)).save(tmp_path / f"{n}.png")
        paths.append(tmp_path / f"{n}.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "1.png").read_bytes()[:20])  # unreadable: not counted
    files = files_of(paths + [tmp_path / "cut.png"])
    assert files.shorter_sides(range(len(sides))).tolist() == sides
    exact = small_images_report(files, 16)
    assert all(fact in exact for fact in ("2 of 9 images", "16 px", "smallest: 8 px", "data.image_size"))
    assert "about" not in exact and "looked at" not in exact  # every header read: an exact count
    assert small_images_report(files, 8) is None
    # more images than the sample: 3 evenly spread looked at (0, 4, 8), 0 is small; 1 in 3 of 9 is 3
    sampled = small_images_report(files, 16, sample=3)
    assert all(fact in sampled for fact in ("about 3 of 9 images", "1 of 3 looked at", "16 px", "smallest: 8 px"))


def test_warn_small_images_is_one_warning_or_none(tmp_path, recwarn):
    Image.new("RGB", (9, 7)).save(tmp_path / "small.png")
    images.warn_small_images(files_of([tmp_path / "small.png"]), 8)
    images.warn_small_images(files_of([tmp_path / "small.png"]), 7)
    assert len(recwarn) == 1  # 7 px: nothing smaller, no warning
    assert all(fact in str(recwarn[0].message) for fact in ("1 of 1 images", "8 px", "smallest: 7 px"))


def test_array_images_are_counted_without_decoding():
    array = np.zeros((5, 32, 32, 3), np.uint8)
    assert small_images_report(ArrayImages(array, [0] * 5, ["x"]), 32) is None  # CIFAR at its own size
    report = small_images_report(ArrayImages(array, [0] * 5, ["x"]), 33, sample=2)
    # an array's sizes are known without decoding: all 5 counted exactly, whatever the sample
    assert all(fact in report for fact in ("5 of 5 images", "33 px", "smallest: 32 px")) and "about" not in report
