"""Reading and decoding tiles for the model: the decode tasks of ``breakhis score`` and
``breakhis evaluate`` (breakhis.score.predict's pipeline).

A tile is read from its file, from a prepared shard's PNG bytes, or from the shard's stored
pixels; decoded with breakhis.data.imaging.decode_rgb and made the model's evaluation input by its
card's TileGeometry (breakhis.data.geometry), as training validates. A bad tile (missing, refused, over the size cap, undecodable) becomes an
error row; a transient storage error is retried (breakhis.storage.read_retrying), then raised,
so that the task fails and is retried, never stored as the tile's result.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis import faults, storage
from breakhis.data.geometry import TileGeometry


def decode_tiles(
    batch: dict[str, np.ndarray],
    *,
    geometry: TileGeometry,
    max_tile_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode one batch of tiles (a Ray Data map_batches function) into the
    model's evaluation input of ``geometry`` (the card's ``tile_geometry``).

    ``batch`` columns: uri, tile_id, unit, shard (null: read ``uri``). A tile of a
    prepared shard with pixels stored at the geometry's size (``breakhis prepare
    --pixels``) is read from them, not decoded: the same pixels. Returns uri, tile_id,
    unit, ``image`` (N, H, W, 3 uint8; zeros for a bad tile) and ``error`` ("" when decoded,
    else ``read: ...``/``decode: ...``). A bad tile (missing, refused, over
    ``max_tile_bytes``, undecodable) is an error row, never an exception; a transient storage
    error still there after retries raises breakhis.storage.TransientStorageError, so that
    the task is retried instead of the error being kept as the tile's result.
    """
    from breakhis.data.imaging import decode_rgb

    faults.before("decode", batch["tile_id"])
    uris = [str(u) for u in batch["uri"]]
    stored_size = geometry.size if geometry.geometry == "aspect" else None
    data = _read_tile_bytes(uris, list(batch["shard"]), stored_size, max_tile_bytes)
    images = np.zeros((len(uris), *geometry.eval_hw, 3), dtype=np.uint8)
    errors = []
    for i, uri in enumerate(uris):
        value = data[uri]
        if isinstance(value, str):
            errors.append(value)
            continue
        if isinstance(value, np.ndarray):  # stored canonical pixels, CHW
            images[i] = geometry.view_of(geometry.normalise_stain(value)).transpose(1, 2, 0)
            errors.append("")
            continue
        try:
            images[i] = geometry.eval_pixels(decode_rgb(value))
        except ValueError as err:
            errors.append(f"decode: {err}")
            continue
        errors.append("")
    return {
        "uri": np.asarray(uris, dtype=object),
        "tile_id": batch["tile_id"],
        "unit": batch["unit"],
        "image": images,
        "error": np.asarray(errors, dtype=object),
    }


def _read_tile_bytes(
    uris: list[str], shards: list, image_size: int | None = None, max_bytes: int | None = None
) -> dict[str, bytes | str | np.ndarray]:
    """uri -> bytes, or -> the read error's text, or -> the tile's stored canonical pixels
    at ``image_size`` (uint8 CHW) when its shard has them. Raises TransientStorageError."""
    from breakhis.data.pixels import read_stored

    out: dict[str, bytes | str | np.ndarray] = {}
    by_shard: dict[str, list[str]] = defaultdict(list)
    for uri, shard in zip(uris, shards, strict=True):
        if shard:
            by_shard[str(shard)].append(uri)
            continue
        try:
            out[uri] = storage.read_retrying(uri, max_bytes)
        except storage.TransientStorageError:
            raise
        except storage.ObjectTooLargeError as err:
            out[uri] = f"read: {err} (--max-tile-mb)"
        except OSError as err:  # FileNotFoundError, refused (403): permanent
            out[uri] = f"read: {err}"
    for shard, members in by_shard.items():
        stored = read_stored(shard, members, image_size) if image_size else None
        if stored:
            out.update(stored)
            members = [u for u in members if u not in stored]
            if not members:
                continue
        out.update(_read_from_shard(shard, members, max_bytes))
    return out


def _read_from_shard(shard: str, members: list[str], max_bytes: int | None) -> dict:
    """uri -> PNG bytes (or the error's text) of ``members`` of a prepared shard."""
    fs, path = storage.resolve(shard)
    try:
        # Row-group statistics on the sorted uri column let the reader skip most of the shard.
        table = storage.retrying(
            lambda: pq.read_table(
                path, filesystem=fs, columns=["uri", "png"], filters=[("uri", "in", members)]
            ),
            shard,
        )
        found = dict(
            zip(table.column("uri").to_pylist(), table.column("png").to_pylist(), strict=True)
        )
    except storage.TransientStorageError:
        raise
    except (OSError, pa.ArrowInvalid) as err:
        found, problem = {}, f"read: {shard}: {err}"
    else:
        problem = f"read: not in shard {shard}"
    out: dict[str, bytes | str] = {}
    for uri in members:
        data = found.get(uri, problem)
        if max_bytes is not None and isinstance(data, bytes) and len(data) > max_bytes:
            data = f"read: {storage.ObjectTooLargeError(uri, len(data), max_bytes)} (--max-tile-mb)"
        out[uri] = data
    return out
