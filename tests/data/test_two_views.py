"""Model inputs (data/two_views.py): two views as a function of (index, seed), unreadable files, eval views."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from support import folder_cfg, make_folder
from lowmem_moco.data.augment.per_image import mocov2_transform
from lowmem_moco.data.sources.registry import build_datasets
from lowmem_moco.data.two_views import EvalImages, TwoViews
from lowmem_moco.errors import DataError


# ---------------------------------------------------------------- MoCo views


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
    with caplog.at_level(logging.WARNING, logger="lowmem_moco.data.sources.decoding"):
        q, k, replaced = views[(1, 0)]  # 1.jpg and 2.png unreadable: 3.png stands in
        assert replaced == 1 and q.shape == (3, 16, 16)
        assert views[(2, 0)][2] == 1 and views[(0, 0)][2] == 0
        assert views[(1, 5)][2] == 1  # known-bad files are still counted
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"skipped {base.path(1)}: truncated JPEG",
                      f"skipped {base.path(2)}: not an image (or too damaged to tell its format)"]
    batch = next(iter(DataLoader(views, batch_size=4, sampler=[(i, i) for i in range(4)])))
    assert batch[2].tolist() == [0, 1, 1, 0]  # summed by the trainer: one per unreadable file met


def test_unreadable_file_in_error_mode_names_it(cifar_folder, tmp_path):
    base = bad_folder(tmp_path, cifar_folder)
    with pytest.raises(DataError, match=r"1\.jpg.*data\.on_bad_image=skip"):
        TwoViews(base, mocov2_transform(16), on_bad_image="error")[(1, 0)]
    with pytest.raises(DataError, match="on_bad_image"):
        TwoViews(base, mocov2_transform(16), on_bad_image="ignore")


def test_unreadable_file_in_error_mode_is_one_line_from_a_worker_too(cifar_folder, tmp_path):
    base = bad_folder(tmp_path, cifar_folder)
    views = TwoViews(base, mocov2_transform(16), on_bad_image="error")
    batches = iter(DataLoader(views, batch_size=2, sampler=[(0, 0), (1, 1)], num_workers=1))
    with pytest.raises(DataError) as caught:  # the worker's exception, rebuilt in this process
        next(batches)
    assert str(caught.value) == (f"cannot read image {base.path(1)}: truncated JPEG; replace or delete the file, "
                                 f"or set data.on_bad_image=skip to skip such files")
    # The traceback holds the iterator in a reference cycle. Left to the garbage collector, its
    # queues close before it stops the worker, which then waits 5 s for a stop that never comes;
    # freed here, the worker stops at once.
    caught.value.__traceback__ = None
    del caught, batches


def test_images_smaller_than_the_crop_are_upscaled(tmp_path):
    root = make_folder(tmp_path / "small", {"a": 2, "b": 2})  # 8 x 8 px images
    base = build_datasets(folder_cfg(root, val_dir=str(root))).train
    q, k, replaced = TwoViews(base, mocov2_transform(24))[(0, 1)]
    assert q.shape == k.shape == (3, 24, 24) and replaced == 0


def test_eval_images_shape_label_and_skip(cifar_folder, tmp_path):
    splits = build_datasets(folder_cfg(cifar_folder))
    for size in (32, 48):
        image, label = EvalImages(splits.val, size)[3]
        assert image.shape == (3, size, size) and label == splits.val.targets[3]
    base = bad_folder(tmp_path, cifar_folder)
    image, label = EvalImages(base, 16)[1]  # 1.jpg and 2.png unreadable: 3.png, still class a
    assert image.shape == (3, 16, 16) and label == 0
