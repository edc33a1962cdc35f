"""Reading a prepared DEST's tiles as a Ray Dataset: PNG shards decoded in the read
(``decode_tiles``), or the pixels ``prepare --pixels S`` stored (``stored_tiles``), with
the ledger that counts decodes across every process. breakhis.data.ingest builds training
and evaluation datasets on top of ``read_tiles``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from ray.data import DataContext, Dataset, FileShuffleConfig
from ray.data.expressions import col

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.data.geometry import TileGeometry
from breakhis.data.ingest_config import IngestConfig
from breakhis.data.pixels import PIXEL_COLUMNS, images_of
from breakhis.data.transforms import EvalTransform
from breakhis.subtypes import subtype_indices

log = logging.getLogger(__name__)

# Shard columns the pipeline needs: everything but the PNG's bookkeeping.
_READ_COLUMNS = ["tile_id", "uri", "patient_id", "label", "magnification", "png"]
# Failures kept with their reason in the ledger; beyond this only counted.
_MAX_FAILURES_KEPT = 1000


@dataclass(frozen=True)
class DecodeStats:
    """What the decode step has done so far in this run, over all sides and epochs."""

    decoded: int
    failed: int
    failures: tuple[tuple[str, str], ...]  # (uri, reason), the first 1000


@ray.remote(num_cpus=0)
class DecodeLedger:
    """Counts decoded and failed tiles across every process of the pipeline."""

    def __init__(self) -> None:
        self._decoded = 0
        self._failed = 0
        self._failures: list[tuple[str, str]] = []

    def record(self, decoded: int, failures: list[tuple[str, str]]) -> None:
        self._decoded += decoded
        self._failed += len(failures)
        room = _MAX_FAILURES_KEPT - len(self._failures)
        self._failures.extend(failures[: max(room, 0)])

    def stats(self) -> DecodeStats:
        return DecodeStats(self._decoded, self._failed, tuple(self._failures))


def new_ledger() -> ray.actor.ActorHandle:
    """A DecodeLedger on this driver's node: it lives as long as the job does, and a worker
    node that dies does not take it along (decode tasks on every node report to it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=True)
    return DecodeLedger.options(scheduling_strategy=strategy).remote()


def decode_tiles(
    batch: pa.Table,
    *,
    geometry: TileGeometry,
    canonical: bool = False,
    ledger: ray.actor.ActorHandle | None = None,
) -> dict[str, np.ndarray]:
    """Decode a batch of shard rows into model-ready rows: the evaluation view of
    ``geometry``, or with ``canonical`` the canonical tile training crops from.

    Returns numpy columns ``image`` uint8 (n, 3, H, W), ``label`` int64,
    ``patient_id``, ``tile_id`` (str), ``magnification`` and ``subtype_class`` int64
    (breakhis.subtypes; -1 for a name that is not BreakHis's) for the rows
    that decode. A row that does not decode is logged with its URI, reported
    to ``ledger`` and left out; it never raises.
    """
    transform = EvalTransform(geometry=geometry, canonical=canonical)
    pngs = batch.column("png").to_pylist()
    uris = batch.column("uri").to_pylist()
    images = np.empty((len(pngs), *transform.shape), dtype=np.uint8)
    keep: list[int] = []
    failures: list[tuple[str, str]] = []
    for i, data in enumerate(pngs):
        try:
            images[len(keep)] = transform(data)
        except ValueError as err:
            log.warning("skipping tile %s: %s", uris[i], err)
            failures.append((uris[i], str(err)))
            continue
        keep.append(i)
    if ledger is not None:
        # Waited for, so counts are complete when the epoch that caused them ends.
        try:
            ray.get(ledger.record.remote(len(keep), failures))
        except ray.exceptions.RayActorError as err:
            # Counting is bookkeeping: a lost ledger (its node died) must not fail training.
            log.warning("decode ledger lost, decode counts are incomplete from here: %s", err)
    return _rows(batch.take(pa.array(keep, pa.int64())), images[: len(keep)])


