"""Model inputs from a labelled image set: two augmented views per image for MoCo
(`TwoViews`), one deterministic view per image for the probes (`EvalImages`).

    train = TwoViews(splits.train, view_transforms(size, cfg.augment), cfg.data.on_bad_image)
    val = EvalImages(splits.val, size)       # (image, label) for kNN features

An unreadable file is skipped (the next readable image is used, with one "skipped <path>:
<reason>" line per file) or raised, per data.on_bad_image. Each sample says whether it was
replaced, so the trainer's bad_images count per epoch is the number of unreadable files met.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .augment.per_image import eval_transform
from .sources.decoding import UnreadableImageError, report_skipped
from .sources.images import LabelledImages
from .loader import make_loader


def _load_readable(base: LabelledImages, index: int, on_bad_image: str, known_bad: set[int]
                   ) -> tuple[Image.Image, int, int]:
    """(image, index actually used, 1 if `index` was unreadable else 0): `index`, or the next
    readable one after it."""
    last: UnreadableImageError | None = None
    for offset in range(len(base)):
        i = (index + offset) % len(base)
        if i in known_bad:
            continue
        try:
            return base.load(i), i, int(offset > 0)
        except UnreadableImageError as err:
            if on_bad_image == "error":
                raise
            known_bad.add(i)
            last = err
            report_skipped(err)
    where = f" (e.g. {last.path})" if last else ""
    raise DataError(f"none of the {len(base)} images could be read{where}; check that the data folder holds images")


def _check_policy(on_bad_image: str) -> str:
    if on_bad_image not in ("skip", "error"):
        raise DataError(f"data.on_bad_image must be skip or error, got {on_bad_image!r}; set one of those")
    return on_bad_image


class TwoViews(Dataset):
    """MoCo input: two independently augmented views of one image.

    Indexed by (index, sample_seed): the views depend only on that key, never on the
    worker process or on what it made before, so runs and resumes are reproducible.
    `transform`: one transform for both views, or (the query's, the key's).
    """

    def __init__(self, base: LabelledImages, transform: Callable | tuple[Callable, Callable],
                 on_bad_image: str = "skip"):
        self.base = base
        self.transforms = tuple(transform) if isinstance(transform, (tuple, list)) else (transform, transform)
        self.on_bad_image = _check_policy(on_bad_image)
        self._known_bad: set[int] = set()  # per process: each worker keeps its own copy

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not isinstance(key, (tuple, list)):
            raise TypeError("TwoViews is indexed by (index, sample_seed) pairs; sample it with data.pipeline.EpochBatches")
        index, sample_seed = key
        image, _, skipped = _load_readable(self.base, index, self.on_bad_image, self._known_bad)
        # A private RNG stream per sample; the caller's torch RNG state is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_seed) & 0xFFFF_FFFF_FFFF_FFFF)
            view_q = self.transforms[0](image)
            view_k = self.transforms[1](image)  # from the same stream, after the query's draws
        return view_q, view_k, skipped


class EvalImages(Dataset):
    """(view, label) pairs for probes, by default the deterministic eval view; an unreadable
    file is handled like in TwoViews."""

    def __init__(self, base: LabelledImages, image_size: int, on_bad_image: str = "skip",
                 transform: Callable | None = None):
        self.base, self.transform = base, transform or eval_transform(image_size)
        self.on_bad_image = _check_policy(on_bad_image)
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, used, _ = _load_readable(self.base, i, self.on_bad_image, self._known_bad)
        return self.transform(image), self.base.targets[used]


def eval_loader(cfg, images: LabelledImages, batch_size: int, *, transform: Callable | None = None,
                shuffle: bool = False, pin_memory: bool = False, seed: int | None = None) -> DataLoader:
    """The one loader of (view, label) batches for features: the kNN monitor's and the probes'.

    Its generator is private (seeded when `seed` is given), so loading never draws from the
    global RNG that training's reproducibility depends on.
    """
    transform = transform or eval_transform(cfg.data.image_size, cfg.augment.mean, cfg.augment.std)
    views = EvalImages(images, cfg.data.image_size, cfg.data.on_bad_image, transform)
    return make_loader(views, workers=cfg.data.workers, pin_memory=pin_memory, seed=seed, batch_size=batch_size,
                       shuffle=shuffle)
