"""The one decoder (breakhis.imaging): libspng for 8-bit RGB PNGs, Pillow for the rest,
and the same pixels as Pillow alone either way."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breakhis import imaging
from breakhis.imaging import decode_check, decode_rgb, png_layout
from breakhis.names import parse_name
from breakhis.synth import render_tile


def _pillow_rgb(data: bytes, size: int | None = None) -> np.ndarray:
    """What decode_rgb returned before libspng: Pillow decodes, converts and resizes."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image = image.convert("RGB") if image.mode != "RGB" else image
    if size is not None:
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(image)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one), written chunk by chunk."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def spng_calls(monkeypatch) -> list[int]:
    """Counts the images libspng decodes."""
    calls: list[int] = []
    original = imaging.pyspng.load

    def counted(data, format=None):
        calls.append(len(data))
        return original(data, format=format)

    monkeypatch.setattr(imaging.pyspng, "load", counted)
    return calls


def test_real_sample_decodes_to_pillows_pixels_bit_for_bit(realdata_dir: Path, spng_calls) -> None:
    paths = sorted(realdata_dir.rglob("*.png"))
    assert len(paths) >= 50
    for path in paths:
        data = path.read_bytes()
        assert png_layout(data)[2:] == (8, 2), path
        np.testing.assert_array_equal(decode_rgb(data), _pillow_rgb(data), err_msg=str(path))
        np.testing.assert_array_equal(decode_rgb(data, 224), _pillow_rgb(data, 224))
        height, width = _pillow_rgb(data).shape[:2]
        assert decode_check(data) == (None, width, height)
    assert len(spng_calls) == 3 * len(paths)  # libspng did every decode


def test_generated_tiles_decode_to_pillows_pixels(spng_calls) -> None:
    tile = parse_name("SOB_M_DC-14-2523-400-001.png")
    for width, height in ((700, 460), (97, 33), (16, 16)):
        pixels = render_tile(tile, width=width, height=height)
        for level in (0, 6, 9):
            data = _save(Image.fromarray(pixels), "PNG", compress_level=level)
            np.testing.assert_array_equal(decode_rgb(data), pixels)
            np.testing.assert_array_equal(decode_rgb(data, 32), _pillow_rgb(data, 32))
            np.testing.assert_array_equal(decode_rgb(data, (20, 50)).shape, (20, 50, 3))
    assert len(spng_calls) == 3 * 3 * 3


def test_other_formats_go_through_pillow_unchanged(spng_calls) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    cases = {
        "grayscale png": _save(image.convert("L"), "PNG"),
        "grayscale+alpha png": _save(image.convert("LA"), "PNG"),
        "rgba png": _save(image.convert("RGBA"), "PNG"),
        "palette png": _save(image.convert("P"), "PNG"),
        "16-bit grayscale png": _save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        "16-bit rgb png": _png_rgb16(rgb.astype(np.uint16) * 256 + 3),
        "jpeg": _save(image, "JPEG", quality=90),
        "tiff": _save(image, "TIFF"),
        "bmp": _save(image, "BMP"),
    }
    for name, data in cases.items():
        expected = _pillow_rgb(data)
        assert expected.shape == (23, 31, 3), name
        np.testing.assert_array_equal(decode_rgb(data), expected, err_msg=name)
        np.testing.assert_array_equal(decode_rgb(data, 16), _pillow_rgb(data, 16), err_msg=name)
        assert decode_check(data) == (None, 31, 23), name
    # The 16-bit RGB PNG keeps Pillow's reading of it (the high byte of each sample).
    np.testing.assert_array_equal(decode_rgb(cases["16-bit rgb png"]), rgb)
    assert spng_calls == []


def test_a_png_libspng_refuses_fails_with_pillows_reason(spng_calls) -> None:
    data = _save(Image.fromarray(np.full((40, 40, 3), 200, np.uint8)), "PNG")
    truncated = data[: len(data) // 2]
    reason, width, height = decode_check(truncated)
    assert (width, height) == (0, 0) and reason.startswith("cannot decode:")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(truncated)
    assert len(spng_calls) == 2  # tried, refused, then Pillow named the problem
    assert decode_check(b"") == ("empty file (0 bytes)", 0, 0)
    assert decode_check(b"not an image")[0] == "not an image (no decoder recognises the bytes)"
    # A header announcing a decompression bomb never reaches libspng.
    bomb = bytearray(data)
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)
    assert decode_check(bytes(bomb))[0] is not None
    assert len(spng_calls) == 2
