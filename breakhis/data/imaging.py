"""Decoding tile bytes into pixels: one place, used by prepare, ingest and scoring.

An 8-bit RGB PNG (every BreakHis tile) is decoded by libspng (``pyspng``), about 2x
faster than Pillow on these tiles and pixel for pixel the same (tests/test_imaging.py
checks it on the real sample); every other image (grayscale, 16-bit, alpha, palette
PNGs, JPEG, TIFF) and any PNG that libspng refuses goes through Pillow, so the reason
recorded for a corrupt file is Pillow's. Only PNG, JPEG and TIFF are opened
(``_FORMATS``: an EPS named ``.png`` never reaches Ghostscript). Every PNG chunk's CRC is
checked first (libspng ignores them: a flipped byte would decode to wrong pixels), about
0.25 ms a real 700x460 tile, under 3% of its decode. Colour: 16-bit samples keep their
high byte (as Pillow reads 16-bit RGB); transparent pixels are composited on white; 32-bit
samples are refused. The resize is always
Pillow's (bilinear, ``reducing_gap=2.0``), on the same pixels whichever decoder ran.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

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
# What Pillow may open: the formats a tile is accepted in (breakhis.data.inputs.TILE_SUFFIXES).
# Pillow would otherwise open any of ~40 formats whatever the suffix, EPS through Ghostscript.
_FORMATS = ("PNG", "JPEG", "TIFF")
# A chunk's length is at most 2^31 - 1 (PNG spec, 5.3).
_MAX_CHUNK = 2**31 - 1


def decode_check(data: bytes) -> tuple[str | None, int, int]:
    """Fully decode ``data`` once to prove it is a usable image (for a PNG, every chunk's
    CRC too, so a damaged file is refused rather than decoded to wrong pixels).

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
    chunks = _check_png_chunks(data) if data[:8] == _PNG_SIGNATURE else frozenset()
    layout = png_layout(data) if pyspng is not None else None
    if (
        layout is not None
        and layout[2:] == _RGB8
        and layout[0] * layout[1] <= _MAX_PIXELS
        and b"tRNS" not in chunks  # a transparent colour: composited by _to_rgb
    ):
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
    return _to_rgb(image)


def _check_png_chunks(data: bytes) -> frozenset[bytes]:
    """Walk a PNG's chunks (length, type, data, CRC) up to IEND and check each CRC.

    Returns the chunk types found. Raises ValueError naming the chunk and its offset for a
    CRC mismatch, a malformed chunk, or a file that ends before IEND.
    """
    view = memoryview(data)
    pos, size, found = 8, len(data), set()
    while True:
        if pos + 8 > size:
            raise ValueError(f"cannot decode: PNG truncated at byte {pos} (no IEND chunk)")
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        name = kind.decode("latin-1")
        if not kind.isalpha():  # four ASCII letters
            raise ValueError(f"cannot decode: PNG chunk at byte {pos} has an invalid type {name!r}")
        end = pos + 8 + length
        if length > _MAX_CHUNK or end + 4 > size:
            raise ValueError(
                f"cannot decode: PNG chunk {name} at byte {pos} declares {length} bytes, "
                f"{max(size - pos - 12, 0)} remain (truncated or a damaged length)"
            )
        stored = int.from_bytes(view[end : end + 4], "big")
        computed = zlib.crc32(view[pos + 4 : end])
        if stored != computed:
            raise ValueError(
                f"cannot decode: PNG chunk {name} at byte {pos} fails its CRC (stored "
                f"{stored:08x}, computed {computed:08x}): the file is damaged"
            )
        found.add(kind)
        if kind == b"IEND":
            return frozenset(found)
        pos = end + 4


def _to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image as RGB uint8: 16-bit grey keeps its high byte (Pillow's own
    conversion clips it to white), transparency is composited on white (a dropped alpha
    would show whatever colour transparent pixels hold). Raises ValueError for 32-bit
    integer or float samples, which have no one reading as 8-bit colour."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        # A PNG's "I" (older Pillow) holds 16-bit grey too: PNG has no 32-bit samples.
        grey = np.asarray(image).astype(np.uint16)
        rgb = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
        key = image.info.get("transparency")
        if isinstance(key, int):
            rgb[grey == key] = 255
        return rgb
    if image.mode in ("I", "F"):
        raise ValueError(
            f"unsupported pixel format: {image.mode} (32-bit samples); accepted: 8- or "
            "16-bit grey, grey+alpha, RGB, RGBA or palette images"
        )
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
        if image.width * image.height > _MAX_PIXELS:
            raise ValueError(f"image too large ({image.width}x{image.height})")
    return image


def _reason(data: bytes, err: Exception) -> str:
    if not data:
        return "empty file (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return f"not an image of an accepted format ({', '.join(_FORMATS)})"
    text = str(err) or type(err).__name__
    return f"cannot decode: {text}"
