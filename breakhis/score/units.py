"""Work units of the scoring job: planned by the driver, decoded, scored and written by
the workers.

The driver streams the sorted listing (breakhis.data.inputs.list_inputs) into units of
``unit_size`` consecutive tiles, named ``unit-NNNNN-<sha256 of the member URIs, 12 hex>``,
and writes the members of the units still missing to a plan under the output
(``_plan/<job token>/part-NNNNN.parquet``, one row group per unit, UNITS_PER_PART units a
file). What it keeps per unit is its name and row count; per tile, nothing.

The Ray Data pipeline's source holds one small row per pending unit (index, name, plan
part, row group, rows), one block each. ``decode_tiles_of_units`` (CPU tasks) reads a
unit's members from the plan and decodes them all: one block per unit (the dataset's
block splitting is off, so no block is ever cut). ``UnitTilePredictor`` (the model
actors, ``batch_size=None``: a batch is a block) checks that its batch holds every tile
of each of its units (RuntimeError otherwise: a unit is never written from part of its
rows), runs the model ``batch_size`` tiles at a time, builds the unit's table (both
tables' columns: breakhis.score.tables.journal_schema), writes it into the journal
(breakhis.score.output.write_unit: temp + rename locally, one PUT on S3) and returns
one summary row per unit (index, name, rows, errors) to the driver: never the maps.

A unit file is written by whichever attempt of its task finishes (a retried task after
a lost node writes the same rows again, under the same name), so each unit exists once.

Faults are bounded: a decode task is retried at most breakhis.score.predict.RETRIES times (its
worker died, or a transient storage error outlasted the read's own retries: never an error
row), its last attempt decoding tile by tile (breakhis.score.isolate), so one poison tile
becomes an error row; a model actor is restarted, and each of its tasks retried, at most as
often. Past that the pipeline fails, and so does the job: a rerun scores what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.data.geometry import TileGeometry
from breakhis.data.inputs import INPUT_SCHEMA, Listing
from breakhis.names import CLASS_NAMES
from breakhis.score.isolate import ISOLATE_AFTER, decode_alone, register_attempt
from breakhis.score.output import write_unit
from breakhis.score.tables import FACTS, is_subtype, journal_schema, prob_column

log = logging.getLogger(__name__)

UNITS_PER_PART = 64
"""Units per plan file."""


def unit_name(index: int, uris: list[str], user: pa.Table | None = None) -> str:
    """``unit-NNNNN-<12 hex of the SHA-256 of the member URIs>.parquet``; with a listing's
    own columns (``user``), of their names and values too, so that a listing whose columns
    changed gives new units (their rows would be stale)."""
    digest = hashlib.sha256()
    for uri in uris:
        digest.update(uri.encode())
        digest.update(b"\n")
    if user is not None and user.num_columns:
        digest.update(json.dumps(user.column_names).encode())
        for row in user.to_pylist():
            digest.update(json.dumps(list(row.values()), default=str).encode())
            digest.update(b"\n")
    return f"unit-{index:05d}-{digest.hexdigest()[:12]}.parquet"


@dataclass(frozen=True)
class Unit:
    """One work unit: consecutive tiles of the sorted listing, written as one file."""

    index: int
    members: pa.Table  # inputs.INPUT_SCHEMA rows (and a listing's own columns), by uri

    @property
    def name(self) -> str:
        return _member_name(self.index, self.members)


def _member_name(index: int, members: pa.Table) -> str:
    user = [c for c in members.column_names if c not in INPUT_SCHEMA.names]
    return unit_name(index, members.column("uri").to_pylist(), members.select(user))


def plan_units(inputs: pa.Table, unit_size: int) -> list[Unit]:
    """Cut an in-memory (uri-sorted) listing into units of ``unit_size`` tiles, the last one
    shorter: the units ``write_plan`` streams."""
    table = inputs.sort_by("uri")
    return [
        Unit(i, table.slice(start, unit_size))
        for i, start in enumerate(range(0, table.num_rows, unit_size))
    ]


PENDING_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("name", pa.string()),
        ("part", pa.string()),
        ("group", pa.int32()),
        ("unit_rows", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Plan:
    """Every unit of the input (names and sizes) and the members of the missing ones."""

    names: list[str]
    rows: list[int]
    pending: pa.Table  # PENDING_SCHEMA, one row per unit to score
    parts: list[str]  # the plan files

    @property
    def pending_tiles(self) -> int:
        return int(pa.compute.sum(self.pending["unit_rows"]).as_py() or 0)


def write_plan(listing: Listing, unit_size: int, existing: set[str], folder: str) -> Plan:
    """Stream ``listing`` into units; write the members of those not in ``existing`` to
    plan files under ``folder``. Returns the Plan."""
    names: list[str] = []
    rows: list[int] = []
    pending: list[dict] = []
    writer = _PartWriter(folder, listing.schema)
    carry = listing.schema.empty_table()
    for page in listing.pages():
        carry = pa.concat_tables([carry, page]) if carry.num_rows else page
        while carry.num_rows >= unit_size:
            _plan_unit(carry.slice(0, unit_size), names, rows, pending, existing, writer)
            carry = carry.slice(unit_size)
    if carry.num_rows:
        _plan_unit(carry, names, rows, pending, existing, writer)
    writer.close()
    return Plan(names, rows, pa.Table.from_pylist(pending, schema=PENDING_SCHEMA), writer.parts)


def _plan_unit(members, names, rows, pending, existing, writer) -> None:
    index = len(names)
    name = _member_name(index, members)
    names.append(name)
    rows.append(members.num_rows)
    if name not in existing:
        part, group = writer.add(members)
        pending.append(
            {"unit": index, "name": name, "part": part, "group": group, "unit_rows": len(members)}
        )


class _PartWriter:
    """Plan files of UNITS_PER_PART units, one row group per unit."""

    def __init__(self, folder: str, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self.parts: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._stream = None
        self._groups = 0

    def add(self, members: pa.Table) -> tuple[str, int]:
        if self._writer is None or self._groups == UNITS_PER_PART:
            self.close()
            uri = storage.join(self.folder, f"part-{len(self.parts):05d}.parquet")
            fs, path = storage.resolve(uri)
            storage.make_dirs(self.folder)
            self._stream = fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._stream, self.schema)
            self.parts.append(uri)
            self._groups = 0
        self._writer.write_table(members.cast(self.schema), row_group_size=len(members))
        self._groups += 1
        return self.parts[-1], self._groups - 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = None


def read_members(part: str, group: int) -> pa.Table:
    """The members (INPUT_SCHEMA) of the unit in row group ``group`` of plan file ``part``."""
    fs, path = storage.resolve(part)
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).read_row_group(group)


# --------------------------------------------------------------------------- workers


def decode_tiles_of_units(
    batch: dict[str, np.ndarray], *, geometry: TileGeometry, max_tile_bytes: int, plan_folder: str
) -> dict:
    """Ray Data map_batches function: read and decode every tile of the batch's units
    (PENDING_SCHEMA rows); a unit whose decoding failed ISOLATE_AFTER times before is
    decoded tile by tile (breakhis.score.isolate). Returns tile_decode.decode_tiles' columns for
    all their tiles plus ``name``, ``part``, ``group`` and ``unit_rows`` of each tile's unit."""
    from breakhis.data.tile_decode import decode_tiles

    outs = []
    for i in range(len(batch["unit"])):
        members = read_members(str(batch["part"][i]), int(batch["group"][i]))
        count, name = members.num_rows, str(batch["name"][i])
        members = members.append_column("unit", pa.array(np.full(count, batch["unit"][i])))
        if register_attempt(plan_folder, name) >= ISOLATE_AFTER:
            decoded = decode_alone(
                members, geometry=geometry, max_tile_bytes=max_tile_bytes, unit=name
            )
        else:
            decoded = decode_tiles(
                {c: _column(members, c) for c in ("uri", "tile_id", "shard", "unit")},
                geometry=geometry,
                max_tile_bytes=max_tile_bytes,
            )
        for column in ("name", "part", "group", "unit_rows"):
            decoded[column] = np.repeat(batch[column][i : i + 1], count)
        outs.append(decoded)
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}


