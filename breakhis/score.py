"""Batch scoring job: a model artifact over any number of tiles, exactly once.

    ray job submit --working-dir . -- python jobs/score.py \\
        --model s3://bucket/runs/rn50/best --input s3://archive/tiles/ \\
        --out s3://bucket/scores/2026-11 --attribution gradcam
    breakhis score --model ./runs/smallcnn/best --input ./synthetic --out ./scores

Input (breakhis.inputs): a prefix of PNG/JPEG/TIFF tiles at any nesting, a
prepared DEST's shards, or a manifest listing URIs.

Pipeline (Ray Data, streaming; breakhis.score_units): the driver streams the sorted
listing (a prefix page by page, breakhis.inputs.list_inputs) into work units and writes
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
``unit-NNNNN-<sha256 of the member URIs, 12 hex>.parquet``. A unit's file is
written in one piece only from all its tiles (temp file + rename locally, one PUT on
S3; a batch holding part of a unit fails loudly), so a reader never sees half a file
and a file that exists is complete; a task retried after a lost node writes the same
file again. A rerun into the same output lists ``tiles/``, skips the units whose file
exists and scores the rest; units of an older listing (the input changed) are deleted
before the job declares success, and temp files only when stale (breakhis.score_output:
never another live job's). The finished output therefore has exactly one row per input
tile. (A tile rewritten in place under the same URI is not rescored: units are
named by URIs, not contents; score into a new output for that.) ``_job.json``
records the model and every option that changes the output; a rerun with
another model or such an option is refused, naming the differences. One job at
a time per output, enforced: the output is claimed atomically (breakhis.score_output),
the claim is checked again and every row's ``model_id`` verified before ``_SUCCESS``.

Output (``OUTPUT/``, local or ``s3://``):

- ``tiles/unit-*.parquet``: one row per input tile, ``tile_schema()`` (below), rows
  sorted by uri within a file; read the folder with pandas, pyarrow, polars, DuckDB or Ray Data;
- ``patients.parquet``: one row per patient (= slide in BreakHis), when patient
  ids are known (BreakHis names), PATIENT_SCHEMA;
- ``overlays/<name>.png``: with ``--overlays``, the tile as the model saw it
  (``image_size`` px square) with its attribution map over it; ``<name>`` is the
  tile id when it is a plain file name, else a slug of it plus a hash
  (``storage.safe_name``): never a path, so no tile id writes outside OUTPUT. The
  ``overlay_uri`` column gives each tile's file;
- ``_job.json``: model and options; ``_SUCCESS``: the summary, written last;
- ``_claims/``, ``_plan/``: a running job's claim and plan (removed when it ends).

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
16 KiB a row at S = 64 before compression instead of 8 KiB; in zstd Parquet (256 maps of
64 x 64, 2026-12-04) 14.6 KB a row instead of 7.0 KB for smooth Grad-CAM-like maps, 17.2
instead of 7.7 KB for noise: about 2.1x, some 15 GB of maps a million tiles (``--map-size
32`` quarters it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from breakhis import storage
from breakhis.inputs import Listing, list_inputs
from breakhis.predict import actor_plan
from breakhis.raysession import ensure_ray
from breakhis.score_config import ScoreConfig
from breakhis.score_output import (  # noqa: F401 (re-exported: errors, patients.parquet)
    CLAIM_REFRESH_S,
    PATIENT_SCHEMA,
    JobMismatchError,
    PatientTotals,
    claim_output,
    new_token,
    patient_table,
    refresh_claim,
    release_claim,
    sweep_dead_jobs,
    unit_files,
    verify_claim,
)
from breakhis.score_units import (  # noqa: F401 (re-exported: the output's schema, units)
    Plan,
    Unit,
    UnitFormat,
    parquet_bytes,
    plan_units,
    tile_schema,
    units_dataset,
    write_plan,
)

log = logging.getLogger(__name__)


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
    """Score every input tile into ``config.out`` on the current Ray cluster
    (started locally if none); a rerun scores only the units still missing.

    Everything that can be checked on the driver is, before the output is claimed and
    before Ray starts: the model (card, weights hash and load), the input and the output.
    Returns a ScoreSummary of the whole output. Raises FileNotFoundError for a
    missing model or input, ValueError for a damaged model, an input without tiles or
    a bad manifest, JobMismatchError (a ValueError) when the output holds or is being
    claimed by a job with another model or options, and RuntimeError when a unit comes
    back incomplete or the output holds rows of another model (never silently written).
    """
    from breakhis.artifact import load_artifact

    started = time.perf_counter()
    # Loaded once here so that a damaged artifact fails in one line, not in every actor.
    _, card = load_artifact(config.model)
    if "malignant" not in card.class_names:
        raise ValueError(f"{config.model}: class_names {card.class_names} lack 'malignant'")
    listing = list_inputs(config.input)
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
    claim_output(config.out, record, token)
    try:
        return _run_claimed(config, card, listing, record, token, started)
    finally:
        release_claim(config.out, token)


def _run_claimed(config, card, listing: Listing, record: dict, token: str, started: float):
    """The job once the output is claimed: plan, score what is missing, check, summarise."""
    tiles_uri = storage.join(config.out, "tiles")
    sweep_dead_jobs(config.out)
    existing = unit_files(tiles_uri)
    plan_folder = storage.join(config.out, "_plan", token)
    try:
        plan = write_plan(listing, config.unit_size, existing, plan_folder)
        log.info(
            "%d tiles in %d units: %d already complete, %d to score",
            listing.num_tiles,
            len(plan.names),
            len(plan.names) - plan.pending.num_rows,
            plan.pending.num_rows,
        )
        stale = sorted(existing - set(plan.names))
        if plan.pending.num_rows or stale:
            storage.delete(storage.join(config.out, "_SUCCESS"))
        if plan.pending.num_rows:
            storage.make_dirs(tiles_uri)
            _score_units(
                config,
                card,
                plan,
                tiles_uri,
                lambda: refresh_claim(config.out, record, token),
                token,
            )
    finally:
        _delete_plan(config.out, plan_folder)
    for name in stale:
        storage.delete(storage.join(tiles_uri, name))
    if stale:
        log.info("deleted %d unit file(s) of an older listing of the input", len(stale))

    counts, patients = _summarise(config, card, tiles_uri, plan)
    summary = ScoreSummary(
        output=config.out,
        model_id=card.model_id,
        attribution=config.predict.method,
        tiles=listing.num_tiles,
        scored=counts["scored"],
        errors=counts["errors"],
        units=len(plan.names),
        units_written=plan.pending.num_rows,
        units_skipped=len(plan.names) - plan.pending.num_rows,
        stale_deleted=len(stale),
        patients=patients,
        seconds=time.perf_counter() - started,
    )
    verify_claim(config.out, record, token)
    done = {"job": record, "summary": asdict(summary)}
    storage.write_bytes(storage.join(config.out, "_SUCCESS"), json.dumps(done, indent=2).encode())
    return summary


def _delete_plan(output: str, folder: str) -> None:
    """Delete this job's plan files (and locally its folders once empty)."""
    if storage.exists(folder):
        for entry in storage.walk(folder):
            storage.delete(entry.uri)
    if not storage.is_s3(folder):
        for path in (folder, storage.join(output, "_plan")):
            with contextlib.suppress(OSError):  # not empty: another job's plan is there
                os.rmdir(storage.resolve(path)[1])


