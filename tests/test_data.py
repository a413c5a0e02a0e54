"""Data sources, image decoding, the two-view MoCo dataset and the evaluation views."""

from __future__ import annotations

import hashlib
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lowmem_moco.data import images, sources
from lowmem_moco.data.augment import eval_transform, mocov2_transform
from lowmem_moco.data.blur import RandomGaussianBlur
from lowmem_moco.config import DataConfig
from lowmem_moco.data.sources import build_datasets
from lowmem_moco.data.synthetic import synthetic_images
from lowmem_moco.data.two_views import EvalImages, TwoViews
from lowmem_moco.errors import DataError


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


# ---------------------------------------------------------------- folders and validation carving


def test_folder_uses_root_train_and_carves_stratified_val(cifar_folder):
    splits = build_datasets(folder_cfg(cifar_folder.parent, val_fraction=0.25))  # finds root/train
    assert len(splits.classes) == 10 and splits.classes == sorted(splits.classes)
    assert len(splits.train) == 300 and len(splits.val) == 100
    assert np.bincount(splits.val.targets).tolist() == [10] * 10
    train_paths = {splits.train.path(i) for i in range(len(splits.train))}
    val_paths = {splits.val.path(i) for i in range(len(splits.val))}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 400
    again = build_datasets(folder_cfg(cifar_folder, val_fraction=0.25))
    assert [again.val.path(i) for i in range(len(again.val))] == [splits.val.path(i) for i in range(100)]
    image, label = splits.train[0]
    assert image.mode == "RGB" and image.size == (32, 32) and label == splits.train.targets[0]


def test_val_dir_shares_training_class_indices(tmp_path):
    make_folder(tmp_path / "train", {"a": 3, "b": 3, "c": 3})
    make_folder(tmp_path / "val", {"c": 2})
    splits = build_datasets(folder_cfg(tmp_path, val_dir=str(tmp_path / "val")))
    assert len(splits.train) == 9 and splits.val.targets == [2, 2] and splits.val.classes == ["a", "b", "c"]


def test_split_holds_out_at_least_one_per_class_and_keeps_one_for_training(tmp_path):
    splits = build_datasets(folder_cfg(make_folder(tmp_path, {"a": 2, "b": 5, "c": 30}), val_fraction=0.1))
    assert np.bincount(splits.val.targets).tolist() == [1, 1, 3]
    assert np.bincount(splits.train.targets).tolist() == [1, 4, 27]