def _column(table: pa.Table, name: str) -> np.ndarray:
    if name == "unit":
        return np.asarray(table.column(name), dtype=np.int32)
    return np.asarray(table.column(name).to_pylist(), dtype=object)


@dataclass(frozen=True)
class UnitFormat:
    """What a unit file records besides the scores (the job's model and options)."""

    tiles_uri: str
    """The folder of the unit files (the journal, breakhis.score.tables.JOURNAL)."""
    token: str
    model: str
    model_id: str
    model_version: int
    method: str | None
    map_size: int
    threshold: float
    tta: bool
    image_size: int
    geometry: TileGeometry | None = None
    """The model's input geometry (its card's ``tile_geometry``); None: the whole tile
    squashed to image_size."""
    class_names: tuple[str, ...] = CLASS_NAMES
    """The classes of the rows, one ``prob_<class>`` each: the model's (the card's order), or
    benign/malignant for a subtype model scored with ``--task binary``."""
    feature_dim: int | None = None
    """Length of a tile's embedding (``--features``); None: no embeddings."""

    @property
    def input_geometry(self) -> TileGeometry:
        return self.geometry or TileGeometry(size=self.image_size, geometry="square")


class UnitTilePredictor:
    """Ray Data callable class (the model actors): whole units in, unit files written,
    one summary row per unit out (module docstring)."""

    def __init__(self, *, unit_format: UnitFormat, batch_size: int, **predictor) -> None:
        from breakhis.score.predict import TilePredictor

        self.predictor = TilePredictor(**predictor)
        if self.predictor.model_id != unit_format.model_id:
            raise RuntimeError(
                f"{unit_format.model}: this actor loaded weights {self.predictor.model_id}, "
                f"the job checked {unit_format.model_id}; refusing to score with them"
            )
        # Rows carry the id of the weights this actor holds, so the check before _SUCCESS
        # (every row of the job's model) tests what was loaded, not a constant.
        self.format = replace(unit_format, model_id=self.predictor.model_id)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices, starts, counts = np.unique(batch["unit"], return_index=True, return_counts=True)
        summary: dict[str, list] = {"unit": [], "name": [], "rows": [], "errors": []}
        for index, start, count in zip(indices, starts, counts, strict=True):
            expected = int(batch["unit_rows"][start])
            name = str(batch["name"][start])
            if count != expected:
                raise RuntimeError(
                    f"{name}: a batch holds {count} of the unit's {expected} tiles; a unit "
                    "is written only from all of them (Ray Data cut the unit's block)"
                )
            rows = np.flatnonzero(batch["unit"] == index)
            scores = self._predict({k: batch[k][rows] for k in _PREDICTOR_INPUT})
            members = read_members(str(batch["part"][start]), int(batch["group"][start]))
            table = unit_table(self.format, name, members, scores)
            uri = storage.join(self.format.tiles_uri, name)
            write_unit(uri, parquet_bytes(table), self.format.token)
            summary["unit"].append(int(index))
            summary["name"].append(name)
            summary["rows"].append(int(count))
            summary["errors"].append(int(count - table["error"].null_count))
        return {k: np.asarray(v) for k, v in summary.items()}

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The predictor over ``batch`` in model calls of ``batch_size`` tiles."""
        count = len(batch["uri"])
        parts = [
            self.predictor({k: v[start : start + self.batch_size] for k, v in batch.items()})
            for start in range(0, count, self.batch_size)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


_PREDICTOR_INPUT = ("uri", "tile_id", "unit", "image", "error")


def unit_table(fmt: UnitFormat, name: str, members: pa.Table, scores: dict) -> pa.Table:
    """One unit's journal rows (breakhis.score.tables.journal_schema): the members' facts
    and own columns joined with their scores, sorted by uri."""
    order = np.argsort(scores["uri"].astype(str), kind="stable")
    scores = {k: v[order] for k, v in scores.items()}
    if scores["uri"].tolist() != members.column("uri").to_pylist():
        raise RuntimeError(f"{name}: scored tiles differ from the unit's members")
    error = scores["error"].astype(str)
    bad = error != ""
    count = members.num_rows
    classes = list(fmt.class_names)
    malignant = scores["prob"].astype(np.float32)  # P(malignant): the call's probability
    probs = scores["class_probs"].astype(np.float32).reshape(count, -1)
    if probs.shape[1] != len(classes):  # a subtype model scored as binary: its two sums
        probs = np.stack([1.0 - malignant, malignant], axis=1)
    predicted = (malignant >= fmt.threshold).astype(np.int8)  # NaN (an error): benign, masked
    user = [c for c in members.column_names if c not in INPUT_SCHEMA.names]
    columns = {
        **{column: members.column(column) for column in FACTS},
        **{column: members.column(column) for column in user},
        **{
            prob_column(c): pa.array(probs[:, i], pa.float32(), mask=bad)
            for i, c in enumerate(classes)
        },
        "predicted_label": pa.array(predicted, pa.int8(), mask=bad),
        "predicted_class": pa.array([CLASS_NAMES[c] for c in predicted], pa.string(), mask=bad),
        "threshold": pa.array([fmt.threshold] * count, pa.float32(), mask=bad),
        "model_id": pa.array([fmt.model_id] * count, pa.string()),
        "model_version": pa.array([fmt.model_version] * count, pa.int16()),
        "error": pa.array(error, pa.string(), mask=~bad),
    }
    if is_subtype(classes):  # the call's probability and the likeliest of the eight
        best = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
        columns[prob_column("malignant")] = pa.array(malignant, pa.float32(), mask=bad)
        names = [classes[i] for i in best]
        columns["predicted_subtype"] = pa.array(names, pa.string(), mask=bad)
    if fmt.method is not None:
        has_map = (scores["target"] >= 0) & ~bad
        flat = pa.array(scores["map"].reshape(-1).astype(np.float32), pa.float32())
        columns |= {
            "method": pa.array([fmt.method] * count, pa.string(), mask=~has_map),
            "target": pa.array(scores["target"], pa.int8(), mask=~has_map),
            "map": pa.FixedSizeListArray.from_arrays(flat, fmt.map_size**2),
            "scale": pa.array(scores["scale"], pa.float32(), mask=~has_map),
            "overlay_uri": pa.array(
                scores["overlay"].astype(str), pa.string(), mask=scores["overlay"] == ""
            ),
        }
    if fmt.feature_dim is not None:
        flat = pa.array(scores["embedding"].reshape(-1).astype(np.float32), pa.float32())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, fmt.feature_dim)
    schema = journal_schema(
        classes,
        members.select(user).schema,
        fmt.map_size if fmt.method else None,
        fmt.feature_dim,
    )
    return pa.table(columns, schema=schema.with_metadata(table_metadata(fmt)))


def table_metadata(fmt: UnitFormat) -> dict[str, str]:
    """The Parquet metadata of the output's files: the model and the options."""
    return {
        "breakhis.score": json.dumps(
            {
                "model": fmt.model,
                "model_id": fmt.model_id,
                "class_names": list(fmt.class_names),
                "attribution": {
                    "method": fmt.method,
                    "shape": [fmt.map_size] * 2,
                    "dtype": "float32",
                    "covers": "the whole tile, row-major, top row first",
                    "values": "map / scale, in [-1, 1]",
                },
                **(
                    {
                        "features": {
                            "dim": fmt.feature_dim,
                            "dtype": "float32",
                            "layer": "the input of the model's classification head",
                        }
                    }
                    if fmt.feature_dim is not None
                    else {}
                ),
                "tta": fmt.tta,
                "threshold": fmt.threshold,
                "image_size": fmt.image_size,
                **(
                    {"class_names": list(fmt.class_names)}
                    if tuple(fmt.class_names) != CLASS_NAMES
                    else {}
                ),
            }
        )
    }


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def units_dataset(
    pending: pa.Table,
    *,
    fmt: UnitFormat,
    model_uri: str,
    artifact,
    options,
    overlay_root: str | None,
    object_store_limit: int,
    plan_folder: str,
):
    """The lazy Ray Data pipeline over the ``pending`` units (module docstring): each output
    row is one written unit's summary (unit, name, rows, errors). ``artifact`` is the model
    the actors load (a Ray ObjectRef of a breakhis.model.artifact.Artifact), ``options`` the
    job's breakhis.score.predict.PredictOptions with the threshold applied, ``plan_folder`` the
    job's plan (where decode attempts are counted: breakhis.score.isolate)."""
    import ray

    from breakhis.score.predict import actor_plan, decode_stage, model_stage, predictor_kwargs

    max_actors, gpus_per_actor, device = actor_plan(
        options.device, options.num_actors, options.cpus_per_actor
    )
    log.info("scoring %d units with up to %d %s actor(s)", pending.num_rows, max_actors, device)
    ds = ray.data.from_arrow([pending.slice(i, 1) for i in range(pending.num_rows)])
    context = ds.context  # a per-dataset copy: nothing leaks into other datasets
    context.target_max_block_size = None  # one block per unit, never cut
    context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=object_store_limit
    )
    # The last decode attempt of a unit decodes it tile by tile (ISOLATE_AFTER).
    ds = decode_stage(
        ds,
        decode_tiles_of_units,
        {
            "geometry": fmt.input_geometry,
            "max_tile_bytes": options.max_tile_bytes,
            "plan_folder": plan_folder,
        },
        batch_size=None,
    )
    kwargs = predictor_kwargs(model_uri, fmt.threshold, device, options, overlay_root, artifact)
    kwargs["features"] = fmt.feature_dim is not None
    return model_stage(
        ds,
        UnitTilePredictor,
        {"unit_format": fmt, "batch_size": options.batch_size, **kwargs},
        max_actors=max_actors,
        cpus_per_actor=options.cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        batch_size=None,
        calls_per_actor=options.calls_per_actor,
    )
