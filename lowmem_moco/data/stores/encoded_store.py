"""Image stores that hand out encoded bytes per batch, and `SourceFiles` (data.cache=none).

Both the packed encoded cache (encoded.py) and `SourceFiles` subclass `EncodedStore`, which
gives the decoded cache's duck interface (`__len__`, `targets`, `classes`, `skipped`,
`source_indices`, `batch(positions)`, `loader(...)`) on top of one method,
`encoded(positions) -> EncodedImages`:

    store = SourceFiles(images, on_bad_image="skip")        # reads each batch's files from the folder
    store.batch([5, 17]).image(0)                            # RaggedImages decoded on the CPU
    for images, targets, seeds in store.loader(batch_sampler, num_workers=2, pin_memory=True):
        images.to("cuda", non_blocking=True)                 # EncodedImages -> RaggedImages on the GPU

`loader(decode=...)`: "workers" decodes inside the DataLoader workers and yields RaggedImages
(on a CPU); "device" yields the EncodedImages, pinned, for the training device to decode
(on a GPU: nvjpeg in batches). The default follows pin_memory, i.e. whether a GPU is fed.
"""

from __future__ import annotations

import io
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .packed import split_keys
from .encoded_images import EncodedImages
from .ragged import RaggedImages
from ..loader import make_loader


def source_bytes(images, i: int) -> tuple[bytes, Optional[str]]:
    """(encoded bytes, file path) of image i: the file as it is on disk for file-backed sets,
    else (in-memory arrays, generated sets) the image losslessly as PNG, with no path."""
    path_of = getattr(images, "path", None)
    if callable(path_of):
        path = path_of(i)
        with open(path, "rb") as file:
            return file.read(), path
    buffer = io.BytesIO()
    images.load(i).convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), None


def positions_of(positions: Iterable) -> list[int]:
    return positions.cpu().tolist() if torch.is_tensor(positions) else [int(p) for p in positions]


class EncodedStore:
    """The decoded cache's interface for stores of encoded images; subclasses give `encoded`."""

    classes: list
    targets: torch.Tensor  # (count,) int64, per position
    source_indices: np.ndarray  # (count,) position -> index in the source set
    skipped: int = 0
    on_bad_image: str = "skip"

    def __len__(self) -> int:
        return len(self.targets)

    def encoded(self, positions: Iterable[int]) -> EncodedImages:
        raise NotImplementedError

    def batch(self, positions: Iterable[int]) -> RaggedImages:
        """The given rows decoded on the CPU (the same code as the GPU path, see encoded_images)."""
        return self.encoded(positions).to("cpu")

    def loader(self, batch_sampler, num_workers: int = 1, pin_memory: bool = False,
               transform: Optional[Callable] = None, decode: Optional[str] = None) -> torch.utils.data.DataLoader:
        """Batches for the keys `batch_sampler` yields (positions or (position, seed) pairs), as
        (images, targets, seeds); images are RaggedImages (decode="workers", the default without
        pin_memory) or EncodedImages for the device to decode (decode="device", the default with it)."""
        decode = decode or ("device" if pin_memory else "workers")
        if decode not in ("device", "workers"):
            raise ValueError(f"decode must be 'device' or 'workers', not {decode!r}")
        return make_loader(EncodedBatches(self, decode == "workers", transform), workers=num_workers,
                           pin_memory=pin_memory, sampler=batch_sampler, batch_size=None)


class EncodedBatches(torch.utils.data.Dataset):
    """Whole batches: keys -> (images, targets, seeds), like decoded.CachedBatches; seeds are -1
    where the keys have none. `transform(images, seeds)` (decoded images only) replaces the images."""

    def __init__(self, store: EncodedStore, decode: bool, transform: Optional[Callable] = None):
        if transform is not None and not decode:
            raise ValueError("a transform needs decoded images: use decode='workers'")
        self.store, self.decode, self.transform = store, decode, transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, keys):
        positions, seeds = split_keys(keys)
        images = self.store.encoded(positions)
        if self.decode:
            images = images.to("cpu")
            if self.transform is not None:
                images = self.transform(images, seeds)
        return images, self.store.targets[positions], seeds


class SourceFiles(EncodedStore):
    """data.cache=none: no cache file; each batch's files are read from the source and decoded
    like the encoded cache's bytes. A file that cannot be read or decoded is reported by path
    and replaced by another image of its batch (data.on_bad_image=skip), or raises (error)."""

    def __init__(self, images, on_bad_image: str = "skip"):
        self.images, self.on_bad_image = images, on_bad_image
        self.classes = list(getattr(images, "classes", []))
        self.targets = torch.as_tensor(np.asarray(images.targets, dtype=np.int64))
        self.source_indices = np.arange(len(images))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images read from their files each batch)"

    def encoded(self, positions: Iterable[int]) -> EncodedImages:
        chunks, paths = [], []
        for i in positions_of(positions):
            try:
                data, path = source_bytes(self.images, i)
            except OSError:  # missing or unreadable now: empty bytes fail to decode and are reported there
                data, path = b"", getattr(self.images, "path", lambda j: None)(i)
            chunks.append(data)
            paths.append(path or f"image {i}")
        return EncodedImages.from_bytes(chunks, paths, self.on_bad_image)

