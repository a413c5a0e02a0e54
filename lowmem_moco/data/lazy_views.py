"""The pipeline's lazy views (engine/views.py): each sample's view made when the step asks for it.

    view_k = BatchedView(images, seeds, augment, number=1, device=cuda, dtype=torch.float16)
    keys_chunk = view_k(rows)  # (r, 3, S, S) on cuda: rows' source images augmented now

- `BatchedView` (batched path): the batch's source images (uint8, any sizes) stay where the
  loader put them (pinned host memory for a GPU); the rows asked for are selected, moved to
  the device and augmented there. Views are functions of each sample's seed, so a view made
  for a chunk equals that row of a view made for the whole batch, bit for bit.
- `CopiedView` (per-image path): views made whole by the DataLoader workers stay on the
  host; the rows asked for are copied to the device.

Either way the device holds one key chunk's or one micro-batch's views at a time, whatever
the effective batch and the image size. The costs: under `moco.symmetric` each view is used
as a key and as a query, so the batched path makes it twice; with an encoded store on a GPU
(data.cache=encoded|none) an image is decoded for each view the step makes from it (twice per
step, four times under moco.symmetric).
"""

from __future__ import annotations

import torch

from .augment.batched import BatchedMoCoV2


class BatchedView:
    """View `number` (0: query, 1: key) of a batch of source images, augmented on demand."""

    def __init__(self, images, seeds: torch.Tensor, augment: BatchedMoCoV2, number: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, memory_format=torch.contiguous_format):
        # images: RaggedImages (or any batch with select(rows) and .to(device) -> RaggedImages); seeds (n,)
        self.images, self.seeds, self.augment, self.number = images, seeds, augment, number
        self.device, self.dtype, self.memory_format = device, dtype, memory_format

    def __len__(self) -> int:
        return len(self.seeds)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.cpu()
        source = self.images.select(rows).to(self.device, non_blocking=True)  # r images, uint8
        views = self.augment(source, self.seeds[rows], self.dtype, normalize=True, number=self.number)  # rx3xSxS
        return views.contiguous(memory_format=self.memory_format)


class CopiedView:
    """A view made whole on the host (n, 3, S, S); rows are copied to `device` when asked for."""

    def __init__(self, views: torch.Tensor, device: torch.device, memory_format=torch.contiguous_format):
        self.views, self.device, self.memory_format = views, device, memory_format

    def __len__(self) -> int:
        return self.views.shape[0]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.cpu()
        if len(rows) and bool((rows.diff() == 1).all()):  # a micro-batch: a slice of the (pinned) batch,
            chosen = self.views.narrow(0, int(rows[0]), len(rows))  # so the copy below stays asynchronous
        else:
            chosen = self.views[rows]  # rx3xSxS on the host, gathered
        return chosen.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