def _score_units(
    config: ScoreConfig, card, plan: Plan, tiles_uri: str, alive: Callable[[], None], token: str
) -> None:
    """Run the pipeline over the plan's pending units; the workers write the unit files
    and send back one summary row per unit (breakhis.score_units)."""
    ensure_ray()
    predict = config.predict
    max_actors = actor_plan(predict.device, predict.num_actors, predict.cpus_per_actor)[0]
    largest = max(plan.pending["unit_rows"].to_pylist())
    unit_bytes = largest * math.prod(card.tile_geometry.eval_hw) * 3
    # Decoded units waiting for an actor: two per actor, at least 256 MB.
    buffer = config.max_buffer_mb * 2**20 or max(256 * 2**20, 2 * max_actors * unit_bytes)
    fmt = UnitFormat(
        tiles_uri=tiles_uri,
        token=token,
        model=config.model,
        model_id=card.model_id,
        model_version=card.version,
        method=predict.method,
        map_size=predict.map_size,
        threshold=predict.threshold,
        tta=predict.tta,
        image_size=card.image_size,
        geometry=card.tile_geometry,
    )
    ds = units_dataset(
        plan.pending,
        fmt=fmt,
        model_uri=config.model,
        options=predict,
        overlay_root=storage.join(config.out, "overlays") if config.overlays else None,
        object_store_limit=buffer,
    )
    expected = set(plan.pending["name"].to_pylist())
    written: set[str] = set()
    with Progress(plan.pending_tiles, config.progress_interval_s, alive) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for name, rows, errors in zip(
                batch["name"], batch["rows"], batch["errors"], strict=True
            ):
                written.add(str(name))
                progress.add(int(rows), int(errors))
    missing = sorted(expected - written)
    if missing:
        raise RuntimeError(
            f"{len(missing)} unit(s) were not written (e.g. {missing[:3]}); rerun to score them"
        )


