"""Batch scoring job: a model artifact over any number of tiles, exactly once.

    ray job submit --working-dir . -- python jobs/score.py \\
        --model s3://bucket/runs/rn50/best --input s3://archive/tiles/ \\
        --output s3://bucket/scores/2026-11 --attribution gradcam
    breakhis score --model ./runs/smallcnn/best --input ./synthetic --output ./scores

Input (breakhis.inputs): a prefix of PNG/JPEG/TIFF tiles at any nesting, a
prepared DEST's shards, or a manifest listing URIs.

Pipeline (Ray Data, streaming): the input listing is cut into work units; the
units' member lists are the source blocks of breakhis.predict's pipeline (decode tasks,
then the model and its attribution maps in an actor pool). The driver collects each
unit's rows and writes the unit's file once every tile of it is back. Ray Data's
backpressure, under an object-store limit of ``max_buffer_mb`` for this dataset, bounds
what is in flight, so memory does not grow with the input; the driver keeps only the
input listing (a few strings per tile) and the rows of the units in flight (small: maps,
not pixels).

Exactly once, resumable. The listing is sorted, so the same input always gives
the same units: ``unit_size`` consecutive tiles, named
``unit-NNNNN-<sha256 of the member URIs, 12 hex>.parquet``. A unit's file is
written in one piece only after all its tiles are scored (temp file + rename
locally, one PUT on S3), so a reader never sees half a file and a file that
exists is complete. A rerun into the same output lists ``tiles/``, skips the
units whose file exists and scores the rest; units of an older listing (the
input changed) and temp files of a killed writer are deleted before the job
declares success. The finished output therefore has exactly one row per input
tile. (A tile rewritten in place under the same URI is not rescored: units are
named by URIs, not contents; score into a new output for that.) ``_job.json``
records the model and every option that changes the output; a rerun with
another model or such an option is refused, naming the differences. One job at
a time per output.

Output (``OUTPUT/``, local or ``s3://``):

- ``tiles/unit-*.parquet``: one row per input tile, ``tile_schema()`` (below), rows
  sorted by uri within a file; read the folder with pyarrow or pandas;
- ``patients.parquet``: one row per patient (= slide in BreakHis), when patient
  ids are known (BreakHis names), PATIENT_SCHEMA;
- ``overlays/<name>.png``: with ``--overlays``, the tile as the model saw it
  (``image_size`` px square) with its attribution map over it; ``<name>`` is the
  tile id when it is a plain file name, else a slug of it plus a hash
  (``storage.safe_name``): never a path, so no tile id writes outside OUTPUT. The
  ``overlay_uri`` column gives each tile's file;
- ``_job.json``: model and options; ``_SUCCESS``: the summary, written last.

Tile columns: ``uri``, ``tile_id`` (stable id, see breakhis.inputs),
``file_name``, ``patient_id``, ``magnification``, ``subtype``, ``label`` (the
true label from the name: 0 benign, 1 malignant; null when the name is not a
BreakHis name), ``prob_malignant`` (float32 in [0, 1], the softmax of the
malignant logit, averaged over the 8 flips/rotations with TTA),
``predicted_label`` (int8, ``prob_malignant >= threshold``),
``predicted_class`` ("benign"/"malignant"), ``model_id`` (the artifact's hash
of its weights), ``model_version`` (the artifact format version),
``attribution_method``, ``attribution_target`` (the class explained: the
predicted one), ``attribution`` (Arrow ``fixed_size_list<float32>[S*S]``,
S = ``map_size``, default 64: the map over the whole tile, row-major, top row
first, divided by its largest absolute value so it lies in [-1, 1]; never null:
all zeros for a tile without a map, whose ``attribution_method`` is null),
``attribution_scale`` (float32, that largest absolute value: raw map = map x
scale), ``overlay_uri`` and ``error`` (null when the tile scored; otherwise
``read: ...`` or ``decode: ...`` and every prediction column null).

Why that layout: it is the one every common reader takes as it is, error rows included
(tests/test_score_readers.py): pandas (a numpy array of S*S values per row), pyarrow
(``column.flatten().to_numpy().reshape(N, S, S)``), polars (an ``Array`` column),
DuckDB (``FLOAT[]``, from the files and from an Arrow table) and Ray Data's numpy
batches. Arrow's ``fixed_shape_tensor`` extension is not understood by polars, float16
not by DuckDB from Arrow, and a null entry in a fixed-size list is what pyarrow cannot
convert: hence float32 and zeros, not nulls. The cost: 4 bytes a cell instead of 2,
16 KiB a row at S = 64 before compression instead of 8 KiB.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.calibration import PATIENT_RULES
from breakhis.inputs import INPUT_SCHEMA, InputSet, discover_inputs
from breakhis.names import CLASS_NAMES
from breakhis.predict import PredictOptions, actor_plan, predict_dataset
from breakhis.raysession import ensure_ray
from breakhis.score_output import (
    JobMismatchError,  # noqa: F401 (re-exported: breakhis.score.JobMismatchError)
    claim_output,
    new_token,
    release_claim,
    unit_files,
    verify_claim,
    write_unit,
)

if TYPE_CHECKING:
    from breakhis.artifact import ModelCard

log = logging.getLogger(__name__)

JOB_FORMAT = 2  # 2: attribution as fixed_size_list<float32>


def tile_schema(map_size: int) -> pa.Schema:
    """The schema of ``tiles/unit-*.parquet`` for maps of ``map_size`` x ``map_size``."""
    described = [f for f in INPUT_SCHEMA if f.name != "shard"]  # the tile, as its input
    return pa.schema(
        [
            *described,
            ("prob_malignant", pa.float32()),
            ("predicted_label", pa.int8()),
            ("predicted_class", pa.string()),
            ("model_id", pa.string()),
            ("model_version", pa.int16()),
            ("attribution_method", pa.string()),
            ("attribution_target", pa.int8()),
            ("attribution", pa.list_(pa.float32(), map_size * map_size)),
            ("attribution_scale", pa.float32()),
            ("overlay_uri", pa.string()),
            ("error", pa.string()),
        ]
    )


PATIENT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("label", pa.int8()),  # true label from the names; null when unknown
        ("tiles", pa.int32()),  # input tiles of the patient
        ("scored", pa.int32()),
        ("errors", pa.int32()),
        ("mean_prob_malignant", pa.float32()),  # over scored tiles
        ("frac_predicted_malignant", pa.float32()),
        ("patient_call", pa.string()),  # "malignant" when mean_prob_malignant >= threshold
    ]
)
"""``patients.parquet``: one row per patient; null statistics when no tile of it scored."""


@dataclass(frozen=True)
class ScoreConfig:
    """Options of the scoring job."""

    model: str
    """Model artifact directory (local or s3://) written by breakhis.artifact.save_artifact."""
    input: str
    """Tiles: a prefix (any nesting), a prepared DEST, or a manifest (.parquet/.csv/.txt)."""
    output: str
    """Output root (local or s3://); a rerun into it scores only what is missing."""
    predict: PredictOptions = field(default_factory=PredictOptions)
    """How the model runs over the tiles (breakhis.predict)."""
    patient_rule: str = "mean"
    """How a patient's tiles become one call: ``mean`` (mean prob_malignant >= threshold) or
    ``majority`` (at least half of the tiles called malignant)."""
    overlays: bool = False
    """Also write OUTPUT/overlays/<tile id as a safe file name>.png: the tile with its map
    (needs attribution)."""
    unit_size: int = 256
    """Tiles per work unit (per output file); the unit of resumption."""
    max_buffer_mb: int = 0
    """Most object-store memory (MB) the pipeline holds at once (decoded tiles waiting for a
    model actor, results waiting for the driver): what keeps memory flat for any input.
    0: 8 batches of decoded tiles per actor, at least 256 MB."""

    def __post_init__(self) -> None:
        if not (isinstance(self.unit_size, int) and self.unit_size >= 1):
            raise ValueError(f"--unit-size must be an integer >= 1, got {self.unit_size!r}")
        if self.max_buffer_mb < 0:
            raise ValueError(
                f"--max-buffer-mb must be >= 0 (0: automatic), got {self.max_buffer_mb}"
            )
        if self.patient_rule not in PATIENT_RULES:
            raise ValueError(
                f"--patient-rule {self.patient_rule!r}; accepted: {', '.join(PATIENT_RULES)}"
            )
        if self.overlays and self.predict.method is None:
            raise ValueError("--overlays needs an attribution method (not --attribution none)")
        out, src = _normalised(self.output), _normalised(self.input)
        if out == src or out.startswith(src + "/") or src.startswith(out + "/"):
            raise ValueError(
                f"--output {self.output} and --input {self.input} overlap; "
                "write scores outside the input (its overlays would become input tiles)"
            )

    def threshold_for(self, card: ModelCard) -> float:
        """The threshold applied: ``predict.threshold`` when given, else the model's own."""
        threshold = self.predict.threshold
        return card.threshold if threshold is None else threshold

    def job_record(self, card: ModelCard) -> dict:
        """What ``_job.json`` holds: everything that changes the output rows (the
        threshold as applied: the model's own when ``threshold`` is None)."""
        method, predict = self.predict.method, self.predict
        return {
            "format": JOB_FORMAT,
            "model": _normalised(self.model),
            "model_id": card.model_id,
            "input": _normalised(self.input),
            "image_size": card.image_size,
            "temperature": card.temperature,
            "attribution": method,
            "map_size": predict.map_size,
            "tta": predict.tta,
            "threshold": self.threshold_for(card),
            "patient_rule": self.patient_rule,
            "overlays": self.overlays,
            "unit_size": self.unit_size,
            "ig_steps": predict.ig_steps if method == "integrated_gradients" else None,
            "occlusion_window": predict.occlusion_window if method == "occlusion" else None,
            "lime_samples": predict.lime_samples if method == "lime" else None,
            "lime_grid": predict.lime_grid if method == "lime" else None,
        }


def _normalised(uri: str) -> str:
    """A URI spelled one way: local paths absolute, no trailing slash."""
    uri = uri.rstrip("/")
    return uri if storage.is_s3(uri) else storage.resolve(uri)[1]


@dataclass(frozen=True)
class Unit:
    """One work unit: consecutive tiles of the sorted listing, written as one file."""

    index: int
    members: pa.Table  # inputs.INPUT_SCHEMA rows, sorted by uri

    @property
    def name(self) -> str:
        digest = hashlib.sha256()
        for uri in self.members.column("uri").to_pylist():
            digest.update(uri.encode())
            digest.update(b"\n")
        return f"unit-{self.index:05d}-{digest.hexdigest()[:12]}.parquet"


def plan_units(inputs: pa.Table, unit_size: int) -> list[Unit]:
    """Cut the (uri-sorted) listing into units of ``unit_size`` tiles, the last one shorter."""
    table = inputs.sort_by("uri")
    return [
        Unit(i, table.slice(start, unit_size))
        for i, start in enumerate(range(0, table.num_rows, unit_size))
    ]


@dataclass(frozen=True)
class ScoreSummary:
    """What a scoring run produced (the whole output, not only this run's part)."""

    output: str
    model_id: str
    attribution: str | None
    tiles: int
    scored: int
    errors: int
    units: int
    units_written: int
    units_skipped: int
    stale_deleted: int
    patients: int
    seconds: float

    @property
    def tiles_per_second(self) -> float:
        """Tiles scored by this run per second of its wall time."""
        written = self.tiles if self.units == 0 else self.tiles * self.units_written / self.units
        return written / self.seconds if self.seconds > 0 else math.nan

    def format_table(self) -> str:
        """A plain-text summary for the terminal."""
        return "\n".join(
            [
                f"scored {self.tiles} tiles into {self.output} (model {self.model_id}, "
                f"attribution {self.attribution or 'none'})",
                f"  scored: {self.scored}   errors: {self.errors}   patients: {self.patients}",
                f"  units: {self.units} ({self.units_written} written this run, "
                f"{self.units_skipped} already complete, {self.stale_deleted} stale deleted)",
                f"  time: {self.seconds:.1f} s",
            ]
        )


# --------------------------------------------------------------------------- the job (driver)


def run_scoring(config: ScoreConfig) -> ScoreSummary:
    """Score every input tile into ``config.output`` on the current Ray cluster
    (started locally if none); a rerun scores only the units still missing.

    Everything that can be checked on the driver is, before the output is claimed and
    before Ray starts: the model (card, weights hash and load), the input and the output.
    Returns a ScoreSummary of the whole output. Raises FileNotFoundError for a
    missing model or input, ValueError for a damaged model, an input without tiles or
    a bad manifest, JobMismatchError (a ValueError) when the output holds a job with
    another model or options, and RuntimeError when a unit comes back
    incomplete (a bug, never silently written).
    """
    from breakhis.artifact import load_artifact

    started = time.perf_counter()
    # Loaded once here so that a damaged artifact fails in one line, not in every actor.
    _, card = load_artifact(config.model)
    if "malignant" not in card.class_names:
        raise ValueError(f"{config.model}: class_names {card.class_names} lack 'malignant'")
    inputs = discover_inputs(config.input)
    record = config.job_record(card)
    log.info(
        "threshold %.4f (%s), temperature %.4f",
        config.threshold_for(card),
        "--threshold" if config.predict.threshold is not None else "the model's",
        card.temperature,
    )
    # The threshold as applied from here on (the model's own unless one was given).
    config = replace(config, predict=replace(config.predict, threshold=config.threshold_for(card)))
    token = new_token()
    claim_output(config.output, record, token)
    try:
        return _run_claimed(config, card, inputs, record, token, started)
    finally:
        release_claim(config.output, token)


def _run_claimed(config, card, inputs, record: dict, token: str, started: float):
    """The job once the output is claimed: score what is missing, check, summarise."""

    units = plan_units(inputs.table, config.unit_size)
    tiles_uri = storage.join(config.output, "tiles")
    existing = unit_files(tiles_uri)
    pending = [u for u in units if u.name not in existing]
    log.info(
        "%d tiles in %d units: %d already complete, %d to score",
        inputs.num_tiles,
        len(units),
        len(units) - len(pending),
        len(pending),
    )
    wanted = {u.name for u in units}
    stale = sorted(n for n in existing if n not in wanted)
    if pending or stale:
        storage.delete(storage.join(config.output, "_SUCCESS"))
    if pending:
        storage.make_dirs(tiles_uri)
        _score_units(config, card, pending, tiles_uri, token)
    for name in stale:
        storage.delete(storage.join(tiles_uri, name))
    if stale:
        log.info("deleted %d unit file(s) of an older listing of the input", len(stale))

    counts, patients = _summarise(config, card, tiles_uri, units, inputs)
    summary = ScoreSummary(
        output=config.output,
        model_id=card.model_id,
        attribution=config.predict.method,
        tiles=inputs.num_tiles,
        scored=counts["scored"],
        errors=counts["errors"],
        units=len(units),
        units_written=len(pending),
        units_skipped=len(units) - len(pending),
        stale_deleted=len(stale),
        patients=patients,
        seconds=time.perf_counter() - started,
    )
    verify_claim(config.output, record, token)
    done = {"job": record, "summary": asdict(summary)}
    storage.write_bytes(
        storage.join(config.output, "_SUCCESS"), json.dumps(done, indent=2).encode()
    )
    return summary


def _score_units(
    config: ScoreConfig, card, pending: list[Unit], tiles_uri: str, token: str
) -> None:
    ensure_ray()
    blocks = [
        unit.members.select(["uri", "tile_id", "shard"]).append_column(
            "unit", pa.array([unit.index] * unit.members.num_rows, pa.int32())
        )
        for unit in pending
    ]
    log.info("scoring %d units", len(pending))
    predict = config.predict
    max_actors = actor_plan(predict.device, predict.num_actors, predict.cpus_per_actor)[0]
    tile_bytes = card.image_size * card.image_size * 3
    buffer = config.max_buffer_mb * 2**20 or max(
        256 * 2**20, 8 * max_actors * predict.batch_size * tile_bytes
    )
    ds = predict_dataset(
        blocks,
        model_uri=config.model,
        image_size=card.image_size,
        threshold=config.threshold_for(card),
        options=predict,
        overlay_root=storage.join(config.output, "overlays") if config.overlays else None,
        object_store_limit=buffer,
    )
    by_index = {u.index: u for u in pending}
    waiting: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    written: set[int] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index in np.unique(batch["unit"]):
            rows = batch["unit"] == index
            part = {k: v[rows] for k, v in batch.items()}
            index = int(index)
            waiting[index].append(part)
            received[index] += int(rows.sum())
            unit = by_index[index]
            if received[index] == unit.members.num_rows:
                table = _unit_table(config, card, unit, waiting.pop(index))
                write_unit(storage.join(tiles_uri, unit.name), _parquet_bytes(table), token)
                written.add(index)
                log.debug("wrote %s (%d/%d)", unit.name, len(written), len(pending))
    if len(written) != len(pending):
        missing = sorted(by_index[i].name for i in by_index if i not in written)
        raise RuntimeError(
            f"{len(missing)} unit(s) came back incomplete from Ray Data "
            f"(e.g. {missing[:3]}); nothing of them was written, rerun to score them"
        )


def _unit_table(config: ScoreConfig, card, unit: Unit, parts: list[dict]) -> pa.Table:
    """One unit's rows: the members' facts joined with their scores, sorted by uri."""
    scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(scores["uri"].astype(str), kind="stable")
    scores = {k: v[order] for k, v in scores.items()}
    members = unit.members  # sorted by uri already
    if scores["uri"].tolist() != members.column("uri").to_pylist():
        raise RuntimeError(f"{unit.name}: scored tiles differ from the unit's members")
    error = scores["error"].astype(str)
    bad = error != ""
    prob = scores["prob"].astype(np.float32)
    predicted = (prob >= config.predict.threshold).astype(np.int8)
    has_map = (scores["target"] >= 0) & ~bad
    schema = tile_schema(config.predict.map_size)
    count = members.num_rows
    flat = pa.array(scores["map"].reshape(-1).astype(np.float32), pa.float32())
    maps = pa.FixedSizeListArray.from_arrays(flat, config.predict.map_size**2)
    columns = {
        **{
            name: members.column(name)
            for name in (
                "uri",
                "tile_id",
                "file_name",
                "patient_id",
                "magnification",
                "subtype",
                "label",
            )
        },
        "prob_malignant": pa.array(prob, pa.float32(), mask=bad),
        "predicted_label": pa.array(predicted, pa.int8(), mask=bad),
        "predicted_class": pa.array([CLASS_NAMES[c] for c in predicted], pa.string(), mask=bad),
        "model_id": pa.array([card.model_id] * count, pa.string()),
        "model_version": pa.array([card.version] * count, pa.int16()),
        "attribution_method": pa.array([config.predict.method] * count, pa.string(), mask=~has_map),
        "attribution_target": pa.array(scores["target"], pa.int8(), mask=~has_map),
        "attribution": maps,
        "attribution_scale": pa.array(scores["scale"], pa.float32(), mask=~has_map),
        "overlay_uri": pa.array(
            scores["overlay"].astype(str), pa.string(), mask=scores["overlay"] == ""
        ),
        "error": pa.array(error, pa.string(), mask=~bad),
    }
    metadata = {
        "breakhis.score": json.dumps(
            {
                "model": config.model,
                "model_id": card.model_id,
                "attribution": {
                    "method": config.predict.method,
                    "shape": [config.predict.map_size] * 2,
                    "dtype": "float32",
                    "covers": "the whole tile, row-major, top row first",
                    "values": "map / attribution_scale, in [-1, 1]",
                },
                "tta": config.predict.tta,
                "threshold": config.predict.threshold,
                "image_size": card.image_size,
            }
        )
    }
    return pa.table(columns, schema=schema.with_metadata(metadata))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _summarise(
    config: ScoreConfig, card, tiles_uri: str, units: list[Unit], inputs: InputSet
) -> tuple[dict[str, int], int]:
    """Check the output against the plan, write ``patients.parquet``; return counts."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.resolve(tiles_uri)
    files = [f"{path}/{u.name}" for u in units]
    columns = [
        "uri",
        "patient_id",
        "label",
        "prob_malignant",
        "predicted_label",
        "error",
        "model_id",
    ]
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)
    if table.num_rows != inputs.num_tiles or pc.count_distinct(table["uri"]).as_py() != (
        inputs.num_tiles
    ):
        raise RuntimeError(
            f"{tiles_uri}: {table.num_rows} rows for {inputs.num_tiles} input tiles; "
            "the output is inconsistent (was it written by two jobs at once?)"
        )
    others = pc.count(pc.filter(table["model_id"], pc.not_equal(table["model_id"], card.model_id)))
    if others.as_py():
        raise RuntimeError(
            f"{tiles_uri}: {others.as_py()} row(s) scored by another model than "
            f"{card.model_id}; _SUCCESS not written (was it written by two jobs at once?)"
        )
    scored = table["error"].null_count  # error is null exactly when the tile scored
    counts = {"scored": scored, "errors": table.num_rows - scored}
    patients_uri = storage.join(config.output, "patients.parquet")
    known = table.filter(pc.is_valid(table["patient_id"]))
    if known.num_rows == 0:
        storage.delete(patients_uri)
        return counts, 0
    patients = patient_table(known, config.predict.threshold, config.patient_rule)
    storage.write_bytes(patients_uri, _parquet_bytes(patients))
    return counts, patients.num_rows


def patient_table(tiles: pa.Table, threshold: float, rule: str = "mean") -> pa.Table:
    """Per-patient summary (PATIENT_SCHEMA, sorted by patient_id) of tile rows.

    ``tiles`` needs patient_id, label, prob_malignant, predicted_label and
    error. The patient call follows ``rule`` (breakhis.calibration.PATIENT_RULES):
    ``mean``, malignant when the mean probability of the patient's scored tiles
    is at least ``threshold``; ``majority``, when at least half of them are
    called malignant. The label is the true label when all the patient's names
    agree, else null.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, patient in enumerate(tiles.column("patient_id").to_pylist()):
        groups[patient].append(i)
    labels = tiles.column("label").to_pylist()
    probs = tiles.column("prob_malignant").to_pylist()
    predicted = tiles.column("predicted_label").to_pylist()
    errors = tiles.column("error").to_pylist()
    rows = []
    for patient in sorted(groups):
        members = groups[patient]
        scored = [i for i in members if errors[i] is None]
        known_labels = {labels[i] for i in members if labels[i] is not None}
        mean = float(np.mean([probs[i] for i in scored])) if scored else None
        share = float(np.mean([predicted[i] for i in scored])) if scored else None
        if mean is None:
            call = None
        else:
            call = CLASS_NAMES[int(mean >= threshold if rule == "mean" else share >= 0.5)]
        rows.append(
            {
                "patient_id": patient,
                "label": known_labels.pop() if len(known_labels) == 1 else None,
                "tiles": len(members),
                "scored": len(scored),
                "errors": len(members) - len(scored),
                "mean_prob_malignant": mean,
                "frac_predicted_malignant": share,
                "patient_call": call,
            }
        )
    return pa.Table.from_pylist(rows, schema=PATIENT_SCHEMA)
