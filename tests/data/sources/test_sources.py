"""Data sources (data/sources/: registry.py, folders.py, downloads.py): folders and the validation
split, CIFAR-10, Imagenette's download."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

from support import folder_cfg, make_folder, save_image
from lowmem_moco.config import DataConfig
from lowmem_moco.data.sources import downloads, folders
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.errors import DataError


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
    # Both size checks mention validation and "at least 2": tell them apart by what each names.
    message = error_message(folder_cfg(tmp_path / "tiny"))
    assert all(fact in message for fact in (str(tmp_path / "tiny"), "no images for validation", "data.val_dir"))
    make_folder(tmp_path / "one", {"a": 2})
    message = error_message(folder_cfg(tmp_path / "one"))
    assert all(fact in message for fact in (str(tmp_path / "one"), "has 1 training image", "add images"))
    make_folder(tmp_path / "tr", {"a": 3})
    make_folder(tmp_path / "va", {"a": 1, "zebra": 1})
    assert "zebra" in error_message(folder_cfg(tmp_path, train_dir=str(tmp_path / "tr"), val_dir=str(tmp_path / "va")))


def test_empty_class_found_with_older_torchvision(tmp_path, monkeypatch):
    newer = folders.make_dataset

    def older(directory, class_to_idx, extensions=None, is_valid_file=None, **kw):  # torchvision < 0.17
        if kw:
            raise TypeError("unexpected keyword argument 'allow_empty'")
        return newer(directory, class_to_idx, extensions=extensions, is_valid_file=is_valid_file)

    monkeypatch.setattr(folders, "make_dataset", older)
    make_folder(tmp_path, {"full": 3, "bare": 0})
    assert "bare" in error_message(folder_cfg(tmp_path))
    (tmp_path / "bare").rmdir()
    assert len(build_datasets(folder_cfg(tmp_path)).train) == 2


def test_hidden_folders_are_not_classes(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3, ".ipynb_checkpoints": 0})
    assert build_datasets(folder_cfg(tmp_path)).classes == ["a", "b"]


def test_mixed_formats_are_read_and_other_files_ignored_with_one_line(tmp_path, recwarn):
    from support import write_every_mode

    write_every_mode(tmp_path / "a")  # JPEG, PNG, GIF, WebP, BMP, TIFF in every mode
    make_folder(tmp_path, {"b": 2})
    (tmp_path / "a" / "notes.txt").write_text("labels")
    (tmp_path / "a" / "README").write_text("about")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / "b" / "._0.png").write_bytes(b"\0\5\26\7 macOS resource fork")  # an image's name, not one
    save_image(tmp_path / "b" / ".ipynb_checkpoints" / "3.png")
    save_image(tmp_path / "b" / "nested" / "4.jpeg")  # sub-folders of a class are part of it
    images = build_datasets(folder_cfg(tmp_path, val_dir=str(tmp_path))).train
    names = sorted(Path(images.path(i)).name for i in range(len(images)))
    assert names == sorted(["bilevel.png", "clear_rgba.png", "cmyk.jpg", "cmyk.tif", "grey.jpg", "grey.png",
                            "grey16.png", "opaque_rgba.png", "palette.gif", "palette.png", "rgb.bmp", "rgb.jpg",
                            "rgb.webp", "0.png", "1.png", "4.jpeg"])
    assert all(images.load(i).mode == "RGB" for i in range(len(images)))
    ignored = [str(w.message) for w in recwarn if "ignored" in str(w.message)]
    assert len(ignored) == 1  # one warning for the folder, counting the files by kind
    assert all(fact in ignored[0] for fact in ("ignored 5 files", str(tmp_path), "3 hidden, 1 .txt, 1 no extension",
                                               ".jpg .jpeg .png", ".gif"))


def test_a_class_of_only_other_files_is_an_empty_class(tmp_path):
    make_folder(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("no images here")
    with pytest.warns(UserWarning, match=r"ignored 1 files .*\(1 \.txt\)"):
        assert "class folder(s) b" in error_message(folder_cfg(tmp_path))


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
    monkeypatch.setitem(downloads.ARCHIVES, "imagenette", (archive.as_uri(), md5))
    root = tmp_path / "cache"
    splits = build_datasets(DataConfig(source="imagenette", root=str(root)))
    assert len(splits.train) == 6 and splits.val.targets == [0, 1, 1]
    assert splits.classes == ["n01440764", "n02102040"] and (root / "imagenette2-160.tgz").is_file()

    # Already extracted: used as is, the network is never touched.
    monkeypatch.setitem(downloads.ARCHIVES, "imagenette", ("http://unreachable.invalid/imagenette2-160.tgz", md5))
    assert len(build_datasets(DataConfig(source="imagenette", root=str(root))).val) == 3


def test_imagenette_bad_checksum_and_failed_download(tmp_path, monkeypatch):
    archive, md5 = fake_fastai_archive(tmp_path)
    monkeypatch.setitem(downloads.ARCHIVES, "imagenette", (archive.as_uri(), "0" * 32))
    message = error_message(DataConfig(source="imagenette", root=str(tmp_path / "cache")))
    assert "md5" in message and "delete it" in message and not (tmp_path / "cache" / "imagenette2-160").exists()
    missing = (tmp_path / "nowhere" / "imagenette2-160.tgz").as_uri()
    monkeypatch.setitem(downloads.ARCHIVES, "imagenette", (missing, md5))
    message = error_message(DataConfig(source="imagenette", root=str(tmp_path / "other")))
    assert missing in message and str(tmp_path / "other") in message
