"""A batch of encoded images (their files' bytes) that decodes on the device it is sent to.

    batch = EncodedImages.from_bytes([jpeg_a, png_b])    # bytes as stored in the file
    part = batch.select([1, 0])                          # still encoded: a gathered copy of the bytes
    images = part.to("cuda", non_blocking=True)          # RaggedImages on the GPU, HWC uint8, RGB

`.to(device)` decodes: JPEG rows with one `torchvision.io.decode_jpeg(list, device=...)` call
(batched on a GPU, in the calling thread on a CPU), always as RGB, so grayscale and CMYK
JPEGs come out with three channels. Other formats (PNG, WebP, BMP, ...) take the named
fallback `PIL_FALLBACK`: PIL on the CPU and sources.decoding.to_rgb, exactly the per-image path's
decoding. `.to("cpu")` runs the same code, which is how the GPU path is tested on a CPU.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ...errors import DataError
from ..sources.decoding import UnreadableImageError, report_skipped, to_rgb, unreadable_reason
from .ragged import RaggedImages


JPEG_START = b"\xff\xd8\xff"  # SOI marker, then the first segment's marker
PIL_FALLBACK = "PIL (decoding.to_rgb) on the CPU"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_START


def pil_rgb(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8 RGB from any file format PIL reads (the non-JPEG fallback)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)


def ragged_from_chw(images: Sequence[torch.Tensor], device: torch.device) -> RaggedImages:
    """(3, H_i, W_i) uint8 images on `device` -> one RaggedImages batch there (HWC, one buffer)."""
    shapes = torch.tensor([tuple(image.shape[1:]) for image in images], dtype=torch.int64).view(-1, 2)  # (N, 2)
    sizes = shapes[:, 0] * shapes[:, 1] * 3  # (N,)
    pixels = torch.cat([image.permute(1, 2, 0).reshape(-1) for image in images]) if len(images) \
        else torch.empty(0, dtype=torch.uint8, device=device)
    return RaggedImages(pixels, torch.cumsum(sizes, 0) - sizes, shapes)


@dataclass
class EncodedImages:
    data: torch.Tensor  # (total,) uint8: image i's file bytes are data[offsets[i]:offsets[i] + lengths[i]]
    offsets: torch.Tensor  # (N,) int64
    lengths: torch.Tensor  # (N,) int64
    jpeg: torch.Tensor  # (N,) bool: decoded with decode_jpeg, else with the PIL fallback
    paths: Optional[list] = None  # per row, for messages (None: rows are named by number)
    on_bad_image: str = field(default="skip")  # skip: a row that fails takes another row's image; error: raise
    # select() keeps (the whole batch, its rows): an unreadable row's stand-in is then chosen in
    # the whole batch, the same whichever rows (key chunk, micro-batch) are decoded together.
    parent: Optional[tuple] = field(default=None, repr=False)

    @classmethod
    def from_bytes(cls, chunks: Sequence[bytes], paths: Optional[list] = None,
                   on_bad_image: str = "skip") -> "EncodedImages":
        lengths = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if sum(map(len, chunks)) \
            else torch.empty(0, dtype=torch.uint8)
        jpeg = torch.tensor([is_jpeg(c) for c in chunks], dtype=torch.bool)
        return cls(data, torch.cumsum(lengths, 0) - lengths, lengths, jpeg, paths, on_bad_image)

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def chunk(self, i: int) -> torch.Tensor:
        """(L_i,) uint8 view of row i's bytes."""
        start = int(self.offsets[i])
        return self.data[start:start + int(self.lengths[i])]

    def select(self, rows) -> "EncodedImages":
        """Rows `rows` (a list or 1-D tensor of positions), still encoded (one gathered copy of the bytes)."""
        rows = torch.as_tensor(rows, dtype=torch.int64).cpu().tolist()
        paths = [self.paths[r] for r in rows] if self.paths is not None else None
        part = EncodedImages.from_bytes([self.chunk(r).numpy().tobytes() for r in rows], paths, self.on_bad_image)
        whole, positions = self.parent or (self, list(range(len(self))))
        part.parent = (whole, [positions[r] for r in rows])
        return part

    def pin_memory(self) -> "EncodedImages":  # called by DataLoader(pin_memory=True)
        return EncodedImages(self.data.pin_memory(), self.offsets, self.lengths, self.jpeg, self.paths,
                             self.on_bad_image)

    def to(self, device, non_blocking: bool = False) -> RaggedImages:
        """Every row decoded on `device`, as RaggedImages there (RGB, HWC uint8)."""
        device = torch.device(device)
        if device.type == "cuda":
            # nvjpeg decodes on a stream of its own that does not wait for ours: memory freed by
            # kernels still queued (the previous chunk's views) must not be handed to it.
            torch.cuda.current_stream(device).synchronize()
        decoded: list = [None] * len(self)
        jpeg_rows = [i for i in range(len(self)) if self.jpeg[i]]
        if jpeg_rows:
            try:  # one call: nvjpeg decodes the whole list as a batch on a GPU
                for i, image in zip(jpeg_rows, decode_jpeg([self.chunk(i) for i in jpeg_rows],
                                                           mode=ImageReadMode.RGB, device=device)):
                    decoded[i] = image
            except (RuntimeError, TypeError):  # some row is unreadable (or torchvision < 0.19 takes no list):
                pass  # row by row below
        for i in range(len(self)):
            if decoded[i] is None:
                decoded[i] = self._decode_row(i, device, non_blocking)
        return ragged_from_chw([image if image is not None else self._stand_in(i, device, non_blocking)
                                for i, image in enumerate(decoded)], device)

    def _decode_row(self, i: int, device: torch.device, non_blocking: bool) -> Optional[torch.Tensor]:
        data = self.chunk(i)
        try:
            if self.jpeg[i]:
                try:
                    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    if device.type == "cpu":
                        raise  # a GPU decoder may refuse a JPEG the CPU one reads (e.g. CMYK): try the CPU
                    return decode_jpeg(data, mode=ImageReadMode.RGB).to(device, non_blocking=non_blocking)
            return pil_rgb(data.numpy().tobytes()).to(device, non_blocking=non_blocking)
        except Exception as err:  # decoders raise RuntimeError, OSError, SyntaxError, ValueError, ...
            name = self.paths[i] if self.paths is not None else f"row {i} of a batch"
            unreadable = UnreadableImageError(name, unreadable_reason(err, name))
            if self.on_bad_image == "error":
                raise unreadable from err
            report_skipped(unreadable)
            return None

    def _stand_in(self, i: int, device: torch.device, non_blocking: bool) -> torch.Tensor:
        """The image an unreadable row takes: the next readable row of the whole batch, in batch
        order and wrapping round (the batch keeps its size; the same whatever was selected)."""
        whole, positions = self.parent or (self, list(range(len(self))))
        n = len(whole)
        for step in range(1, n):
            image = whole._decode_row((positions[i] + step) % n, device, non_blocking)
            if image is not None:
                return image
        raise DataError(f"none of the {n} images of a batch could be decoded; check the data folder (the "
                        f"warnings above name the files), or set data.cache=decoded to check every image once")
