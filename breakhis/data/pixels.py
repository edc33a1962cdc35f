"""Stored decoded pixels: each tile of a prepared DEST decoded and resized once, kept
beside its PNG bytes, so that training and scoring at that size never decode again.

``breakhis prepare --pixels 224`` writes, for every shard ``shards/NAME``, a file
``pixels/224/NAME``: the shard's accepted rows in the same order, with the columns
ingest filters on (``tile_id``, ``uri``, ``patient_id``, ``label``, ``magnification``)
and ``image``, each tile as ``3 * S * W`` bytes (fixed-size binary), uint8 CHW: the canonical
aspect-kept tile of breakhis.data.geometry (height S, W = round(S * 700 / 460)), exactly what
``EvalTransform(canonical=True)`` decodes from its PNG (the decoder of breakhis.data.imaging,
then Pillow's bilinear resize), so reading it gives the pixels a decode would; the centre
view is a slice of it. DESTs prepared before 2026-12-07 stored squashed S x S tiles: their
manifest lacks ``GEOMETRY_KEY`` and ingest decodes their PNGs instead.

The PNG bytes stay the source of truth: a size can be added to (or lost from) a DEST at
any time. The manifest's metadata lists the sizes every shard has (``PIXELS_KEY``).

Format, measured on the 60 real sample tiles (580 KB PNGs) at 224 px, one core:
Parquet with zstd level 1 is 0.87 of the raw bytes (PNG: 3.9x the raw bytes) and reads
back in 0.24 ms a tile; uncompressed or lz4 keep all the bytes (1.00) and read in
0.09 ms; zstd 3 saves 3 % more and writes 2x slower. A PNG decode costs ~6 ms, so read
speed is not the limit either way, and the bytes are what travels from S3: zstd 1.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.data.geometry import canonical_width

PIXELS_KEY = "breakhis.pixels"
"""Manifest metadata key: JSON list of the sizes stored under DEST/pixels/."""
GEOMETRY_KEY = "breakhis.pixels_geometry"
"""Manifest metadata key: the geometry of the stored pixels (``aspect``)."""
PIXEL_COLUMNS = ("tile_id", "uri", "patient_id", "label", "magnification")
"""The shard columns stored beside the pixels (what ingest filters and returns)."""
_COMPRESSION, _LEVEL = "zstd", 1


def pixels_uri(dest: str, size: int) -> str:
    """The folder of DEST's pixels at ``size``."""
    return storage.join(dest, "pixels", str(size))


def pixel_file_uri(shard_uri: str, size: int) -> str:
    """The pixel file of the shard at ``shard_uri`` (``DEST/shards/NAME``) at ``size``."""
    shards, name = shard_uri.rsplit("/", 1)
    dest = shards.rsplit("/", 1)[0]
    return storage.join(pixels_uri(dest, size), name)


def pixel_schema(source: pa.Schema, size: int) -> pa.Schema:
    """The schema of a pixel file: ``PIXEL_COLUMNS`` as typed in ``source``, and ``image``."""
    fields = [source.field(name) for name in PIXEL_COLUMNS]
    return pa.schema([*fields, pa.field("image", pa.binary(3 * size * canonical_width(size)))])


def image_column(images: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 (n, 3, H, W) images as a fixed-size binary column, one value per tile."""
    n, channels, height, width = images.shape
    data = pa.py_buffer(np.ascontiguousarray(images, dtype=np.uint8))
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(channels * height * width), n, [None, data]
    )


def images_of(column: pa.Array | pa.ChunkedArray, size: int) -> np.ndarray:
    """A fixed-size binary column back as uint8 (n, 3, S, S), without copying one chunk."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    wide = canonical_width(size)
    if column.type != pa.binary(3 * size * wide):
        raise ValueError(f"stored pixels are {column.type}, not {size} x {wide} RGB")
    if len(column) == 0:
        return np.empty((0, 3, size, wide), dtype=np.uint8)
    nbytes = 3 * size * wide
    flat = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    start = column.offset * nbytes
    return flat[start : start + len(column) * nbytes].reshape(len(column), 3, size, wide)


def encode_pixel_file(rows: pa.Table, images: np.ndarray, *, row_group_rows: int) -> bytes:
    """The Parquet bytes of one pixel file: ``rows`` (with PIXEL_COLUMNS) and their images."""
    table = rows.select(list(PIXEL_COLUMNS)).append_column(
        pa.field("image", pa.binary(int(np.prod(images.shape[1:])))), image_column(images)
    )
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        row_group_size=row_group_rows,
        compression=_COMPRESSION,
        compression_level=_LEVEL,
        use_dictionary=list(PIXEL_COLUMNS),  # pixels are not a dictionary's kind of data
    )
    return buffer.getvalue()


def is_complete(uri: str, size: int | None = None) -> bool:
    """True when a readable Parquet file (its footer written) is at ``uri`` and, with
    ``size``, holds canonical tiles of that size (not an older prepare's squashed ones)."""
    fs, path = storage.resolve(uri)
    try:
        schema = pq.ParquetFile(fs.open_input_file(path)).schema_arrow
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return False
    return size is None or schema.field("image").type == pa.binary(3 * size * canonical_width(size))


def read_stored(shard_uri: str, uris: list[str], size: int) -> dict[str, np.ndarray] | None:
    """The stored pixels at ``size`` of the tiles ``uris`` of one shard, uri -> uint8
    canonical (3, S, W) (a uri the file lacks is left out), or None when the shard has no readable
    pixel file of that size (the caller decodes its PNGs instead)."""
    fs, path = storage.resolve(pixel_file_uri(shard_uri, size))
    try:
        # Row-group statistics on the sorted uri column skip most of the file.
        table = pq.read_table(
            path, filesystem=fs, columns=["uri", "image"], filters=[("uri", "in", uris)]
        )
        images = images_of(table.column("image"), size)
    except (OSError, pa.ArrowInvalid, ValueError):
        return None
    return dict(zip(table.column("uri").to_pylist(), images, strict=True))