class Progress:
    """Logs tiles done / total, tiles/s and an ETA every ``interval_s`` seconds (from a
    thread, so the log keeps its pace whatever the pipeline does) and once at the end;
    calls ``alive`` every CLAIM_REFRESH_S from the same thread (the claim's refresh)."""

    def __init__(self, total: int, interval_s: float, alive: Callable[[], None]) -> None:
        self.total, self.interval_s, self.alive = total, interval_s, alive
        self.done = self.errors = self.units = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="score-progress", daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.log()

    def add(self, rows: int, errors: int) -> None:
        with self._lock:
            self.done += rows
            self.errors += errors
            self.units += 1

    def _run(self) -> None:
        refreshed = time.perf_counter()
        while not self._stop.wait(min(self.interval_s, CLAIM_REFRESH_S)):
            if time.perf_counter() - refreshed >= CLAIM_REFRESH_S:
                try:
                    self.alive()
                    refreshed = time.perf_counter()
                except OSError as err:  # e.g. S3 away for a while: try again next time
                    log.warning("could not refresh the output's claim: %s", err)
            self.log()

    def line(self) -> str:
        with self._lock:
            done, errors, units = self.done, self.errors, self.units
        elapsed = time.perf_counter() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "unknown"
        return (
            f"scored {done}/{self.total} tiles ({100 * done / max(1, self.total):.1f}%, "
            f"{units} units, {errors} errors), {rate:.1f} tiles/s, ETA {eta}"
        )

    def log(self) -> None:
        log.info("%s", self.line())


def _summarise(config: ScoreConfig, card, tiles_uri: str, plan: Plan) -> tuple[dict[str, int], int]:
    """Check the output against the plan (every unit there, one row per tile, every row of
    this job's model), write ``patients.parquet``; return counts. Streams the unit files
    in batches: memory holds one batch and the per-patient totals."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.resolve(tiles_uri)
    files = [f"{path}/{name}" for name in plan.names]
    columns = ["patient_id", "label", "prob_malignant", "predicted_label", "error", "model_id"]
    totals = PatientTotals()
    rows = scored = others = 0
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(columns=columns, batch_size=65_536):
        rows += batch.num_rows
        scored += batch.column("error").null_count  # null exactly when the tile scored
        others += batch.num_rows - pc.sum(pc.equal(batch["model_id"], card.model_id)).as_py()
        totals.add(batch)
    if rows != sum(plan.rows):
        raise RuntimeError(
            f"{tiles_uri}: {rows} rows for {sum(plan.rows)} input tiles; "
            "the output is inconsistent (was it written by two jobs at once?)"
        )
    if others:
        raise RuntimeError(
            f"{tiles_uri}: {others} row(s) scored by another model than {card.model_id}; "
            "_SUCCESS not written (was the output written by two jobs at once?)"
        )
    counts = {"scored": scored, "errors": rows - scored}
    patients_uri = storage.join(config.out, "patients.parquet")
    if not totals.by_patient:
        storage.delete(patients_uri)
        return counts, 0
    patients = totals.table(config.predict.threshold, config.patient_rule)
    storage.write_bytes(patients_uri, parquet_bytes(patients))
    return counts, patients.num_rows
