"""A unit whose decoding keeps failing, decoded tile by tile: one poison tile (a file that
crashes the decoder or blows up its memory) becomes an error row, and its unit is written.

Every attempt of a decode task (breakhis.score.units.decode_tiles_of_units) first records
itself under the job's plan (``_plan/<token>/attempts/<unit>/<random>``, deleted with the
plan). An attempt that finds ISOLATE_AFTER earlier attempts of its unit (they died, or raised:
Ray retries the task at most breakhis.score.predict.RETRIES times) decodes the unit tile by tile,
each tile in a Ray task of its own: a tile whose task dies twice (WorkerCrashedError, or
killed for memory) is recorded as an error row naming that; a transient storage error
still fails the unit (never a result); every other tile decodes as usual.

Only decoding is isolated: the model actors see fixed-size arrays that the decoder made, the
same shape for every tile; an actor that dies anyway is restarted a bounded number of times
(breakhis.score.predict.RETRIES), then the job fails, to be rerun.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pyarrow as pa

from breakhis import storage
from breakhis.data.geometry import TileGeometry

log = logging.getLogger(__name__)

ISOLATE_AFTER = 2
"""Failed attempts of a unit's decode task after which it is decoded tile by tile (at most
breakhis.score.predict.RETRIES, so that the isolated attempt is among those Ray makes)."""
ATTEMPTS = "attempts"


def register_attempt(plan_folder: str, unit: str) -> int:
    """Record one more decode attempt of ``unit`` under ``plan_folder``; return how many
    were recorded before it."""
    folder = storage.join(plan_folder, ATTEMPTS, unit)
    try:
        before = sum(1 for _ in storage.walk(folder))
    except FileNotFoundError:
        before = 0
    storage.write_bytes(storage.join(folder, uuid.uuid4().hex), b"")
    return before


def decode_alone(
    members: pa.Table, *, geometry: TileGeometry, max_tile_bytes: int | None, unit: str
) -> dict[str, np.ndarray]:
    """breakhis.data.tile_decode.decode_tiles over ``members`` (INPUT_SCHEMA rows and a ``unit``
    column), each tile in its own Ray task (retried once if its worker dies). Returns
    decode_tiles' columns; a tile whose task died twice is an error row. Raises what a
    task raised (TransientStorageError included)."""
    import ray

    from breakhis.data.tile_decode import decode_tiles
    from breakhis.score.predict import DECODE_CPUS

    log.warning("%s: decode failed %d times; decoding it tile by tile", unit, ISOLATE_AFTER)
    task = ray.remote(num_cpus=DECODE_CPUS, max_retries=1)(decode_tiles)
    refs = [
        task.remote(
            {
                **{c: _objects(members, c)[i : i + 1] for c in ("uri", "tile_id", "shard")},
                "unit": np.asarray(members.column("unit")[i : i + 1], dtype=np.int32),
            },
            geometry=geometry,
            max_tile_bytes=max_tile_bytes,
        )
        for i in range(members.num_rows)
    ]
    parts = []
    for i, ref in enumerate(refs):
        try:
            parts.append(ray.get(ref))
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
            uri = members.column("uri")[i].as_py()
            log.error("%s: its decode killed its worker twice; recorded as an error row", uri)
            parts.append(_offender(members.slice(i, 1), geometry, type(err).__name__))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _objects(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table.column(column).to_pylist(), dtype=object)


def _offender(member: pa.Table, geometry: TileGeometry, death: str) -> dict[str, np.ndarray]:
    """decode_tiles' columns for a tile whose decoding killed its worker."""
    error = (
        f"decode: the worker decoding this tile died, twice ({death}); its unit failed "
        f"{ISOLATE_AFTER} times and was decoded tile by tile"
    )
    return {
        "uri": _objects(member, "uri"),
        "tile_id": _objects(member, "tile_id"),
        "unit": np.asarray(member.column("unit"), dtype=np.int32),
        "image": np.zeros((1, *geometry.eval_hw, 3), dtype=np.uint8),
        "error": np.asarray([error], dtype=object),
    }
