"""Fitting a training run's stain normaliser on the driver, before any worker starts
(breakhis.train.job): on ``--stain-reference`` when given, else on the run's first training tile
by tile id. The reference is seen as a tile of the run: resized to the run's canonical tile
(breakhis.data.geometry) first, so the normaliser is fitted at the resolution it is applied at."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.data.geometry import TileGeometry
from breakhis.data.imaging import decode_rgb
from breakhis.data.stain import StainNormalizer, fit_stain, read_reference

log = logging.getLogger(__name__)


def first_training_tile(
    manifest: pa.Table, patients: frozenset[str], magnification: int | None
) -> str:
    """The tile id of the default reference: the smallest tile id among the training
    patients' tiles (at ``magnification``). Raises ValueError when there is none."""
    mask = pc.is_in(manifest.column("patient_id"), pa.array(sorted(patients), pa.string()))
    if magnification is not None:
        mask = pc.and_(mask, pc.equal(manifest.column("magnification"), magnification))
    ids = manifest.filter(mask).column("tile_id")
    if len(ids) == 0:
        raise ValueError("--stain-norm: the training patients have no tile to fit it on")
    return str(pc.min(ids).as_py())


def _tile_png(dest: PreparedDest, tile_id: str) -> tuple[str, bytes]:
    """(uri, PNG bytes) of ``tile_id`` from DEST's shards. Raises ValueError when no shard
    holds it."""
    for uri in dest.shard_uris:
        fs, path = storage.resolve(uri)
        table = pq.read_table(
            path, filesystem=fs, columns=["uri", "png"], filters=[("tile_id", "==", tile_id)]
        )
        if table.num_rows:
            return str(table.column("uri")[0].as_py()), table.column("png")[0].as_py()
    raise ValueError(f"--stain-norm: tile {tile_id} of the manifest is in no shard of {dest.uri}")


def fit_run_stain(
    config: Any, dest: PreparedDest | None, train_patients: frozenset[str]
) -> StainNormalizer | None:
    """The run's stain normaliser (``config`` a TrainConfig), or None for ``--stain-norm
    none``; ``dest`` (the run's opened DEST) holds the default reference tile, unused with
    ``--stain-reference``. Raises ValueError (one line, naming the reference) for a reference that cannot
    be read, decoded or fitted."""
    if config.stain_norm == "none":
        return None
    plain = TileGeometry(size=config.image_size, geometry=config.geometry, view=config.eval_view)
    if config.stain_reference:
        images = read_reference(config.stain_reference)
        described = config.stain_reference
    else:
        tile_id = first_training_tile(dest.manifest, train_patients, config.magnification)
        images = [_tile_png(dest, tile_id)]
        described = f"{images[0][0]} (the first training tile by tile id)"
    pixels = []
    for uri, data in images:
        try:
            pixels.append(plain.canonical(decode_rgb(data)))
        except ValueError as err:
            raise ValueError(f"--stain-reference {uri}: not an image ({err})") from err
    stain = fit_stain(config.stain_norm, pixels, reference=described)
    log.info("stain normalisation %s fitted on %s", config.stain_norm, described)
    return stain
