"""The scoring job's output checked against its plan before ``_SUCCESS``, and its patient
summary (``patients.parquet``) computed on the way.

What must hold for ``_SUCCESS``: every unit of the plan is in the journal or the compacted
files and no other unit file is in the journal (another job writing into the output, e.g.
one that planned from a newer listing of a growing input, would leave units outside this
plan: duplicates under ``_SUCCESS``); the final predictions files hold each planned unit with
its planned rows, one row per input tile; every row carries the model id the job checked
(rows are stamped by the actors with the hash of the weights they loaded); the attributions
hold one map, the features one embedding, per scored tile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from breakhis import storage
from breakhis.score.output import PatientTotals, unit_files
from breakhis.score.tables import (
    ATTRIBUTIONS,
    FEATURES,
    PREDICTIONS,
    count_rows,
    manifest_files,
)
from breakhis.score.units import Plan, parquet_bytes

if TYPE_CHECKING:
    from breakhis.score.config import ScoreConfig

COLUMNS = ("patient_id", "label", "prob_malignant", "predicted_label", "error", "model_id")


def check_units(journal: str, plan: Plan, compacted: set[str]) -> None:
    """Raise RuntimeError when the journal holds a unit file outside ``plan``, or a unit
    of the plan is neither there nor in the compacted files (``compacted``)."""
    there, planned = unit_files(journal), set(plan.names)
    foreign, missing = sorted(there - planned), sorted(planned - there - compacted)
    if foreign:
        raise RuntimeError(
            f"{journal}: {len(foreign)} unit file(s) outside this job's plan (e.g. "
            f"{foreign[:3]}): another job wrote into the output; _SUCCESS not written. "
            "Rerun once no other job runs on it: the rerun deletes them"
        )
    if missing:
        raise RuntimeError(
            f"{journal}: {len(missing)} unit file(s) of the plan missing (e.g. "
            f"{missing[:3]}); _SUCCESS not written (was it written by two jobs at once?)"
        )


def check_output(
    config: ScoreConfig, model_id: str, plan: Plan, manifest: dict
) -> tuple[dict[str, int], int]:
    """Check the final files the manifest names against the plan (module docstring), write
    ``patients.parquet``; return ({"scored": n, "errors": n}, patients). Streams the
    predictions in batches: memory holds one batch and the per-patient totals. Raises
    RuntimeError when a check fails."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    planned = dict(zip(plan.names, plan.rows, strict=True))
    held = {u: r for e in manifest[PREDICTIONS] for u, r in e["units"]}
    wrong = sorted(u for u in planned if held.get(u) != planned[u])
    if wrong or len(held) != len(planned):
        raise RuntimeError(
            f"{config.out}/{PREDICTIONS}: {len(wrong)} unit(s) with other rows than planned "
            f"(e.g. {wrong[:3]}); _SUCCESS not written"
        )
    files = manifest_files(config.out, manifest, PREDICTIONS)
    fs = storage.resolve(config.out)[0]
    dataset = pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")
    columns = [c for c in COLUMNS if c in dataset.schema.names]
    binary = "prob_malignant" in columns
    totals = PatientTotals()
    rows = scored = others = 0
    for batch in dataset.to_batches(columns=columns, batch_size=65_536):
        rows += batch.num_rows
        scored += batch.column("error").null_count  # null exactly when the tile scored
        others += batch.num_rows - pc.sum(pc.equal(batch["model_id"], model_id)).as_py()
        if binary:
            totals.add(batch)
    if rows != sum(plan.rows):
        raise RuntimeError(
            f"{config.out}/{PREDICTIONS}: {rows} rows for {sum(plan.rows)} input tiles; "
            "the output is inconsistent (was it written by two jobs at once?)"
        )
    if others:
        raise RuntimeError(
            f"{config.out}/{PREDICTIONS}: {others} row(s) scored by another model than "
            f"{model_id}; _SUCCESS not written (was the output written by two jobs at once?)"
        )
    for table, wanted, what in (
        (ATTRIBUTIONS, config.predict.method is not None, "maps"),
        (FEATURES, config.features, "embeddings"),
    ):
        held_rows, expected = count_rows(manifest, table), scored if wanted else 0
        if held_rows != expected:
            raise RuntimeError(
                f"{config.out}/{table}: {held_rows} {what} for {expected} scored tiles; "
                "_SUCCESS not written"
            )
    counts = {"scored": scored, "errors": rows - scored}
    patients_uri = storage.join(config.out, "patients.parquet")
    if not totals.by_patient:
        storage.delete(patients_uri)
        return counts, 0
    patients = totals.table(config.predict.threshold, config.patient_rule)
    storage.write_bytes(patients_uri, parquet_bytes(patients))
    return counts, patients.num_rows
