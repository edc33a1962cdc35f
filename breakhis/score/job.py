"""Batch scoring job: a model artifact over any number of tiles, exactly once.

    ray job submit --working-dir . -- python jobs/score.py \\
        --model s3://bucket/runs/rn50/best --input s3://archive/tiles/ \\
        --out s3://bucket/scores/2026-11 --attribution gradcam
    breakhis score --model ./runs/smallcnn/best --input ./synthetic --out ./scores

Input (breakhis.data.inputs): a prefix of PNG/JPEG/TIFF tiles at any nesting, a
prepared DEST's shards, or a manifest listing URIs.

Pipeline (Ray Data, streaming; breakhis.score.units): the driver streams the sorted
listing (a prefix page by page, breakhis.data.inputs.list_inputs) into work units and writes
the members of the missing ones to a plan under the output; the pipeline's source is one
small row per unit; decode tasks turn a unit into one block of decoded tiles; the model
actors check that they hold whole units, score them (model calls of ``--batch-size``
tiles), write each unit's file where it was scored and send the driver a summary row per
unit (name, rows, errors), never the maps. Ray Data's backpressure, under an
object-store limit of ``max_buffer_mb`` for this dataset, bounds what is in flight. The
driver holds per unit its name and size, per tile nothing but (for a prefix) an 8-byte
hash of its BreakHis name while listing; the summary and ``patients.parquet`` are
computed by streaming the unit files. It logs tiles done / total, tiles/s and an ETA every
``progress_interval_s`` (Ray Data's own progress stays in the dashboard).

Exactly once, resumable. The listing is sorted, so the same input always gives
the same units: ``unit_size`` consecutive tiles, named
``unit-NNNNN-<sha256 of the member URIs (and the listing's own columns), 12 hex>.parquet``.
A unit's file is written into the journal ``_units/`` in one piece only from all its tiles
(temp file + rename locally, one PUT on S3; a batch holding part of a unit fails loudly),
so a file that exists is complete; a task retried after a lost node writes the same file
again. A rerun into the same output lists the journal and the manifest, skips the units
found there and scores the rest; units of an older listing (the input changed) are deleted
before the job declares success, and temp files only when stale (breakhis.score.output:
never another live job's). (A tile rewritten in place under the same URI is not rescored:
units are named by URIs, not contents; score into a new output for that.) ``_job.json``
records the model and every option that changes the output; a rerun with another model or
such an option is refused, naming the differences. One job at a time per output, enforced,
even with the same options: the output is claimed atomically (breakhis.score.output) and any
other live claim refuses the job.

Once every unit is there, the journal is compacted into few large files and committed by
``_manifest.json`` (breakhis.score.tables: why, and how a kill at any point is survived).
Before the manifest, the claim is checked again, the journal must hold no unit of another
job, and the final files each planned unit with its rows, every row the ``model_id`` checked
here, one map per scored tile and (``--features``) one embedding per scored tile; the actors load the artifact the driver checked, shipped
through the object store (breakhis.score.pipeline), and stamp rows with the hash of the weights
they hold.

**Readers wait for ``_SUCCESS``.** Until it is there, the folders may hold part of the
files, or files of an earlier run that the job is about to delete; only an output with
``_SUCCESS`` has exactly one row per input tile (a rerun deletes ``_SUCCESS`` first).

Faults (breakhis.score.units): a transient storage error (throttling, 5xx, no answer) is
retried, then fails its task, never becomes an error row; decode tasks and model actors
are retried a bounded number of times; a unit whose decoding failed twice is decoded tile
by tile, so a tile that kills its worker becomes an error row (breakhis.score.isolate); a
tile file over ``--max-tile-mb`` is an error row, not read.

Output (``OUTPUT/``, local or ``s3://``; docs/scoring.md has every column):

- ``predictions/part-*.parquet``: one narrow row per input tile
  (breakhis.score.tables.predictions_schema): ``tile_id`` (the key), the tile's facts,
  the listing's own columns, ``prob_<class>`` per class of the model, ``predicted_label``,
  ``predicted_class``, ``threshold``, ``model_id``, ``model_version``, ``error``; a subtype
  model (``--task subtype``) has ``prob_<subtype>`` per class, then ``prob_malignant`` (the
  sum of the four carcinomas', the call's probability) and ``predicted_subtype``;
- ``attributions/part-*.parquet``: with a method, one row per scored tile
  (attributions_schema): ``tile_id``, ``method``, ``target``, ``map``
  (``fixed_size_list<float32>[S*S]``, in [-1, 1]), ``scale``, ``overlay_uri``;
- ``features/part-*.parquet``: with ``--features``, one row per scored tile
  (features_schema): ``tile_id``, ``embedding`` (``fixed_size_list<float32>[D]``, the input
  of the model's classification head: D = 2,048 for ResNet50, 384 for a ViT-S);
- ``patients.parquet``: one row per patient (= slide in BreakHis), when patient
  ids are known (BreakHis names), PATIENT_SCHEMA;
- ``overlays/<name>.png``: with ``--overlays``, the tile as the model saw it with its map
  over it; ``<name>`` is the tile id when it is a plain file name, else a slug of it plus a
  hash (``storage.safe_name``): never a path, so no tile id writes outside OUTPUT;
- ``_manifest.json``: the final files and the units each holds; ``_job.json``: model and
  options; ``_SUCCESS``: the summary, written last;
- ``_units/``, ``_claims/``, ``_plan/``: a running job's journal, claim and plan (removed
  when it ends).

Why the map layout: it is the one every common reader takes as it is
(tests/test_score_readers.py): pandas (a numpy array of S*S values per row), pyarrow
(``column.flatten().to_numpy().reshape(N, S, S)``), polars (an ``Array`` column), DuckDB
(``FLOAT[]``, from the files and from an Arrow table) and Ray Data's numpy batches. Arrow's
``fixed_shape_tensor`` extension is not understood by polars, float16 not by DuckDB from
Arrow: hence float32. The cost: 4 bytes a cell instead of 2, 16 KiB a row at S = 64 before
compression; in zstd Parquet about 2.1x float16's bytes, some 15 GB of maps a million tiles
(``--map-size 32`` quarters it). Maps live apart from the predictions, so a query on
predictions never reads them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

from breakhis import storage
from breakhis.data.inputs import Listing, list_inputs
from breakhis.score.check import check_output, check_units
from breakhis.score.config import ScoreConfig
from breakhis.score.output import (  # noqa: F401 (re-exported: errors, patients.parquet)
    PATIENT_SCHEMA,
    JobMismatchError,
    claim_output,
    keeping_claim,
    new_token,
    patient_table,
    release_claim,
    sweep_dead_jobs,
    unit_files,
    verify_claim,
)
from breakhis.score.pipeline import score_pending, unit_format
from breakhis.score.tables import (  # noqa: F401 (re-exported: the output's schemas)
    ATTRIBUTIONS,
    FEATURES,
    JOURNAL,
    PREDICTIONS,
    TableSpec,
    attributions_schema,
    check_user_columns,
    compact,
    features_schema,
    manifest_units,
    predictions_schema,
    prune,
    read_manifest,
    rows_per_file,
    user_schema,
    write_manifest,
)
from breakhis.score.units import (  # noqa: F401 (re-exported: units)
    Plan,
    Unit,
    parquet_bytes,
    plan_units,
    table_metadata,
    write_plan,
)

log = logging.getLogger(__name__)

PREDICTION_ROW_GROUP = 131_072
"""Rows per row group of a predictions file (DuckDB and Spark split work by row group)."""
ROW_GROUP_MB = 32
"""Map (embedding) MB per row group of an attributions (features) file."""


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
    prediction_files: int = 0
    attribution_files: int = 0
    feature_files: int = 0

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
                f"  files: {self.prediction_files} in predictions/, "
                f"{self.attribution_files} in attributions/, {self.feature_files} in features/",
                f"  time: {self.seconds:.1f} s",
            ]
        )


# --------------------------------------------------------------------------- the job (driver)


def run_scoring(config: ScoreConfig) -> ScoreSummary:
    """Score every input tile into ``config.out`` on the current Ray cluster
    (started locally if none); a rerun scores only the units still missing.

    Everything that can be checked on the driver is, before the output is claimed and
    before Ray starts: the model (card, weights hash and load), the input and the output.
    The model actors then get the very artifact checked here (breakhis.score.pipeline).
    Returns a ScoreSummary of the whole output. Raises FileNotFoundError for a
    missing model or input, ValueError for a damaged model, an input without tiles or
    a bad manifest, JobMismatchError (a ValueError) when the output holds or is being
    claimed by another job (any other running job: even one with the same model and
    options), and RuntimeError when a unit comes back incomplete or the output holds rows
    of another model or units outside the plan (never silently written).
    """
    from breakhis.model.artifact import read_artifact

    started = time.perf_counter()
    artifact = read_artifact(config.model)
    artifact.load()  # so that a damaged artifact fails here in one line, not in every actor
    card = artifact.card
    config.task_for(card)  # --task subtype needs a subtype model
    listing = list_inputs(config.input)
    check_user_columns(config.input, user_schema(listing.schema))
    record = config.job_record(card)
    log.info(
        "threshold %.4f (%s), temperature %.4f",
        config.threshold_for(card),
        "--threshold" if config.predict.threshold is not None else "the model's",
        card.temperature,
    )
    # The threshold and unit size as applied from here on.
    config = replace(
        config,
        unit_size=config.unit_size_for(card),
        predict=replace(config.predict, threshold=config.threshold_for(card)),
    )
    token = new_token()
    claim_output(config.out, record, token)
    try:
        with keeping_claim(config.out, record, token):
            return _run_claimed(config, artifact, listing, record, token, started)
    finally:
        release_claim(config.out, token)


def _run_claimed(config, artifact, listing: Listing, record: dict, token: str, started: float):
    """The job once the output is claimed: plan, score what is missing into the journal,
    compact it into the tables, check, commit (breakhis.score.tables), summarise."""
    journal = storage.join(config.out, JOURNAL)
    sweep_dead_jobs(config.out, token)
    manifest = read_manifest(config.out)
    in_journal = unit_files(journal)
    plan_folder = storage.join(config.out, "_plan", token)
    try:
        plan = write_plan(
            listing, config.unit_size, in_journal | manifest_units(manifest), plan_folder
        )
        log.info(
            "%d tiles in %d units: %d already complete, %d to score",
            sum(plan.rows),
            len(plan.names),
            len(plan.names) - plan.pending.num_rows,
            plan.pending.num_rows,
        )
        stale = sorted(in_journal - set(plan.names))
        settled = manifest is not None and manifest["units"] == plan.names
        if plan.pending.num_rows or stale or not settled:
            storage.delete(storage.join(config.out, "_SUCCESS"))
        if plan.pending.num_rows:
            storage.make_dirs(journal)
            score_pending(config, artifact, plan, token, plan_folder)
    finally:
        _delete_plan(config.out, plan_folder)
    for name in stale:
        storage.delete(storage.join(journal, name))
    if stale:
        log.info("deleted %d unit file(s) of an older listing of the input", len(stale))

    card = artifact.card
    check_units(journal, plan, manifest_units(manifest))
    if not settled:
        manifest = _compact(config, card, listing, plan, manifest, token)
    counts, patients = check_output(config, card.model_id, plan, manifest)
    if not settled:
        write_manifest(config.out, manifest)  # the commit point of the final files
    pruned = prune(config.out, manifest)
    if pruned:
        log.info("deleted %d file(s) of an earlier compaction", pruned)
    summary = ScoreSummary(
        output=config.out,
        model_id=card.model_id,
        attribution=config.predict.method,
        tiles=sum(plan.rows),  # as planned: the input may have grown since it was counted
        scored=counts["scored"],
        errors=counts["errors"],
        units=len(plan.names),
        units_written=plan.pending.num_rows,
        units_skipped=len(plan.names) - plan.pending.num_rows,
        stale_deleted=len(stale),
        patients=patients,
        seconds=time.perf_counter() - started,
        prediction_files=len(manifest[PREDICTIONS]),
        attribution_files=len(manifest.get(ATTRIBUTIONS, [])),
        feature_files=len(manifest.get(FEATURES, [])),
    )
    verify_claim(config.out, record, token)
    done = {"job": record, "summary": asdict(summary)}
    storage.write_bytes(storage.join(config.out, "_SUCCESS"), json.dumps(done, indent=2).encode())
    return summary


def _compact(config, card, listing: Listing, plan, manifest: dict | None, token: str) -> dict:
    """Compact the journal's units into the final files of every table the job writes
    (breakhis.score.tables); returns the manifest to commit, naming them."""
    fmt = unit_format(config, card, token)
    metadata = table_metadata(fmt)
    schema = predictions_schema(config.class_names_for(card), user_schema(listing.schema))
    specs = [
        TableSpec(
            PREDICTIONS,
            schema.with_metadata(metadata),
            row_group_rows=min(config.file_rows, PREDICTION_ROW_GROUP),
            file_rows=config.file_rows,
        )
    ]
    if config.predict.method is not None:
        row_bytes = 4 * config.predict.map_size**2
        specs.append(
            TableSpec(
                ATTRIBUTIONS,
                attributions_schema(config.predict.map_size).with_metadata(metadata),
                row_group_rows=rows_per_file(row_bytes, ROW_GROUP_MB),
                file_rows=rows_per_file(row_bytes + 64, config.map_file_mb),
                where=("method", True),
            )
        )
    if fmt.feature_dim is not None:
        row_bytes = 4 * fmt.feature_dim
        specs.append(
            TableSpec(
                FEATURES,
                features_schema(fmt.feature_dim).with_metadata(metadata),
                row_group_rows=rows_per_file(row_bytes, ROW_GROUP_MB),
                file_rows=rows_per_file(row_bytes + 64, config.feature_file_mb),
                where=("error", False),
            )
        )
    return compact(config.out, plan.names, plan.rows, manifest, token=token, specs=specs)


def _delete_plan(output: str, folder: str) -> None:
    """Delete this job's plan files (and locally its folders once empty)."""
    if not storage.is_s3(folder):
        shutil.rmtree(storage.resolve(folder)[1], ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: another job's plan is there
            os.rmdir(storage.resolve(storage.join(output, "_plan"))[1])
        return
    if storage.exists(folder):
        for entry in storage.walk(folder):
            storage.delete(entry.uri)
