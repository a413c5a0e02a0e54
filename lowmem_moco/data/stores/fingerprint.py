"""Identity of a data set, for telling whether a derived copy of it (the decoded cache) is current."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from ...errors import DataError


def source_fingerprint(images, source_id: Optional[str] = None) -> str:
    """Identity of a LabelledImages set: its files (path, size, mtime) and labels.

    Sets holding their pixels in a numpy `array` (with an optional `index`) are identified by
    its bytes. Others need an identity: pass `source_id`, or give the set a `cache_identity`
    attribute (a string, or a method returning one).
    """
    digest = hashlib.sha256()
    digest.update(f"{type(images).__qualname__}|{len(images)}|".encode())
    digest.update(np.asarray(images.targets, dtype=np.int64).tobytes())
    digest.update(json.dumps(list(getattr(images, "classes", []))).encode())
    identity = source_id if source_id is not None else getattr(images, "cache_identity", None)
    if callable(identity):
        identity = identity()
    if identity is not None:
        digest.update(str(identity).encode())
        return digest.hexdigest()
    array = getattr(images, "array", None)
    if isinstance(array, np.ndarray):  # pixels held in memory: their bytes are the identity
        digest.update(np.ascontiguousarray(array).data)
        digest.update(np.asarray(getattr(images, "index", []), dtype=np.int64).tobytes())
        return digest.hexdigest()
    paths = _file_list(images)
    if paths is None:
        raise DataError(f"cannot tell whether the cached copy of this {type(images).__name__} is current: it "
                        f"lists no image files; pass source_id=... (any string that changes with the data)")
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing now: part of the identity, and skipped at build
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def _file_list(images) -> Optional[list]:
    for attr in ("paths", "files", "samples", "imgs"):
        items = getattr(images, attr, None)
        if items is None or callable(items) or len(items) != len(images):
            continue
        items = [items[i] for i in range(len(items))]
        items = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        if all(isinstance(item, (str, os.PathLike)) for item in items):
            return [os.fspath(item) for item in items]
    return None
