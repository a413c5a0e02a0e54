"""The training input: which images, in what order, turned into two views on the device.

The order of an epoch and every view are functions of (seed, epoch, index), so a resumed
run sees exactly the batches an uninterrupted one would. Two ways to make the views:

- `per_image`: PIL images augmented one by one in DataLoader workers (any data, no cache);
- `batched`: images decoded once into a memory-mapped uint8 cache, a batch sliced from it
  and augmented in one pass on the training device (what keeps a GPU fed by 2 CPU cores).

Both read the `augment:` section. `preview(indices, epoch)` returns the views training
makes for those samples in that epoch, unnormalised, for looking at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .augment import mocov2_transform
from .batched_augment import BatchedMoCoV2
from .cache import DecodedCache
from ..config import Config
from .images import LabelledImages, warn_small_images
from .two_views import TwoViews
from .ragged import RaggedImages


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, sample_seed) for one epoch: a seeded permutation, full batches only,
    starting at batch `start` (a resumed epoch); `rank`/`world` take this process's share."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return self.size // self.batch_size - self.start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        share = self.batch_size // self.world
        for b in range(self.start, self.size // self.batch_size):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank * share:(self.rank + 1) * share]
            yield [(int(i), sample_seed(self.seed, self.epoch, int(i))) for i in batch]


class Pipeline:
    """Yields (view_q, view_k, unreadable images skipped) per effective batch, on `device`."""

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def __len__(self) -> int:
        raise NotImplementedError

    def _sampler(self, epoch: int, start: int) -> EpochBatches:
        t = self.cfg.train
        return EpochBatches(len(self), t.batch_size, t.seed, epoch, start, self.rank, self.world)

    def _loader(self, dataset, workers: int, **kw) -> torch.utils.data.DataLoader:
        # A private generator for the workers' base seed keeps the global RNG out of the data path.
        return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
                                           generator=torch.Generator(), **kw)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def preview(self, indices: list[int], epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Views q and k (N, 3, S, S), float in [0, 1], unnormalised, of samples `indices` as
        training makes them in `epoch` (same data, augmentation and per-sample seeds)."""
        seeds = [sample_seed(self.cfg.train.seed, epoch, int(i)) for i in indices]
        return self._views(list(indices), seeds)

    def _views(self, indices: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PerImagePipeline(Pipeline):
    def __init__(self, images: LabelledImages, cfg: Config, device: torch.device, rank: int = 0, world: int = 1):
        super().__init__(cfg, device, rank, world)
        if rank == 0:  # one line per run, not per process; the decoded cache says it from its shapes
            warn_small_images(images, cfg.data.image_size)
        self.views = TwoViews(images, mocov2_transform(cfg.data.image_size, cfg.augment), cfg.data.on_bad_image)

    def __len__(self) -> int:
        return len(self.views)

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        loader = self._loader(self.views, self.cfg.data.workers, batch_sampler=self._sampler(epoch, start))
        for view_q, view_k, skipped in loader:
            yield self._to_device(view_q), self._to_device(view_k), int(skipped.sum())

    def _views(self, indices: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        unnormalised = TwoViews(self.views.base, mocov2_transform(self.cfg.data.image_size, self.cfg.augment,
                                                                  normalize=False), self.cfg.data.on_bad_image)
        pairs = [unnormalised[(i, s)] for i, s in zip(indices, seeds)]
        return torch.stack([q for q, _, _ in pairs]), torch.stack([k for _, k, _ in pairs])


class BatchedPipeline(Pipeline):
    def __init__(self, images: LabelledImages, cfg: Config, device: torch.device, rank: int = 0, world: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, rank, world)
        d = cfg.data
        folder = Path(d.cache_dir) if d.cache_dir else Path(d.root) / ".lowmem_moco_cache"
        self.cache = DecodedCache.open_or_build(images, folder, d.image_size, name=f"{d.source}-train",
                                                min_crop_scale=cfg.augment.crop_scale[0],
                                                on_bad_image=d.on_bad_image, progress=rank == 0)
        self.augment = BatchedMoCoV2(d.image_size, cfg.augment)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.cache)

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        # Slicing the memory map is cheap: one worker reading ahead is enough.
        loader = self.cache.loader(self._sampler(epoch, start), min(1, self.cfg.data.workers),
                                   pin_memory=self.device.type == "cuda")
        for images, _, seeds in loader:
            view_q, view_k = self._two_views(images, seeds, self.dtype, normalize=True)
            yield view_q.contiguous(memory_format=self.memory_format), \
                view_k.contiguous(memory_format=self.memory_format), 0

    def _two_views(self, images: RaggedImages, seeds: torch.Tensor, dtype: torch.dtype, normalize: bool):
        # Every view is a function of its sample's own seed: exact on resume, whatever the batch.
        return self.augment.two_views(images.to(self.device, non_blocking=True), seeds, dtype, normalize)

    def _views(self, indices: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._two_views(self.cache.batch(indices), torch.tensor(seeds), torch.float32, normalize=False)


def build_pipeline(images: LabelledImages, cfg: Config, device: torch.device, rank: int = 0, world: int = 1,
                   dtype: torch.dtype = torch.float32) -> Pipeline:
    mode = cfg.data.augment
    if mode == "auto":
        mode = "batched" if device.type == "cuda" else "per_image"
    if mode == "batched":
        return BatchedPipeline(images, cfg, device, rank, world, dtype)
    return PerImagePipeline(images, cfg, device, rank, world)
