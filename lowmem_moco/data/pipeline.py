"""The training input: which images, in what order, turned into two views on the device.

The order of an epoch and every view are functions of (seed, epoch, index), so a resumed
run sees exactly the batches an uninterrupted one would. Two ways to make the views:

- `per_image`: PIL images augmented one by one in DataLoader workers (any data, no cache);
- `batched`: a batch of uint8 images from the store data.cache picks (a memory-mapped decoded
  cache, an encoded one decoded per batch, or the files themselves; stores/choice.py),
  augmented in one pass on the training device (what keeps a GPU fed by 2 CPU cores).

Both read the `augment:` section. `preview(indices, epoch)` returns the views training
makes for those samples in that epoch, unnormalised, for looking at them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import torch

from .augment.per_image import view_transforms
from .augment.batched import BatchedMoCoV2
from .stores.choice import open_image_store
from ..config import Config
from ..run_settings import memory_format
from .stores.encoded_store import EncodedStore
from .sources.images import LabelledImages, warn_small_images
from .lazy_views import BatchedView, CopiedView
from .two_views import TwoViews
from .loader import make_loader


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
    """Yields (view_q, view_k, unreadable images skipped) per effective batch: lazy views
    (lazy_views.py) that make any rows of the batch on `device` when the step asks."""

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.memory_format = memory_format(cfg)

    def __len__(self) -> int:
        raise NotImplementedError

    def _sampler(self, epoch: int, start: int) -> EpochBatches:
        t = self.cfg.train
        return EpochBatches(len(self), t.batch_size, t.seed, epoch, start, self.rank, self.world)

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
        self.views = TwoViews(images, view_transforms(cfg.data.image_size, cfg.augment), cfg.data.on_bad_image)

    def __len__(self) -> int:
        return len(self.views)

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[CopiedView, CopiedView, int]]:
        loader = make_loader(self.views, workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                             batch_sampler=self._sampler(epoch, start))
        for view_q, view_k, skipped in loader:  # Bx3xSxS each, on the host
            yield CopiedView(view_q, self.device, self.memory_format), \
                CopiedView(view_k, self.device, self.memory_format), int(skipped.sum())

    def _views(self, indices: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        unnormalised = TwoViews(self.views.base, view_transforms(self.cfg.data.image_size, self.cfg.augment,
                                                                 normalize=False), self.cfg.data.on_bad_image)
        pairs = [unnormalised[(i, s)] for i, s in zip(indices, seeds)]
        return torch.stack([q for q, _, _ in pairs]), torch.stack([k for _, k, _ in pairs])


class BatchedPipeline(Pipeline):
    def __init__(self, images: LabelledImages, cfg: Config, device: torch.device, rank: int = 0, world: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device, rank, world)
        d = cfg.data
        folder = Path(d.cache_dir) if d.cache_dir else Path(d.root) / ".lowmem_moco_cache"
        # DecodedCache, EncodedCache or SourceFiles (data.cache): one interface, see stores/choice.py.
        self.cache = open_image_store(images, cfg, folder, f"{d.source}-train", progress=rank == 0)
        self.augment = BatchedMoCoV2(d.image_size, cfg.augment)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.cache)

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[BatchedView, BatchedView, int]]:
        # Slicing the decoded memory map is cheap: one worker reading ahead is enough. Encoded
        # stores decode JPEGs in the workers on a CPU: all of them.
        workers = self.cfg.data.workers if isinstance(self.cache, EncodedStore) else min(1, self.cfg.data.workers)
        loader = self.cache.loader(self._sampler(epoch, start), workers, pin_memory=self.device.type == "cuda")
        for images, _, seeds in loader:  # the batch's source images stay on the host until a view needs them
            yield tuple(BatchedView(images, seeds, self.augment, number, self.device, self.dtype, self.memory_format)
                        for number in (0, 1)) + (0,)

    def _views(self, indices: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.cache.batch(indices).to(self.device)
        return self.augment.two_views(images, torch.tensor(seeds), torch.float32, normalize=False)


def build_pipeline(images: LabelledImages, cfg: Config, device: torch.device, rank: int = 0, world: int = 1,
                   dtype: torch.dtype = torch.float32) -> Pipeline:
    mode = cfg.data.augment
    if mode == "auto":
        mode = "batched" if device.type == "cuda" else "per_image"
    if mode == "batched":
        return BatchedPipeline(images, cfg, device, rank, world, dtype)
    if cfg.data.cache != "auto" and rank == 0:
        warnings.warn(f"data.cache={cfg.data.cache} is unused: data.augment=auto chose the per-image path on a "
                      f"{device.type.upper()}; set data.augment=batched to use the cache")
    return PerImagePipeline(images, cfg, device, rank, world)
