"""A batch of uint8 images of different sizes, in one flat buffer (no padding).

    batch = RaggedImages.from_arrays([hwc_a, hwc_b])  # each (H_i, W_i, 3) uint8
    batch.image(1)                                     # (3, H_1, W_1) view, channels_last strides
    batch = batch.pin_memory().to("cuda", non_blocking=True)

One contiguous buffer moves to a device (or through a DataLoader worker's shared memory)
in one copy, whatever the images' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class RaggedImages:
    pixels: torch.Tensor  # (total,) uint8: image i is pixels[offsets[i]:][:H_i * W_i * 3], HWC
    offsets: torch.Tensor  # (N,) int64, on the CPU
    shapes: torch.Tensor  # (N, 2) int64 (height, width), on the CPU

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> "RaggedImages":
        """Images (H_i, W_i, 3) uint8 -> one batch (a single copy of the pixels)."""
        shapes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64).view(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1] * 3
        offsets = torch.cumsum(sizes, 0) - sizes
        pixels = np.concatenate([np.asarray(a, dtype=np.uint8).reshape(-1) for a in arrays]) if len(arrays) \
            else np.empty(0, dtype=np.uint8)
        return cls(torch.from_numpy(pixels), offsets, shapes)

    @classmethod
    def from_tensor(cls, images: torch.Tensor) -> "RaggedImages":
        """A uniform uint8 batch (N, 3, H, W) as a ragged one (one copy, on its device)."""
        n, _, height, width = images.shape
        pixels = images.permute(0, 2, 3, 1).reshape(-1)
        offsets = torch.arange(n, dtype=torch.int64) * (height * width * 3)
        return cls(pixels, offsets, torch.tensor([[height, width]] * n, dtype=torch.int64).view(n, 2))

    def __len__(self) -> int:
        return self.shapes.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def image(self, i: int) -> torch.Tensor:
        """(3, H_i, W_i) uint8 view of image i."""
        height, width = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return self.pixels[start:start + height * width * 3].view(height, width, 3).permute(2, 0, 1)

    def images(self) -> list[torch.Tensor]:
        """All images as (3, H_i, W_i) uint8 views (cheaper than calling image(i) for each)."""
        flat = self.pixels
        return [flat[start:start + height * width * 3].view(height, width, 3).permute(2, 0, 1)
                for start, (height, width) in zip(self.offsets.tolist(), self.shapes.tolist())]

    def select(self, rows) -> "RaggedImages":
        """Images `rows` (a list or 1-D tensor of positions) as a new batch (one gathered copy)."""
        rows = torch.as_tensor(rows, dtype=torch.int64).cpu()
        shapes = self.shapes[rows]  # (r, 2)
        sizes = shapes[:, 0] * shapes[:, 1] * 3  # (r,)
        if len(rows) == 0:
            return RaggedImages(self.pixels[:0], sizes, shapes)
        starts = self.offsets[rows]
        # A pinned batch gives a pinned subset, so that its copy to a GPU stays asynchronous.
        pinned = self.pixels.device.type == "cpu" and self.pixels.is_pinned()
        pixels = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=self.pixels.device, pin_memory=pinned)
        torch.cat([self.pixels[s:s + n] for s, n in zip(starts.tolist(), sizes.tolist())], out=pixels)
        return RaggedImages(pixels, torch.cumsum(sizes, 0) - sizes, shapes)

    def to(self, device, non_blocking: bool = False) -> "RaggedImages":
        return RaggedImages(self.pixels.to(device, non_blocking=non_blocking), self.offsets, self.shapes)

    def pin_memory(self) -> "RaggedImages":  # called by DataLoader(pin_memory=True)
        return RaggedImages(self.pixels.pin_memory(), self.offsets, self.shapes)
