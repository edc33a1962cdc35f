"""The scoring job's tables, ``predictions/``, ``attributions/`` and ``features/``, made from
its journal of unit files in few large files, committed by an atomic manifest.

**Tables, one key.** ``predictions/`` holds one narrow row per input tile (its ids,
the listing's own columns, a probability per class of the model, the call, the threshold
applied, the model, the error); ``attributions/`` one row per tile that has a map (tile
id, method, class explained, the map, its scale, the overlay), only when a method was
asked for; ``features/`` (``--features``) one row per scored tile: its embedding, the input
of the model's classification head. ``tile_id`` joins them: every scored tile has exactly
one map and one embedding, an error row neither.

**Journal, then compaction.** The model actors write one file per work unit (a few
hundred tiles, both tables' columns) into ``_units/``, in one piece (breakhis.score.output:
temp + rename locally, one PUT on S3): that is what makes a killed job resumable and a
retried task harmless. Files that small are what engines read badly (a request and a
footer each: ~3,900 files a million tiles at 256 tiles a unit), and units any larger
would lose more work to a kill and hold more memory per actor. So once every unit is
there, Ray tasks rewrite them, in plan order, into large files: ``predictions/`` of
``file_rows`` rows (default 250,000: 4 files a million tiles), ``attributions/`` of about
``map_file_mb`` MB of maps (default 128), ``features/`` of about ``feature_file_mb`` MB of
embeddings (default 128). Each file is written in one piece too, under a
name carrying this run's token (``part-NNNNN-<token>.parquet``), so a run killed half-way
through compaction leaves whole files of its own that no later manifest names. Then the
job checks the new files (one row per planned tile, every row of its model) and writes
``_manifest.json`` in one piece: the commit point, naming the final files and the units
each holds. Only then are files the manifest does not name deleted, and the journal.
``_SUCCESS`` comes last, as before; a rerun deletes it first.

A rerun takes each planned unit from the journal or, when the manifest names it, from the
final file holding it (at the row offset the manifest gives): an input that grew scores
only its new units. A rerun whose plan is the manifest's does no compaction at all.

Readers: the folders once ``_SUCCESS`` is there (then they hold exactly the manifest's
files), or the files ``_manifest.json`` names at any time after it was written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from breakhis import faults, storage
from breakhis.data.inputs import INPUT_SCHEMA

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
ATTRIBUTIONS = "attributions"
FEATURES = "features"
TABLES = (PREDICTIONS, ATTRIBUTIONS, FEATURES)
JOURNAL = "_units"
MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 1

FACTS = ("tile_id", "uri", "file_name", "patient_id", "magnification", "subtype", "label")
"""The tile's own columns, from the listing (INPUT_SCHEMA less ``shard``), first in
``predictions/``."""
SCORE_COLUMNS = (
    "predicted_label",
    "predicted_class",
    "predicted_subtype",
    "threshold",
    "model_id",
    "model_version",
    "error",
)
"""``predictions/`` columns after the probabilities (``predicted_subtype``: a subtype model only)."""
MAP_COLUMNS = ("method", "target", "map", "scale", "overlay_uri")
"""``attributions/`` columns after ``tile_id``."""
FEATURE_COLUMNS = ("embedding",)
"""``features/`` columns after ``tile_id``."""
PROB_PREFIX = "prob_"


def prob_column(class_name: str) -> str:
    """The probability column of a class: ``prob_<class name>``."""
    return f"{PROB_PREFIX}{class_name}"


def reserved_columns() -> tuple[str, ...]:
    """Column names a listing may not bring (both tables' own, and the internal ones)."""
    names = [*INPUT_SCHEMA.names, *FACTS, *SCORE_COLUMNS, *MAP_COLUMNS, *FEATURE_COLUMNS]
    return tuple(dict.fromkeys(names))


def check_user_columns(source: str, user: pa.Schema) -> None:
    """Raise ValueError, in one line naming it, for a listing column whose name is one of
    ours (``reserved_columns`` or any ``prob_*``)."""
    reserved = reserved_columns()
    for name in user.names:
        if name in reserved or name.startswith(PROB_PREFIX):
            raise ValueError(
                f"{source}: column {name!r} clashes with a column the scoring job writes; "
                f"reserved: {', '.join(reserved)} and every {PROB_PREFIX}* name; rename it"
            )


def user_schema(listing_schema: pa.Schema) -> pa.Schema:
    """A listing's own columns (beyond INPUT_SCHEMA), in its order."""
    return pa.schema([f for f in listing_schema if f.name not in INPUT_SCHEMA.names])


def is_subtype(class_names: Sequence[str]) -> bool:
    """Whether rows of these classes are a subtype model's (``--task subtype``): no
    ``malignant`` class of their own, so P(malignant) (the sum of the malignant four) and the
    likeliest subtype get columns of their own."""
    return "malignant" not in class_names


def predictions_schema(class_names: Sequence[str], user: pa.Schema) -> pa.Schema:
    """``predictions/``: the tile's facts, the listing's columns, ``prob_<class>`` (float32)
    per class of the model in its order (a subtype model: then ``prob_malignant``, their
    malignant sum), then SCORE_COLUMNS (docs/scoring.md), ``predicted_subtype`` only for a
    subtype model. ``predicted_label``/``predicted_class`` are the benign/malignant call
    (``prob_malignant >= threshold``) for either task."""
    facts = [INPUT_SCHEMA.field(name) for name in FACTS]
    subtype = is_subtype(class_names)
    return pa.schema(
        [
            *facts,
            *user,
            *[(prob_column(c), pa.float32()) for c in class_names],
            *([(prob_column("malignant"), pa.float32())] if subtype else []),
            ("predicted_label", pa.int8()),
            ("predicted_class", pa.string()),
            *([("predicted_subtype", pa.string())] if subtype else []),
            ("threshold", pa.float32()),
            ("model_id", pa.string()),
            ("model_version", pa.int16()),
            ("error", pa.string()),
        ]
    )


def attributions_schema(map_size: int) -> pa.Schema:
    """``attributions/``: tile_id, method, target (the class explained, an index into the
    model's class names), map (``fixed_size_list<float32>[S*S]``, row-major, in [-1, 1]),
    scale (float32: raw map = map x scale), overlay_uri."""
    return pa.schema(
        [
            ("tile_id", pa.string()),
            ("method", pa.string()),
            ("target", pa.int8()),
            ("map", pa.list_(pa.float32(), map_size * map_size)),
            ("scale", pa.float32()),
            ("overlay_uri", pa.string()),
        ]
    )


def features_schema(dim: int) -> pa.Schema:
    """``features/``: tile_id and embedding (``fixed_size_list<float32>[D]``, the input of the
    model's classification head)."""
    return pa.schema([("tile_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def journal_schema(
    class_names: Sequence[str],
    user: pa.Schema,
    map_size: int | None,
    feature_dim: int | None = None,
) -> pa.Schema:
    """A unit file of ``_units/``: the predictions' columns, then (``map_size`` given) the
    attributions' (a row without a map: null method, zeros), then (``feature_dim`` given)
    the embedding (null for an error row)."""
    fields = list(predictions_schema(class_names, user))
    if map_size is not None:
        fields += [f for f in attributions_schema(map_size) if f.name != "tile_id"]
    if feature_dim is not None:
        fields += [f for f in features_schema(feature_dim) if f.name != "tile_id"]
    return pa.schema(fields)


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Piece:
    """Where one unit's rows of one table are: a journal file (offset -1) or a final file."""

    unit: str
    uri: str
    offset: int
    rows: int  # -1: unknown (a journal file's maps)


def read_manifest(out: str) -> dict | None:
    """The output's ``_manifest.json`` when it is there and all the files it names are
    (else None: its units are not a source)."""
    uri = storage.join(out, MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = json.loads(storage.read_bytes(uri))
    for table in TABLES:
        for entry in manifest.get(table, []):
            if not storage.exists(storage.join(out, table, entry["file"])):
                log.warning("%s names %s/%s, which is gone", uri, table, entry["file"])
                return None
    return manifest


def manifest_pieces(out: str, manifest: dict | None, table: str) -> dict[str, Piece]:
    """unit -> its Piece in the manifest's files of ``table``."""
    pieces: dict[str, Piece] = {}
    for entry in (manifest or {}).get(table, []):
        offset = 0
        uri = storage.join(out, table, entry["file"])
        for unit, rows in entry["units"]:
            pieces[unit] = Piece(unit, uri, offset, rows)
            offset += rows
    return pieces


def manifest_units(manifest: dict | None) -> set[str]:
    """The units whose rows the manifest's files hold."""
    return set((manifest or {}).get("units", []))


# --------------------------------------------------------------------------- compaction


@dataclass(frozen=True)
class TableSpec:
    """What one table's compaction tasks write."""

    table: str  # one of TABLES
    schema: pa.Schema  # with the file metadata
    row_group_rows: int
    file_rows: int
    """Planned rows per file (a file closes at the unit that reaches it)."""
    where: tuple[str, bool] | None = None
    """Which journal rows the table holds: those whose column is valid (``("method",
    True)``: the tiles with a map) or null (``("error", False)``: the scored tiles); None:
    every row."""


def rows_per_file(row_bytes: int, file_mb: int) -> int:
    """Rows of ``row_bytes`` (uncompressed) that make a file of about ``file_mb`` MB."""
    return max(1, file_mb * 2**20 // row_bytes)


def compact(
    out: str,
    names: Sequence[str],
    rows: Sequence[int],
    manifest: dict | None,
    *,
    token: str,
    specs: Sequence[TableSpec],
) -> dict:
    """Rewrite the planned units (``names``, ``rows``: plan order) from the journal or the
    old ``manifest``'s files into large files of each table of ``specs`` (module docstring),
    in Ray tasks. Returns the new manifest (not yet written: ``write_manifest``)."""
    import ray

    from breakhis.raysession import ensure_ray
    from breakhis.score.predict import DECODE_CPUS, RETRIES

    ensure_ray()
    task = ray.remote(num_cpus=DECODE_CPUS, max_retries=RETRIES)(write_table_file)
    refs = {}
    for spec in specs:
        old = manifest_pieces(out, manifest, spec.table)
        pieces = [
            old.get(name) or Piece(name, storage.join(out, JOURNAL, name), -1, count)
            for name, count in zip(names, rows, strict=True)
        ]
        groups = _groups(pieces, names, rows, spec.file_rows)
        refs[spec.table] = [
            task.remote(group, spec, storage.join(out, spec.table, _file_name(i, token)), token)
            for i, group in enumerate(groups)
        ]
    new = {"format": MANIFEST_FORMAT, "token": token, "units": list(names)}
    for table, table_refs in refs.items():
        entries = []
        for i, units in enumerate(ray.get(table_refs)):
            entries.append(
                {
                    "file": _file_name(i, token),
                    "rows": sum(r for _, r in units),
                    "units": [list(u) for u in units],
                }
            )
        new[table] = entries
        log.info("%s: %d file(s)", table, len(entries))
    return new


def _file_name(index: int, token: str) -> str:
    return f"part-{index:05d}-{token[:12]}.parquet"


def _groups(pieces: list[Piece], names, rows, limit: int) -> list[list[Piece]]:
    """Consecutive units, a group closed once it holds ``limit`` planned rows or more."""
    groups: list[list[Piece]] = [[]]
    held = 0
    for piece, count in zip(pieces, rows, strict=True):
        if held >= limit:
            groups.append([])
            held = 0
        groups[-1].append(piece)
        held += count
    return [g for g in groups if g]


def write_table_file(
    pieces: list[Piece], spec: TableSpec, uri: str, token: str
) -> list[tuple[str, int]]:
    """Ray task: write the rows of ``pieces`` (in order) as one file of ``spec`` at ``uri``,
    in one piece (locally a temp file, fsynced, then renamed; on S3 one PUT). Returns
    (unit, rows written) per piece."""
    name = uri.rsplit("/", 1)[-1]
    faults.before("compact", [f"{spec.table}-{name.split('-')[1]}"])
    fs, path = storage.resolve(uri)
    local = not isinstance(fs, pafs.S3FileSystem)
    if local:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{token}.tmp")
        sink = pa.OSFile(tmp, "wb")
    else:
        sink = io.BytesIO()
    written: list[tuple[str, int]] = []
    cache: dict[str, pa.Table] = {}
    buffered: list[pa.Table] = []
    held = 0
    with pq.ParquetWriter(sink, spec.schema, compression="zstd") as writer:
        for piece in pieces:
            part = _read_piece(piece, spec, cache)
            written.append((piece.unit, part.num_rows))
            buffered.append(part)
            held += part.num_rows
            if held >= spec.row_group_rows:
                writer.write_table(pa.concat_tables(buffered), row_group_size=spec.row_group_rows)
                buffered, held = [], 0
        if buffered or not written:
            table = pa.concat_tables(buffered) if buffered else spec.schema.empty_table()
            writer.write_table(table, row_group_size=spec.row_group_rows)
    if local:
        sink.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        storage.write_bytes(uri, sink.getvalue())
    return written


def _read_piece(piece: Piece, spec: TableSpec, cache: dict[str, pa.Table]) -> pa.Table:
    """One unit's rows of ``spec.table``, cast to its schema."""
    columns = spec.schema.names
    fs, path = storage.resolve(piece.uri)
    if piece.offset >= 0:  # a final file of an earlier manifest
        if piece.uri not in cache:
            cache.clear()  # pieces come in order: one file at a time
            cache[piece.uri] = pq.read_table(path, filesystem=fs)
        part = cache[piece.uri].slice(piece.offset, piece.rows)
    elif spec.where is None:
        part = pq.read_table(path, filesystem=fs, columns=columns)
    else:
        column, valid = spec.where
        part = pq.read_table(path, filesystem=fs, columns=list(dict.fromkeys([*columns, column])))
        part = part.filter(pc.is_valid(part[column]) if valid else pc.is_null(part[column]))
    return part.select(columns).cast(spec.schema.remove_metadata())


def write_manifest(out: str, manifest: dict) -> None:
    """Write ``_manifest.json`` in one piece: the commit point of the final files."""
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest).encode())


def prune(out: str, manifest: dict) -> int:
    """Delete the files of the tables (TABLES) the manifest does not name
    (an earlier run's, or a killed compaction's) and every unit file of the journal (their
    rows are in the manifest's files now); temp files only when stale. Returns the number
    of final files deleted."""
    from breakhis.score.output import STALE_TEMP_S, unit_files

    deleted = 0
    for table in TABLES:
        keep = {entry["file"] for entry in manifest.get(table, [])}
        folder = storage.join(out, table)
        if not storage.exists(folder):
            continue
        fs, path = storage.resolve(folder)
        now = time.time()
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            name = info.base_name
            if name.endswith(".tmp"):
                age = now - (info.mtime.timestamp() if info.mtime else 0.0)
                if age > STALE_TEMP_S:
                    storage.delete(storage.to_uri(fs, info.path))
            elif name not in keep and info.type == pafs.FileType.File:
                storage.delete(storage.to_uri(fs, info.path))
                deleted += 1
    journal = storage.join(out, JOURNAL)
    for name in unit_files(journal):
        storage.delete(storage.join(journal, name))
    if not storage.is_s3(out):
        with contextlib.suppress(OSError):  # a recent temp file is kept there, or no folder
            os.rmdir(storage.resolve(journal)[1])
    return deleted


def manifest_files(out: str, manifest: dict, table: str) -> list[str]:
    """The URIs of the manifest's files of ``table``."""
    return [storage.join(out, table, entry["file"]) for entry in manifest.get(table, [])]


def count_rows(manifest: dict, table: str) -> int:
    """Rows the manifest's files of ``table`` hold."""
    return int(np.sum([entry["rows"] for entry in manifest.get(table, [])] or [0]))
