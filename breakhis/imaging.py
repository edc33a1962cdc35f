"""Decoding tile bytes into pixels: one place, used by prepare, ingest and scoring."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# A decompression bomb is a corrupt tile, not a reason to stop a job of millions.
_MAX_PIXELS = 64_000_000


def decode_check(data: bytes) -> tuple[str | None, int, int]:
    """Fully decode ``data`` once to prove it is a usable image.

    Returns ``(None, width, height)`` for a good image, and
    ``(reason, 0, 0)`` for a bad one; never raises for bad bytes.
    """
    try:
        image = _open(data)
        image.load()
    except Exception as err:  # any decoder failure is a property of the file
        return _reason(data, err), 0, 0
    return None, image.width, image.height


def decode_rgb(data: bytes, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Decode bytes to an RGB uint8 array (H, W, 3), resized when ``size`` is given.

    ``size`` is the output side (square) or ``(height, width)``; the resize
    is a plain bilinear one (aspect ratio not kept: BreakHis tiles are all
    close to 700x460). Raises ValueError with the reason for a bad image.
    """
    try:
        image = _open(data)
        image.load()
    except Exception as err:
        raise ValueError(_reason(data, err)) from err
    if image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > _MAX_PIXELS:
            raise ValueError(f"image too large ({image.width}x{image.height})")
    return image


def _reason(data: bytes, err: Exception) -> str:
    if not data:
        return "empty file (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return "not an image (no decoder recognises the bytes)"
    text = str(err) or type(err).__name__
    return f"cannot decode: {text}"