def stored_tiles(
    batch: pa.Table, *, geometry: TileGeometry, canonical: bool = False
) -> dict[str, np.ndarray]:
    """Rows of stored pixel files (breakhis.data.pixels: canonical aspect-kept tiles) in the row
        contract of ``decode_tiles``: the same pixels a decode gives (stain-normalised as a decode
    normalises them), read, not decoded."""
    images = geometry.normalise_stain(images_of(batch.column("image"), geometry.size))
    return _rows(batch, images if canonical else np.ascontiguousarray(geometry.view_of(images)))


def _rows(rows: pa.Table, images: np.ndarray) -> dict[str, np.ndarray]:
    tile_ids = rows.column("tile_id").to_pylist()
    return {
        "image": images,
        "label": rows.column("label").to_numpy().astype(np.int64),
        "patient_id": np.asarray(rows.column("patient_id").to_pylist(), dtype=object),
        "tile_id": np.asarray(tile_ids, dtype=object),
        "magnification": rows.column("magnification").to_numpy().astype(np.int64),
        # The subtype class (breakhis.subtypes) from the tile's name, -1 for a name that is
        # not BreakHis's: what a --task subtype run learns and validates against.
        "subtype_class": subtype_indices(tile_ids),
    }


@contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Plan ``read_parquet`` with Ray Data's first Parquet datasource.

    The V2 datasource (default in Ray 2.60) starts a pool of 32 FooterReader
    actors for every execution, i.e. every epoch of a streaming dataset: 32
    Python processes to read a few footers, which on a small node costs tens of
    seconds per epoch. V1 reads the footers in the planning task and pushes the
    same filter and projection into the scan.
    """
    context = DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def read_tiles(
    dest: PreparedDest,
    patients: frozenset[str],
    config: IngestConfig,
    ledger: ray.actor.ActorHandle | None = None,
    *,
    shuffle_files: bool = False,
    pixel_files: list[str] | None = None,
    canonical: bool = False,
) -> Dataset:
    """The decoded tiles of ``patients`` (at ``config.magnification``), lazily: the
    evaluation view of ``config.geometry``, or with ``canonical`` the canonical tiles.

    ``shuffle_files`` reads the shards in a new seeded order each execution.
    ``pixel_files`` (from ``PreparedDest.pixel_files``) reads stored pixels of the
    configured size instead of decoding the PNG shards. Returns a Dataset with
    the row contract of the module docstring (not augmented). Raises
    FileNotFoundError when DEST has no shards.
    """
    uris = pixel_files or dest.shard_uris
    fs, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    shuffle = (
        FileShuffleConfig(seed=config.seed, reseed_after_execution=True) if shuffle_files else None
    )
    with _parquet_reader_v1():
        # One read task per shard, with the decode fused into it. Left to itself Ray
        # splits each file's output into blocks to reach 200 (read_op_min_num_blocks),
        # and a split read never fuses: the decode then ran as its own operator while
        # the streaming reads held CPUs, one decode at a time on 2 cores (read and
        # decode of 1,975 tiles: 24.5 s split, 17.1 s fused). Parallelism of the
        # decode is therefore the number of shards: prepare with a smaller
        # --shard-mb for a cluster with more CPUs than shards.
        ds = ray.data.read_parquet(
            paths, filesystem=fs, shuffle=shuffle, override_num_blocks=len(paths)
        )
    # Both predicates are pushed into the Parquet scan; row-group statistics skip
    # most of the other patients' bytes since shards are written in name order.
    predicate = col("patient_id").is_in(sorted(patients))
    if config.magnification is not None:
        predicate = predicate & (col("magnification") == config.magnification)
    if pixel_files:
        # Fused into the read as well: the conversion is a view of the Arrow buffer.
        return (
            ds.filter(expr=predicate)
            .select_columns([*PIXEL_COLUMNS, "image"])
            .map_batches(
                stored_tiles,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"geometry": config.tile_geometry, "canonical": canonical},
            )
        )
    return (
        ds.filter(expr=predicate)
        .select_columns(_READ_COLUMNS)
        .map_batches(
            decode_tiles,
            batch_format="pyarrow",
            # Whole read blocks (at most target_max_block_size, 128 MiB of PNG): a
            # batch size would stop Ray from fusing the decode into the read.
            batch_size=None,
            fn_kwargs={
                "geometry": config.tile_geometry,
                "canonical": canonical,
                "ledger": ledger,
            },
        )
    )
