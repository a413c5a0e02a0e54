"""The decoded image cache (stores/decoded.py, stores/sides.py): build once, re-use, rebuild on
change, never use a partial build."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from support import write_every_mode
from lowmem_moco.data.stores import decoded as cache_module
from lowmem_moco.data.stores.decoded import CachedBatches, DecodedCache
from lowmem_moco.data.stores.sides import fit_shorter_side, shorter_side
from lowmem_moco.data.sources.images import ArrayImages, FileImages
from lowmem_moco.errors import DataError


def folder(root):
    """The data module's file-backed set over a class-per-folder tree."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths = [str(p) for c in classes for p in sorted((root / c).iterdir())]
    return FileImages(paths, [classes.index(os.path.basename(os.path.dirname(p))) for p in paths], classes)


class InMemory:
    """A set with neither files nor a pixel array (e.g. generated on the fly)."""

    def __init__(self, arrays):
        self.arrays, self.classes, self.targets = arrays, ["a"], [0] * len(arrays)

    def __len__(self):
        return len(self.arrays)

    def load(self, i):
        return Image.fromarray(self.arrays[i])


def make_folder(root, n_per_class=4, sizes=((40, 30), (30, 52)), broken=0):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    for i in range(broken):
        (root / "dog" / f"broken{i}.png").write_bytes(b"not an image at all")
    return folder(root)


def build(images, directory, **kw):
    return DecodedCache.open_or_build(images, directory, 16, progress=False, **kw)


def test_shorter_side_policy():
    assert shorter_side(224) == 501  # the smallest crop (scale 0.2) still has 224 px a side
    assert shorter_side(32) == 72 and shorter_side(224, 0.08) == 792
    whole = Image.new("RGB", (500, 375))
    assert fit_shorter_side(whole, 501).shape == (375, 500, 3)  # never enlarged: ImageNet photos stay native
    assert fit_shorter_side(whole, 215).shape == (215, 287, 3)  # aspect ratio kept, whole field of view
    assert fit_shorter_side(Image.new("RGB", (32, 32)), 72).shape == (32, 32, 3)  # CIFAR stays native


def test_build_contents_labels_and_batches(tmp_path):
    images = make_folder(tmp_path / "data")
    cache = build(images, tmp_path / "cache")
    assert len(cache) == 8 and cache.shorter_side == 36 and cache.skipped == 0
    assert cache.targets.tolist() == images.targets and cache.classes == ["cat", "dog"]
    assert np.array_equal(cache.image(5), np.array(images.load(5)))  # smaller than 36 px: stored whole
    assert [tuple(cache.image(i).shape) for i in (0, 1)] == [(30, 40, 3), (52, 30, 3)]
    assert not cache.pixels.flags.writeable  # read-only memory map
    batch = cache.batch([5, 0, 5])
    assert len(batch) == 3 and batch.pixels.dtype == torch.uint8
    assert torch.equal(batch.image(0), torch.from_numpy(np.array(images.load(5))).permute(2, 0, 1))
    assert torch.equal(batch.image(0), batch.image(2)) and torch.equal(cache.batch(torch.tensor([5])).image(0),
                                                                       batch.image(0))
    manifest = json.loads((tmp_path / "cache" / "train-36px.json").read_text())
    assert manifest["count"] == 8 and manifest["fingerprint"]
    pixel_bytes = (4 * 30 * 40 + 4 * 52 * 30) * 3
    assert manifest["pixel_bytes"] == pixel_bytes == os.path.getsize(tmp_path / "cache" / manifest["pixels_file"])
    assert manifest["bytes_per_image"] == round((pixel_bytes + 8 * 5 * 8) / 8)  # pixels + index row


def test_reused_when_current(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "data")
    first = build(images, tmp_path / "cache")
    monkeypatch.setattr(cache_module, "_build", lambda *a, **k: pytest.fail("rebuilt a current cache"))
    again = build(folder(tmp_path / "data"), tmp_path / "cache")
    assert again.manifest["pixels_file"] == first.manifest["pixels_file"]


def test_rebuilt_when_a_file_or_the_size_changes(tmp_path):
    images = make_folder(tmp_path / "data")
    first = build(images, tmp_path / "cache")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(images.paths[0])
    os.utime(images.paths[0], ns=(1, 1))  # a new mtime even on coarse-clock file systems
    second = build(folder(tmp_path / "data"), tmp_path / "cache")
    assert second.manifest["pixels_file"] != first.manifest["pixels_file"]
    assert (second.image(0) == [255, 0, 0]).all()
    assert not (tmp_path / "cache" / first.manifest["pixels_file"]).exists()  # old build removed
    smaller = DecodedCache.open_or_build(images, tmp_path / "cache", 16, side=24, progress=False)
    assert smaller.shorter_side == 24 and smaller.image(1).shape == (42, 24, 3)  # 30x52 shrunk, aspect kept
    assert build(images, tmp_path / "cache").manifest["pixels_file"] == second.manifest["pixels_file"]


