"""The one DataLoader factory of the package.

    loader = make_loader(dataset, workers=2, pin_memory=True, batch_sampler=batches)

Every loader gets a private generator for its workers' base seed, so loading never draws
from the global RNG that a run's reproducibility rests on (`seed` fixes it, for a shuffled
loader); `ragged=True` hands a batch over as the list of its items, for images whose sizes
differ.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def make_loader(dataset, *, workers: int, pin_memory: bool = False, seed: int | None = None,
                ragged: bool = False, **options) -> DataLoader:
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    if ragged:
        options["collate_fn"] = list  # no stacking: the items' sizes differ
    return DataLoader(dataset, num_workers=workers, pin_memory=pin_memory, generator=generator, **options)
