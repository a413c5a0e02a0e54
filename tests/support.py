"""Helpers the tests share (importable from any test folder: setup.cfg puts tests/ on the path):
image folders drawn on the spot, and one file per image mode with the pixels loading it must give."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lowmem_moco.config import DataConfig


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


# The checkout's root and its shipped recipes, for tests in any folder of tests/.
REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, eval.jsonl), in order."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def missing(text: str, *facts: str) -> list[str]:
    """The facts (substrings: a config key, the bad value, the fix) that a message leaves out;
    tests assert it is [], so rewording a message passes and dropping a fact fails."""
    return [fact for fact in facts if fact not in text]


def raises_naming(error: type[BaseException], *facts: str):
    """pytest.raises(error) whose message must name every fact (see missing)."""
    import contextlib

    import pytest

    @contextlib.contextmanager
    def checking():
        with pytest.raises(error) as caught:
            yield caught
        assert missing(str(caught.value), *facts) == [], str(caught.value)

    return checking()