def error_message(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as info:
        build_datasets(cfg)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # one sentence: the problem; the fix
    return message


def test_folder_errors_name_problem_and_fix(tmp_path):
    assert "does not exist" in error_message(folder_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "is empty" in error_message(folder_cfg(tmp_path / "empty"))
    save_image(tmp_path / "flat" / "cat.jpg")
    message = error_message(folder_cfg(tmp_path / "flat"))
    assert "no class sub-folders" in message and "<class>/<image>.jpg" in message
    make_folder(tmp_path / "hollow", {"full": 3, "bare": 0})
    message = error_message(folder_cfg(tmp_path / "hollow"))
    assert "bare" in message and "full" not in message
    make_folder(tmp_path / "tiny", {"a": 1, "b": 1})
    assert "validation" in error_message(folder_cfg(tmp_path / "tiny"))
    make_folder(tmp_path / "one", {"a": 2})
    assert "at least 2" in error_message(folder_cfg(tmp_path / "one"))
    make_folder(tmp_path / "tr", {"a": 3})
    make_folder(tmp_path / "va", {"a": 1, "zebra": 1})
    assert "zebra" in error_message(folder_cfg(tmp_path, train_dir=str(tmp_path / "tr"), val_dir=str(tmp_path / "va")))


def test_empty_class_found_with_older_torchvision(tmp_path, monkeypatch):
    newer = sources.make_dataset

    def older(directory, class_to_idx, extensions=None, **kw):  # torchvision < 0.17 signature
        if kw:
            raise TypeError("unexpected keyword argument 'allow_empty'")
        return newer(directory, class_to_idx, extensions=extensions)

    monkeypatch.setattr(sources, "make_dataset", older)
    make_folder(tmp_path, {"full": 3, "bare": 0})
    assert "bare" in error_message(folder_cfg(tmp_path))
    (tmp_path / "bare").rmdir()
    assert len(build_datasets(folder_cfg(tmp_path)).train) == 2


def test_hidden_folders_are_not_classes(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3, ".ipynb_checkpoints": 0})
    assert build_datasets(folder_cfg(tmp_path)).classes == ["a", "b"]


def test_builtin_sources_offline_say_where_to_put_data(tmp_path):
    message = error_message(DataConfig(source="cifar10", root=str(tmp_path), download=False))
    assert str(tmp_path) in message and "data.download=true" in message
    message = error_message(DataConfig(source="imagewoof", root=str(tmp_path), download=False))
    assert "imagewoof2-160.tgz" in message and str(tmp_path) in message


def test_cifar10_uses_extracted_jpeg_folder(cifar_folder):
    splits = build_datasets(DataConfig(source="cifar10", root=str(cifar_folder.parent), val_fraction=0.1))
    assert len(splits.train) + len(splits.val) == 400 and "airplane" in splits.classes


def test_val_fraction_zero_trains_on_every_image_and_tests_on_a_test_split(tmp_path, cifar_folder):
    alone = build_datasets(folder_cfg(cifar_folder, val_fraction=0.0))
    assert len(alone.train) == 400 and alone.val is None  # nothing to test on: the monitor goes off
    root = tmp_path / "data"
    root.mkdir()
    (root / "train").symlink_to(cifar_folder, target_is_directory=True)
    make_folder(root / "val", {"airplane": 2, "truck": 3})
    beside = build_datasets(folder_cfg(root, val_fraction=0.0))
    assert len(beside.train) == 400 and len(beside.val) == 5
    assert sorted(set(beside.val.targets)) == [beside.classes.index("airplane"), beside.classes.index("truck")]
    (root / "val").rename(root / "test")  # a CIFAR-10 JPEG copy's test split
    cifar = build_datasets(DataConfig(source="cifar10", root=str(root), val_fraction=0.0, download=False))
    assert len(cifar.train) == 400 and len(cifar.val) == 5


# ---------------------------------------------------------------- Imagenette / Imagewoof


def fake_fastai_archive(tmp_path: Path) -> tuple[Path, str]:
    source = tmp_path / "src" / "imagenette2-160"
    make_folder(source / "train", {"n01440764": 3, "n02102040": 3})
    make_folder(source / "val", {"n01440764": 1, "n02102040": 2})
    archive = tmp_path / "src" / "imagenette2-160.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="imagenette2-160")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_imagenette_downloads_checks_and_extracts(tmp_path, monkeypatch):
    archive, md5 = fake_fastai_archive(tmp_path)
    monkeypatch.setitem(sources.ARCHIVES, "imagenette", (archive.as_uri(), md5))
    root = tmp_path / "cache"
    splits = build_datasets(DataConfig(source="imagenette", root=str(root)))
    assert len(splits.train) == 6 and splits.val.targets == [0, 1, 1]
    assert splits.classes == ["n01440764", "n02102040"] and (root / "imagenette2-160.tgz").is_file()

    # Already extracted: used as is, the network is never touched.
    monkeypatch.setitem(sources.ARCHIVES, "imagenette", ("http://unreachable.invalid/imagenette2-160.tgz", md5))
    assert len(build_datasets(DataConfig(source="imagenette", root=str(root))).val) == 3


def test_imagenette_bad_checksum_and_failed_download(tmp_path, monkeypatch):
    archive, md5 = fake_fastai_archive(tmp_path)
    monkeypatch.setitem(sources.ARCHIVES, "imagenette", (archive.as_uri(), "0" * 32))
    message = error_message(DataConfig(source="imagenette", root=str(tmp_path / "cache")))
    assert "md5" in message and "delete it" in message and not (tmp_path / "cache" / "imagenette2-160").exists()
    missing = (tmp_path / "nowhere" / "imagenette2-160.tgz").as_uri()
    monkeypatch.setitem(sources.ARCHIVES, "imagenette", (missing, md5))
    message = error_message(DataConfig(source="imagenette", root=str(tmp_path / "other")))
    assert missing in message and str(tmp_path / "other") in message


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


# ---------------------------------------------------------------- MoCo views


@pytest.fixture(scope="module")
def synthetic():
    return build_datasets(DataConfig(source="synthetic", synthetic_size=200, synthetic_classes=10))


def test_two_views_are_a_function_of_index_and_seed(synthetic):
    views = TwoViews(synthetic.train, mocov2_transform(32))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    q1, k1, skipped = views[(5, 42)]
    assert torch.equal(torch.get_rng_state(), before)  # caller's RNG untouched
    q2, k2, _ = views[(5, 42)]
    q3, k3, _ = views[(5, 43)]
    assert q1.shape == (3, 32, 32) and q1.dtype == torch.float32 and skipped == 0
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1) and not torch.equal(q1, q3)
    with pytest.raises(TypeError, match="EpochBatches"):
        views[5]


