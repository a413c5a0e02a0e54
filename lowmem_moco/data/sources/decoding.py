"""Turning an image file into RGB pixels, and what happens to one that cannot be read: its
reason in a few words, the error naming it, and the skipped-file line (once per file, capped)."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...errors import DataError

log = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit scaled down, transparency composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float grey levels: scale to 0..255 instead of clipping
        # (a plain convert("L") turns most of a 16-bit image white).
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        full = 65535.0 if mode.startswith("I;16") or peak > 255 else 1.0 if mode == "F" and peak <= 1 else 255.0
        grey = np.clip(values * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def unreadable_reason(err: BaseException, path: str, image_format: str | None = None) -> str:
    """A few words on why a file could not be decoded, e.g. "truncated JPEG", "not an image".
    `image_format` is PIL's name for it when its header was read, else its extension's."""
    text = (str(err).splitlines() or [""])[0]
    if ".cpp:" in text:  # torchvision's decoders put their source location first ('x.cpp:171, ')
        text = text.split(".cpp:", 1)[1].split(", ", 1)[-1]
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, PermissionError):
        return "no permission to read it"
    if isinstance(err, Image.DecompressionBombError):  # larger than PIL.Image.MAX_IMAGE_PIXELS allows
        return f"too many pixels ({text})"
    if isinstance(err, UnidentifiedImageError):
        return "not an image (or too damaged to tell its format)"
    kind = image_format or Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "image")
    if "truncated" in text.lower():  # PIL: "image file is truncated (N bytes not processed)"
        return f"truncated {kind}"
    return f"damaged {kind} ({type(err).__name__}: {text})"


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (missing, truncated, corrupt or not an image)."""

    def __init__(self, path: str, reason: str | None = None):
        if reason is None:  # re-raised from a DataLoader worker, which passes its traceback as one string:
            message = path.rstrip().rsplit("\n", 1)[-1].split("UnreadableImageError: ", 1)[-1]  # our line
            found = re.fullmatch(r"cannot read image (.+?): (.+?); replace or delete .*", message)
            self.path, self.reason = found.groups() if found else ("", message)
            super().__init__(message)
            return
        self.path, self.reason = path, reason
        super().__init__(f"cannot read image {path}: {reason}; replace or delete the file, "
                         f"or set data.on_bad_image=skip to skip such files")

    @property
    def skipped_line(self) -> str:
        """The one line a skipped file gets: 'skipped <path>: <reason>'."""
        return f"skipped {self.path}: {self.reason}"


_reported: set[str] = set()  # unreadable files already named by this process
_MAX_SKIP_LINES = 20  # per process (a DataLoader worker lives one epoch): a broken folder is not a flood


def report_skipped(err: UnreadableImageError) -> None:
    """Log a skipped file's line once per process, and at most _MAX_SKIP_LINES lines."""
    if err.path in _reported or len(_reported) > _MAX_SKIP_LINES:
        return
    _reported.add(err.path)
    if len(_reported) > _MAX_SKIP_LINES:
        log.warning("more unreadable images skipped (not named; the first %d are above)", _MAX_SKIP_LINES)
    else:
        log.warning("%s", err.skipped_line)
