"""The encoded-image cache, data.cache=none, and the data.cache choice (stores/encoded*.py, stores/choice.py)."""

import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from lowmem_moco.engine.views import whole
from lowmem_moco.config import load_config
from lowmem_moco.data.stores import encoded as encoded_module
from lowmem_moco.data.augment.batched import BatchedMoCoV2
from lowmem_moco.data.stores.decoded import DecodedCache
from lowmem_moco.data.stores.sides import fit_shorter_side
from lowmem_moco.data.stores.choice import DISK_MARGIN, choose_cache, pick_cache
from lowmem_moco.data.stores.encoded import EncodedCache, encode_record
from lowmem_moco.data.stores.encoded_images import EncodedImages
from lowmem_moco.data.stores.encoded_store import SourceFiles
from lowmem_moco.data.sources.images import ArrayImages, FileImages
from lowmem_moco.errors import ConfigError, DataError

GIB = 2**30
SIZE = 16  # crop size: the caches' shorter side is 36 px, the encoded one keeps JPEGs up to 72 px


def photo(height, width, seed=0):
    """A smooth gradient with some noise: JPEG-like content, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def make_folder(root, shapes=((30, 40), (52, 30), (36, 36), (24, 60)), extra=()):
    """JPEGs of the given (height, width) in two classes, then `extra` (name, bytes) files in class b."""
    paths = []
    for i, (h, w) in enumerate(shapes):
        path = root / "ab"[i % 2] / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(h, w, i)).save(path, quality=90)
        paths.append(path)
    for name, data in extra:
        (root / "b" / name).write_bytes(data)
        paths.append(root / "b" / name)
    paths = sorted(paths)
    return FileImages([str(p) for p in paths], ["ab".index(p.parent.name) for p in paths], ["a", "b"])


def encoded_bytes(pixels, fmt="JPEG", mode="RGB"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def build(images, directory, **kw):
    return EncodedCache.open_or_build(images, directory, SIZE, progress=False, **kw)


def file_decoded(path):
    with open(path, "rb") as f:
        return decode_jpeg(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), mode=ImageReadMode.RGB)


def test_pixels_are_decode_jpeg_of_the_files_exactly(tmp_path):
    images = make_folder(tmp_path / "data")
    cache = build(images, tmp_path / "cache")
    assert len(cache) == 4 and cache.skipped == 0 and cache.classes == ["a", "b"]
    assert cache.targets.tolist() == images.targets and cache.manifest["reencoded"] == 0
    batch = cache.batch([3, 0, 3])
    for row, i in enumerate([3, 0, 3]):
        assert torch.equal(batch.image(row), file_decoded(images.path(i)))
    raw = sum(os.path.getsize(images.path(i)) for i in range(4))
    assert cache.manifest["data_bytes"] == raw  # kept byte for byte


def test_large_jpegs_are_shrunk_as_the_decoded_cache_does(tmp_path):
    images = make_folder(tmp_path / "data", shapes=((100, 150), (60, 40)))  # 100 > 2 x 36: re-encoded
    cache = build(images, tmp_path / "cache")
    assert cache.manifest["reencoded"] == 1 and cache.shapes.tolist() == [[36, 54], [60, 40]]
    with Image.open(images.path(0)) as original:
        expected = fit_shorter_side(original, 36).astype(int)  # (36, 54, 3)
    got = cache.batch([0]).image(0).permute(1, 2, 0).numpy().astype(int)
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 3  # JPEG quality 95


def test_views_equal_the_decoded_caches_bit_for_bit(tmp_path):
    images = make_folder(tmp_path / "data")  # all at most 36 px short side: both caches hold the files' pixels
    decoded = DecodedCache.open_or_build(images, tmp_path / "cache", SIZE, progress=False)
    encoded = build(images, tmp_path / "cache")
    rows, seeds = [2, 0, 3, 1], torch.tensor([11, 12, 13, 14])
    assert torch.equal(decoded.batch(rows).pixels, encoded.batch(rows).pixels)
    augment = BatchedMoCoV2(SIZE)
    for a, b in zip(augment.two_views(decoded.batch(rows), seeds), augment.two_views(encoded.batch(rows), seeds)):
        assert torch.equal(a, b)


def test_select_then_to_cpu_equals_batch(tmp_path):
    cache = build(make_folder(tmp_path / "data"), tmp_path / "cache")
    keys = [[(3, 103), (1, 101), (2, 102)]]
    (images, targets, seeds), = list(cache.loader(keys, num_workers=0, decode="device"))
    assert isinstance(images, EncodedImages) and seeds.tolist() == [103, 101, 102]
    assert targets.tolist() == cache.targets[[3, 1, 2]].tolist()
    part = images.select(torch.tensor([2, 0]))
    assert isinstance(part, EncodedImages) and len(part) == 2
    decoded = part.to("cpu", non_blocking=True)
    assert torch.equal(decoded.pixels, cache.batch([2, 3]).pixels)
    assert torch.equal(decoded.shapes, cache.batch([2, 3]).shapes)
    assert torch.equal(images.to("cpu").pixels, cache.batch([3, 1, 2]).pixels)
    (in_worker, _, _), = list(cache.loader(keys, num_workers=1))  # pickled to a worker, decoded there
    assert torch.equal(in_worker.pixels, cache.batch([3, 1, 2]).pixels)


def test_an_unreadable_rows_stand_in_does_not_depend_on_the_rows_decoded_with_it():
    """Lazy views decode key chunks and micro-batches: a bad row must take the same image (the
    next readable row of the whole batch) whichever rows are decoded together."""
    a, c = photo(20, 24, 1), photo(18, 26, 2)
    batch = EncodedImages.from_bytes([encoded_bytes(a), b"not an image", encoded_bytes(c)])
    whole_batch = batch.to("cpu")
    expected = whole_batch.image(2)  # the next readable row after row 1
    assert torch.equal(whole_batch.image(1), expected)
    assert torch.equal(batch.select([1, 0]).to("cpu").image(0), expected)
    assert torch.equal(batch.select([1]).to("cpu").image(0), expected)
    assert torch.equal(batch.select([2, 1]).select([1]).to("cpu").image(0), expected)  # a subset of a subset
    last_bad = EncodedImages.from_bytes([encoded_bytes(a), encoded_bytes(c), b"broken"])
    assert torch.equal(last_bad.select([2]).to("cpu").image(0), last_bad.to("cpu").image(0))  # wraps round


def test_bad_and_mixed_files(tmp_path, caplog):
    good = make_folder(tmp_path / "probe", shapes=((30, 40),))
    jpeg = open(good.path(0), "rb").read()
    pixels = photo(20, 28, 5)
    extra = [("corrupt.jpg", b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20), ("truncated.jpg", jpeg[:len(jpeg) // 2]),
             ("plain.png", encoded_bytes(pixels, "PNG")), ("grey.jpg", encoded_bytes(pixels, mode="L")),
             ("cmyk.jpg", encoded_bytes(pixels, mode="CMYK"))]
    images = make_folder(tmp_path / "data", extra=extra)
    with caplog.at_level(logging.WARNING):
        cache = build(images, tmp_path / "cache")
    assert len(images) == 9 and len(cache) == 7 and cache.skipped == 2 and cache.manifest["not_jpeg"] == 1
    text = caplog.text
    assert "2 of 9 files could not be read and were skipped" in text
    assert "corrupt.jpg" in text and "truncated.jpg" in text and ".cpp" not in text
    assert "1 of 7 files are not JPEG: decoded with PIL" in text
    names = [os.path.basename(images.path(int(i))) for i in cache.source_indices]
    batch = cache.batch(range(len(cache)))
    for row, name in enumerate(names):
        assert batch.image(row).shape[0] == 3
        if name in ("plain.png", "grey.jpg", "cmyk.jpg"):  # as PIL's RGB conversion, the per-image path's
            expected = np.array(Image.open(images.path(int(cache.source_indices[row]))).convert("RGB"))
            assert np.array_equal(batch.image(row).permute(1, 2, 0).numpy(), expected), name
    with pytest.raises(DataError, match="corrupt.jpg"):
        build(images, tmp_path / "strict", on_bad_image="error")


def test_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "data")
    first = build(images, tmp_path / "cache")
    monkeypatch.setattr(encoded_module, "_build", lambda *a, **k: pytest.fail("rebuilt a current cache"))
    assert build(images, tmp_path / "cache").manifest == first.manifest
    monkeypatch.undo()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(images.path(0), quality=95)
    os.utime(images.path(0), ns=(1, 1))  # a new mtime even on coarse-clock file systems
    second = build(images, tmp_path / "cache")
    assert second.manifest["bytes_file"] != first.manifest["bytes_file"]
    assert torch.equal(second.batch([0]).image(0), file_decoded(images.path(0)))
    assert not (tmp_path / "cache" / first.manifest["bytes_file"]).exists()  # the old build is removed


def test_interrupted_build_is_never_used(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "data")
    calls = []

    def dies_midway(*args):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # a killed build, not an unreadable image
        return encode_record(*args)

    monkeypatch.setattr(encoded_module, "encode_record", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build(images, tmp_path / "cache")
    assert not (tmp_path / "cache" / "train-36px-encoded.json").exists()
    monkeypatch.undo()
    cache = build(images, tmp_path / "cache")
    assert len(cache) == 4
    data_files = sorted(p.name for p in (tmp_path / "cache").glob("*.*.*"))
    assert data_files == sorted([cache.manifest["bytes_file"], cache.manifest["index_file"]])  # partial files gone


def test_source_files_decode_like_the_cache_and_replace_bad_files(tmp_path, caplog):
    images = make_folder(tmp_path / "data")
    cache, uncached = build(images, tmp_path / "cache"), SourceFiles(images)
    assert len(uncached) == 4 and torch.equal(uncached.batch([1, 3]).pixels, cache.batch([1, 3]).pixels)
    open(images.path(2), "wb").write(b"\xff\xd8\xff broken now")
    with caplog.at_level(logging.WARNING):
        batch = uncached.batch([2, 3])
    assert images.path(2) in caplog.text and ".cpp" not in caplog.text and len(batch) == 2
    assert torch.equal(batch.image(0), batch.image(1))  # the unreadable row took the next readable image
    with pytest.raises(DataError, match=os.path.basename(images.path(2))):
        SourceFiles(images, on_bad_image="error").batch([2, 3])


def test_sets_without_files_are_stored_losslessly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    cache = build(ArrayImages(pixels, [0, 1, 0], ["a", "b"]), tmp_path / "cache")
    assert np.array_equal(cache.batch([2]).image(0).permute(1, 2, 0).numpy(), pixels[2])


def test_auto_rule():
    ram, disk = 64 * GIB, 500 * GIB
    assert choose_cache(32 * GIB, 4 * GIB, ram, disk).mode == "decoded"  # exactly half of the RAM
    assert choose_cache(32 * GIB + 1, 4 * GIB, ram, disk).mode == "encoded"
    assert choose_cache(10 * GIB, 2 * GIB, ram, 10 * GIB + DISK_MARGIN).mode == "decoded"  # exactly the disk room
    assert choose_cache(10 * GIB, 2 * GIB, ram, 10 * GIB + DISK_MARGIN - 1).mode == "encoded"
    assert choose_cache(80 * GIB, 8 * GIB, ram, 8 * GIB + DISK_MARGIN).mode == "encoded"
    assert choose_cache(80 * GIB, 8 * GIB, ram, 8 * GIB + DISK_MARGIN - 1).mode == "none"
    choice = choose_cache(int(41.2 * GIB), 5 * GIB, int(23.1 * GIB), disk)
    assert choice.mode == "encoded"
    assert all(fact in choice.reason for fact in ("decoded cache would take 41.2 GiB", "half of the 23.1 GiB RAM",
                                                  "encoded one about 5.0 GiB"))
    assert "more than the 40.0 GiB free disk" in choose_cache(50 * GIB, GIB, 128 * GIB, 40 * GIB).reason


def test_data_cache_key(tmp_path):
    assert load_config(None, []).data.cache == "auto"
    assert load_config(None, ["data.cache=off"]).data.cache == "none"
    with pytest.raises(ConfigError, match="data.cache must be one of auto, decoded, encoded, none"):
        load_config(None, ["data.cache=jpeg"])
    with pytest.raises(ConfigError, match="data.cache=encoded applies to data.augment=batched only"):
        load_config(None, ["data.cache=encoded", "data.augment=per_image"])
    cfg = load_config(None, [f"data.image_size={SIZE}"])
    images = make_folder(tmp_path / "data")
    choice = pick_cache(images, cfg, tmp_path / "cache", "train")
    assert choice.mode == "decoded" and "RAM available" in choice.reason  # a few KB fits anywhere
    cfg.data.cache = "none"
    assert pick_cache(images, cfg, tmp_path / "cache", "train").reason == "set in the config"


def test_batched_pipeline_views_are_the_same_whatever_the_cache(tmp_path, capsys):
    from lowmem_moco.data.pipeline import build_pipeline

    images = make_folder(tmp_path / "data", shapes=((30, 40), (52, 30), (36, 36), (24, 60)) * 2)
    views = {}
    for mode in ("decoded", "encoded", "none"):
        cfg = load_config(None, [f"data.image_size={SIZE}", "data.augment=batched", f"data.cache={mode}",
                                 "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4",
                                 "moco.key_chunks=1", "moco.queue_size=64"])
        pipeline = build_pipeline(images, cfg, torch.device("cpu"))
        views[mode] = [torch.cat([whole(q), whole(k)]) for q, k, _ in pipeline.epoch(0, 0)]
        assert f"data.cache={mode} -> {mode}: set in the config" in capsys.readouterr().out
    assert len(views["decoded"]) == 2
    for mode in ("encoded", "none"):
        assert all(torch.equal(a, b) for a, b in zip(views["decoded"], views[mode])), mode
