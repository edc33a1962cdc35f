"""Decoding tile bytes into pixels: one place, used by prepare, ingest and scoring.

An 8-bit RGB PNG (every BreakHis tile) is decoded by libspng (``pyspng``), about 2x
faster than Pillow on these tiles and pixel for pixel the same (tests/test_imaging.py
checks it on the real sample); every other image (grayscale, 16-bit, RGBA, palette
PNGs, JPEG, TIFF, ...) and any PNG that libspng refuses goes through Pillow exactly as
before, so the reason recorded for a corrupt file is Pillow's. The resize is always
Pillow's (bilinear, ``reducing_gap=2.0``), on the same pixels whichever decoder ran.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # an optional speed-up: without it every image goes through Pillow
    import pyspng
except ImportError:  # pragma: no cover - pyspng is a dependency
    pyspng = None

# A decompression bomb is a corrupt tile, not a reason to stop a job of millions.
_MAX_PIXELS = 64_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour type 2 (truecolour) at 8 bits per sample: the one layout libspng decodes here.
_RGB8 = (8, 2)


def decode_check(data: bytes) -> tuple[str | None, int, int]:
    """Fully decode ``data`` once to prove it is a usable image.

    Returns ``(None, width, height)`` for a good image, and
    ``(reason, 0, 0)`` for a bad one; never raises for bad bytes.
    """
    try:
        pixels = _decode(data)
    except ValueError as err:
        return str(err), 0, 0
    return None, pixels.shape[1], pixels.shape[0]


def decode_rgb(data: bytes, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Decode bytes to an RGB uint8 array (H, W, 3), resized when ``size`` is given.

    ``size`` is the output side (square) or ``(height, width)``; the resize
    is a plain bilinear one (aspect ratio not kept: BreakHis tiles are all
    close to 700x460). Raises ValueError with the reason for a bad image.
    """
    pixels = _decode(data)
    return pixels if size is None else resize_rgb(pixels, size)


def resize_rgb(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A decoded RGB uint8 (H, W, 3) image resized as ``decode_rgb`` resizes: to ``size``
    (side, or ``(height, width)``), bilinear, by Pillow; the same array when already there."""
    height, width = (size, size) if isinstance(size, int) else size
    if pixels.shape[:2] == (height, width):
        return pixels
    image = Image.fromarray(pixels, mode="RGB")
    return np.asarray(image.resize((width, height), Image.BILINEAR, reducing_gap=2.0))


def png_layout(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, bit depth, colour type)`` from a PNG's header, or None when
    ``data`` does not start like a PNG."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def _decode(data: bytes) -> np.ndarray:
    """The image as RGB uint8 (H, W, 3). Raises ValueError with the reason for a bad one."""
    layout = png_layout(data) if pyspng is not None else None
    if layout is not None and layout[2:] == _RGB8 and layout[0] * layout[1] <= _MAX_PIXELS:
        try:
            pixels = pyspng.load(data, format="RGB")
        except Exception:  # noqa: S110 - Pillow decodes it again and names the problem
            pass
        else:
            if pixels.shape == (layout[1], layout[0], 3) and pixels.dtype == np.uint8:
                return pixels
    try:
        image = _open(data)
        image.load()
    except Exception as err:  # any decoder failure is a property of the file
        raise ValueError(_reason(data, err)) from err
    if image.mode != "RGB":
        image = image.convert("RGB")
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