def test_views_do_not_depend_on_batch_or_worker(synthetic):
    views = TwoViews(synthetic.train, mocov2_transform(32))
    keys = [(7, seed) for seed in range(6)] + [(i, 1000 + i) for i in range(10)]
    loader = DataLoader(views, batch_size=8, sampler=keys, num_workers=2)
    batches = list(loader)
    q = torch.cat([b[0] for b in batches])
    assert q.shape == (16, 3, 32, 32) and int(sum(b[2].sum() for b in batches)) == 0
    assert all(torch.equal(q[j], views[key][0]) for j, key in enumerate(keys))
    same_image = q[:6].flatten(1)
    assert torch.cdist(same_image, same_image).add(torch.eye(6)).min() > 0  # each sample its own crop


def bad_folder(tmp_path: Path, cifar_folder: Path):
    """Class a: 0.png fine, 1.jpg truncated, 2.png not an image, 3.png fine; class b: 4 fine."""
    root = make_folder(tmp_path / "bad", {"a": 4, "b": 4})
    jpeg = next((cifar_folder / "cat").iterdir()).read_bytes()
    (root / "a" / "1.png").unlink()
    (root / "a" / "1.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "a" / "2.png").write_text("not an image")
    return build_datasets(folder_cfg(root, val_dir=str(root))).train


def test_unreadable_files_are_skipped_counted_and_reported_once(cifar_folder, tmp_path, caplog):
    base = bad_folder(tmp_path, cifar_folder)
    assert [Path(base.path(i)).name for i in (1, 2)] == ["1.jpg", "2.png"]
    views = TwoViews(base, mocov2_transform(16), on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="lowmem_moco.data.two_views"):
        q, k, skipped = views[(1, 0)]
        assert skipped == 2 and q.shape == (3, 16, 16)
        assert views[(2, 0)][2] == 1 and views[(0, 0)][2] == 0
        assert views[(1, 5)][2] == 2  # known-bad files are still counted as skipped
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "1.jpg" in warned[0] and "2.png" in warned[1]
    batch = next(iter(DataLoader(views, batch_size=4, sampler=[(i, i) for i in range(4)])))
    assert batch[2].tolist() == [0, 2, 1, 0]  # summable across workers by the trainer


def test_unreadable_file_in_error_mode_names_it(cifar_folder, tmp_path):
    base = bad_folder(tmp_path, cifar_folder)
    with pytest.raises(DataError, match=r"1\.jpg.*data\.on_bad_image=skip"):
        TwoViews(base, mocov2_transform(16), on_bad_image="error")[(1, 0)]
    with pytest.raises(DataError, match="on_bad_image"):
        TwoViews(base, mocov2_transform(16), on_bad_image="ignore")


def test_eval_images_shape_label_and_skip(cifar_folder, tmp_path):
    splits = build_datasets(folder_cfg(cifar_folder))
    for size in (32, 48):
        image, label = EvalImages(splits.val, size)[3]
        assert image.shape == (3, size, size) and label == splits.val.targets[3]
    base = bad_folder(tmp_path, cifar_folder)
    image, label = EvalImages(base, 16)[1]  # 1.jpg and 2.png unreadable: 3.png, still class a
    assert image.shape == (3, 16, 16) and label == 0


def test_eval_transform_crops_large_and_resizes_small_images():
    big = Image.new("RGB", (300, 200), (255, 0, 0))
    big.paste((0, 0, 255), (0, 0, 40, 200))  # a blue margin that the centre crop removes
    out = eval_transform(128)(big)
    assert out.shape == (3, 128, 128) and out[2].max() < 0  # no blue left (normalised)
    assert eval_transform(64)(Image.new("RGB", (32, 32))).shape == (3, 64, 64)


def test_blur_matches_torchvision_with_an_untruncated_kernel():
    """The per-image blur: torchvision's Gaussian reaching 4 sigma each side (sigma 2 at 32 px: 17 taps)."""
    image = torch.rand(3, 40, 30)
    blur = RandomGaussianBlur(sigma=(0.1, 2.0), p=1.0)
    torch.manual_seed(0)
    ours = blur(image)
    torch.manual_seed(0)
    torch.rand(1)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    k = 2 * math.ceil(4 * sigma) + 1
    assert (ours - v2.functional.gaussian_blur(image, [k, k], [sigma, sigma])).abs().max() <= 1e-5


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
