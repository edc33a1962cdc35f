"""The one decoder (breakhis.data.imaging): libspng for 8-bit RGB PNGs, Pillow for the rest,
and the same pixels as Pillow alone either way."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breakhis.data import imaging
from breakhis.data.imaging import decode_check, decode_rgb, png_layout
from breakhis.names import parse_name
from breakhis.synth.dataset import render_tile


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


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, depth: int, colour: int, raw: bytes) -> bytes:
    """A PNG written chunk by chunk, with correct CRCs, from its raw (filtered) scanlines."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return _png(width, height, 16, 2, raw)


def _chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, offset, data length)`` of each chunk of a good PNG."""
    found, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        found.append((data[pos + 4 : pos + 8], pos, length))
        pos += 12 + length
    return found


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
        "opaque grayscale+alpha png": _save(image.convert("LA"), "PNG"),
        "opaque rgba png": _save(image.convert("RGBA"), "PNG"),
        "palette png": _save(image.convert("P"), "PNG"),
        "16-bit rgb png": _png_rgb16(rgb.astype(np.uint16) * 256 + 3),
        "jpeg": _save(image, "JPEG", quality=90),
        "tiff": _save(image, "TIFF"),
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
    # Correct CRCs, but scanline filter 7 (there are five): libspng refuses, Pillow names it.
    bad_filter = _png(4, 2, 8, 2, b"\x07" + bytes(12) + b"\x00" + bytes(12))
    reason, width, height = decode_check(bad_filter)
    assert (width, height) == (0, 0) and reason.startswith("cannot decode:"), reason
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(bad_filter)
    assert len(spng_calls) == 2  # tried, refused, then Pillow named the problem
    assert decode_check(b"") == ("empty file (0 bytes)", 0, 0)
    assert (
        decode_check(b"not an image")[0] == "not an image of an accepted format (PNG, JPEG, TIFF)"
    )
    # A truncated PNG is refused by the chunk walk before any decoder runs.
    data = _save(Image.fromarray(np.full((40, 40, 3), 200, np.uint8)), "PNG")
    reason = decode_check(data[: len(data) // 2])[0]
    assert reason.startswith("cannot decode: PNG chunk IDAT at byte"), reason
    # A header announcing a decompression bomb never reaches libspng (its CRC is correct).
    bomb = bytearray(data)
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    assert decode_check(bytes(bomb))[0] is not None
    assert len(spng_calls) == 2


def _flips(data: bytes) -> list[tuple[int, int]]:
    """``(position, chunk offset)`` of one byte in each field of every chunk (length, type,
    first, middle and last data byte, CRC), and of the signature (chunk offset -1)."""
    positions = [(0, -1), (3, -1), (7, -1)]
    for _, pos, length in _chunks(data):
        inside = {pos + 8, pos + 8 + length // 2, pos + 7 + length} if length else set()
        for at in sorted({pos + 3, pos + 5, pos + 10 + length} | inside):
            positions.append((at, pos))
    return positions


def test_every_flipped_byte_of_a_real_tile_is_refused(realdata_dir: Path) -> None:
    """libspng ignores chunk CRCs, so a flipped bit inside IDAT often decoded to wrong
    pixels without an error; every such file is refused now, naming the damaged chunk,
    as Pillow refuses every one that changes pixels."""
    paths = sorted(realdata_dir.rglob("*.png"))[::15]
    assert len(paths) >= 4
    checked = idat = 0
    for path in paths:
        data = path.read_bytes()
        assert decode_check(data)[0] is None
        for i, (at, chunk) in enumerate(_flips(data)):
            bad = bytearray(data)
            bad[at] ^= (0x01, 0x80, 0x10)[i % 3]
            bad = bytes(bad)
            reason = decode_check(bad)[0]
            assert reason is not None, f"{path.name}: flipped byte {at} decoded without error"
            if chunk >= 0:
                assert f"at byte {chunk}" in reason, (at, reason)
            if chunk >= 0 and data[chunk + 4 : chunk + 8] == b"IDAT" and at >= chunk + 8:
                assert "PNG chunk IDAT" in reason and "CRC" in reason, reason
                idat += 1
                if at < chunk + 8 + struct.unpack(">I", data[chunk : chunk + 4])[0]:
                    with pytest.raises((OSError, SyntaxError, ValueError, zlib.error)):
                        _pillow_rgb(bad)
            checked += 1
    assert idat >= 4 * 20 * 3 and checked > idat


def test_16bit_grey_keeps_its_high_byte_instead_of_turning_white(spng_calls) -> None:
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(19, 27), dtype=np.uint8)
    low = rng.integers(0, 256, grey.shape, dtype=np.uint16)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 256 + low)
    expected = np.repeat(grey[..., None], 3, axis=2)
    for fmt in ("PNG", "TIFF"):
        data = _save(sixteen, fmt)
        assert Image.open(io.BytesIO(data)).mode.startswith("I;16"), fmt
        np.testing.assert_array_equal(decode_rgb(data), expected, err_msg=fmt)
        assert decode_check(data) == (None, 27, 19)
    # 32-bit samples have no one 8-bit reading: refused, not clipped to white.
    for array in (grey.astype(np.int32) << 20, grey.astype(np.float32) / 255):
        reason = decode_check(_save(Image.fromarray(array), "TIFF"))[0]
        assert reason is not None and reason.startswith("unsupported pixel format"), reason
    assert spng_calls == []


def test_transparency_is_composited_on_white(spng_calls) -> None:
    colour = np.array([200, 40, 90], np.uint8)
    rgb = np.broadcast_to(colour, (4, 3, 3)).copy()
    alpha = np.array([0, 255, 128], np.uint8)  # one value per column
    half = (colour.astype(int) * 128 + 255 * 127) / 255
    rgba = np.dstack([rgb, np.broadcast_to(alpha, (4, 3))])
    grey_alpha = np.dstack([rgb[..., :1], np.broadcast_to(alpha, (4, 3))])
    for name, data, ink in (
        ("rgba png", _save(Image.fromarray(rgba), "PNG"), colour),
        ("rgba tiff", _save(Image.fromarray(rgba), "TIFF"), colour),
        ("grey+alpha png", _save(Image.fromarray(grey_alpha, "LA"), "PNG"), colour[:1]),
    ):
        out = decode_rgb(data).astype(int)
        assert (out[:, 0] == 255).all(), f"{name}: transparent pixels are not white"
        assert (out[:, 1] == ink).all(), f"{name}: opaque pixels changed"
        want = half if ink.size == 3 else half[:1]
        assert (np.abs(out[:, 2] - want) <= 1).all(), f"{name}: half alpha {out[0, 2]}"
    # A transparent colour (tRNS) of an 8-bit RGB or a palette PNG: libspng would drop it.
    image = Image.fromarray(np.where(np.arange(3)[None, :, None] == 0, rgb, 10).astype(np.uint8))
    palette = image.convert("P", palette=Image.ADAPTIVE)
    key = int(np.asarray(palette)[0, 1])
    for name, data, opaque in (
        ("rgb png with tRNS", _save(image, "PNG", transparency=(10, 10, 10)), colour),
        ("palette png with tRNS", _save(palette, "PNG", transparency=key), None),
    ):
        out = decode_rgb(data)
        assert (out[:, 1:] == 255).all(), f"{name}: the transparent colour is not white"
        expected = np.asarray(palette.convert("RGB"))[:, 0] if opaque is None else opaque
        assert (out[:, 0] == expected).all(), name
    assert spng_calls == []


_EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
    b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
)


def test_only_png_jpeg_and_tiff_are_opened(monkeypatch, spng_calls) -> None:
    """Pillow would open ~40 formats whatever the file's suffix; an EPS would run Ghostscript."""
    from PIL import EpsImagePlugin

    ghostscript: list[object] = []

    def spy(*args, **kwargs):
        ghostscript.append(args)
        raise OSError("Ghostscript would run here")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", spy)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    image = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    for name, data in (
        ("eps", _EPS),
        ("bmp", _save(image, "BMP")),
        ("gif", _save(image, "GIF")),
        ("ico", _save(image, "ICO")),
    ):
        reason = decode_check(data)
        assert reason == ("not an image of an accepted format (PNG, JPEG, TIFF)", 0, 0), name
        with pytest.raises(ValueError, match="accepted format"):
            decode_rgb(data)
    assert ghostscript == []
    assert spng_calls == []