def test_interrupted_build_is_never_used(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "data")
    calls = []

    def dies_midway(image, side):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt  # a killed build: not an unreadable image
        return fit_shorter_side(image, side)

    monkeypatch.setattr(cache_module, "fit_shorter_side", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build(images, tmp_path / "cache")
    assert not (tmp_path / "cache" / "train-36px.json").exists()
    monkeypatch.setattr(cache_module, "fit_shorter_side", fit_shorter_side)
    cache = build(images, tmp_path / "cache")
    assert len(cache) == 8
    files = list((tmp_path / "cache").glob("*.npy")) + list((tmp_path / "cache").glob("*.u8"))
    assert sorted(p.name for p in files) == sorted(
        [cache.manifest["pixels_file"], cache.manifest["index_file"]])  # the partial files are gone
    (tmp_path / "cache" / "train-36px.json").write_text('{"version": 2, "fingerp')  # a torn manifest
    assert len(build(images, tmp_path / "cache")) == 8


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    images = make_folder(tmp_path / "data", broken=2)
    cache = build(images, tmp_path / "cache")
    assert len(images) == 10 and len(cache) == 8 and cache.skipped == 2
    kept = [i for i, p in enumerate(images.paths) if "broken" not in p]
    assert cache.source_indices.tolist() == kept
    assert cache.targets.tolist() == [images.targets[i] for i in kept]
    with pytest.raises(DataError, match="broken0.png"):
        build(images, tmp_path / "strict", on_bad_image="error")


def test_in_memory_sets_need_an_identity(tmp_path):
    arrays = [np.full((20, 20, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    with pytest.raises(DataError, match="source_id"):
        build(InMemory(arrays), tmp_path / "cache")
    first = build(InMemory(arrays), tmp_path / "cache", source_id="synthetic-v1")
    assert first.shorter_side == 36 and (first.image(2) == 30).all() and first.image(2).shape == (20, 20, 3)
    assert build(InMemory(arrays), tmp_path / "cache", source_id="synthetic-v1").manifest == first.manifest
    assert build(InMemory(arrays), tmp_path / "cache", source_id="synthetic-v2").manifest != first.manifest


def test_array_backed_sets_are_identified_by_their_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
    first = build(ArrayImages(pixels, [0, 1] * 3, ["a", "b"]), tmp_path / "cache")
    assert np.array_equal(first.image(3), pixels[3])
    again = build(ArrayImages(pixels.copy(), [0, 1] * 3, ["a", "b"]), tmp_path / "cache")
    assert again.manifest == first.manifest
    pixels[2] = 0
    changed = build(ArrayImages(pixels, [0, 1] * 3, ["a", "b"]), tmp_path / "cache")
    assert changed.manifest["pixels_file"] != first.manifest["pixels_file"] and (changed.image(2) == 0).all()


def test_batches_for_the_trainer_keys(tmp_path):
    cache = build(make_folder(tmp_path / "data"), tmp_path / "cache")
    images, targets, seeds = CachedBatches(cache)[[(3, 103), (1, 101)]]
    assert len(images) == 2 and targets.tolist() == [0, 0] and seeds.tolist() == [103, 101]
    assert torch.equal(images.image(1), cache.batch([1]).image(0))
    sampler = [[(i, 100 + i) for i in range(b, b + 4)] for b in (0, 4)]
    batches = list(cache.loader(sampler, num_workers=1))  # the cache pickles to a worker
    assert [len(b[0]) for b in batches] == [4, 4] and batches[1][2].tolist() == [104, 105, 106, 107]
    assert torch.equal(batches[1][0].pixels, cache.batch([4, 5, 6, 7]).pixels)


def test_real_jpegs_to_two_views(cifar_folder, tmp_path):
    """CIFAR-10 JPEGs -> cache at native 32 px -> a batch of MoCo v2 views."""
    from lowmem_moco.data.augment.batched import BatchedMoCoV2

    images = folder(cifar_folder)
    cache = DecodedCache.open_or_build(images, tmp_path / "cache", 32, progress=False)
    assert cache.shorter_side == 72 and len(cache) == len(images) and cache.skipped == 0
    assert cache.manifest["median_sides"] == [32, 32] and cache.manifest["bytes_per_image"] == 32 * 32 * 3 + 40
    batch, targets, seeds = CachedBatches(cache)[[(i, 100 + i) for i in range(0, len(cache), 7)]]
    q, k = BatchedMoCoV2(32).two_views(batch, seeds)
    assert q.shape == k.shape == (len(targets), 3, 32, 32) and not torch.equal(q, k)


# ---------------------------------------------------------------------- bad input


def test_each_format_and_mode_is_cached_as_pil_converts_it(tmp_path):
    expected = write_every_mode(tmp_path / "data" / "x")
    cache = build(folder(tmp_path / "data"), tmp_path / "cache")  # 10 x 12 px: stored as they are
    names = [os.path.basename(p) for p in folder(tmp_path / "data").paths]
    assert len(cache) == len(expected)
    for position, source in enumerate(cache.source_indices):
        assert np.array_equal(cache.image(position), expected[names[source]]), names[source]


def truncated_folder(root):
    """make_folder's 8 images plus two truncated JPEGs (the first half of a real one's bytes)."""
    make_folder(root)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "cat" / "whole.jpg")
    jpeg = (root / "cat" / "whole.jpg").read_bytes()
    (root / "cat" / "whole.jpg").unlink()
    for name in ("cut0.jpg", "cut1.jpg"):
        (root / "cat" / name).write_bytes(jpeg[:len(jpeg) // 2])
    return folder(root)


def test_truncated_jpegs_are_skipped_by_path_counted_and_listed(tmp_path, capsys):
    images = truncated_folder(tmp_path / "data")
    cache = DecodedCache.open_or_build(images, tmp_path / "cache", 16)
    bad = [str(tmp_path / "data" / "cat" / n) for n in ("cut0.jpg", "cut1.jpg")]
    lines = capsys.readouterr().out.splitlines()
    assert [f"skipped {p}: truncated JPEG" for p in bad] == [line for line in lines if line.startswith("skipped")]
    manifest = tmp_path / "cache" / "train-36px.json"
    assert all(fact in lines[-1] for fact in ("2 of 10 images skipped", "skipped_files", str(manifest)))
    assert len(cache) == 8 and cache.manifest["skipped_files"] == [f"skipped {p}: truncated JPEG" for p in bad]
    DecodedCache.open_or_build(images, tmp_path / "cache", 16)  # a hit says it again, without decoding
    hit = capsys.readouterr().out.splitlines()
    assert len(hit) == 1 and all(fact in hit[0] for fact in ("2 unreadable images", str(manifest), "skipped_files"))


def test_truncated_jpeg_in_error_mode_is_one_line_naming_it(tmp_path):
    images = truncated_folder(tmp_path / "data")
    for workers in (0, 1):
        with pytest.raises(DataError) as caught:
            build(images, tmp_path / f"strict{workers}", on_bad_image="error", num_workers=workers)
        assert str(caught.value) == (f"cannot read image {tmp_path / 'data' / 'cat' / 'cut0.jpg'}: truncated JPEG; "
                                     f"replace or delete the file, or set data.on_bad_image=skip to skip such files")


def test_images_smaller_than_the_crop_warn_once_with_the_count_at_build_and_hit(tmp_path, recwarn):
    from lowmem_moco.data.augment.batched import BatchedMoCoV2

    images = make_folder(tmp_path / "data", sizes=((40, 30), (30, 52), (12, 10)))  # 2 of 8 are 10 px high
    line = ("2 of 8 images are smaller than 24 px on their shorter side (the smallest: 10 px): their crops are "
            "upscaled; lower data.image_size if that is most of them")
    DecodedCache.open_or_build(images, tmp_path / "cache", 24, progress=True)  # built
    assert [str(w.message) for w in recwarn] == [line]
    recwarn.clear()
    cache = DecodedCache.open_or_build(images, tmp_path / "cache", 24, progress=True)  # found
    assert [str(w.message) for w in recwarn] == [line] and cache.manifest["count"] == 8
    assert cache.small_images(10) is None
    small = [p for p in range(len(cache)) if min(cache.shapes[p]) == 10]
    q, k = BatchedMoCoV2(24).two_views(cache.batch(small), torch.tensor([1, 2]))
    assert q.shape == k.shape == (2, 3, 24, 24)  # upscaled to the crop size


def test_cifar_at_its_own_size_does_not_warn(cifar_folder, tmp_path, recwarn):
    DecodedCache.open_or_build(folder(cifar_folder), tmp_path / "cache", 32, progress=True)
    assert not [w for w in recwarn if "smaller than" in str(w.message)]
