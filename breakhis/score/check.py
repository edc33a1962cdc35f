"""The scoring job's output checked against its plan before ``_SUCCESS``, and its patient
summary (``patients.parquet``) computed on the way.

What must hold for ``_SUCCESS``: every unit of the plan is there and no other unit file
(another job writing into the output, e.g. one that planned from a newer listing of a growing
input, would leave units outside this plan: duplicates under ``_SUCCESS``); the files hold one
row per input tile; every row carries the model id the job checked (rows are stamped by the
actors with the hash of the weights they loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from breakhis import storage
from breakhis.score.output import PatientTotals, unit_files
from breakhis.score.units import Plan, parquet_bytes

if TYPE_CHECKING:
    from breakhis.score.config import ScoreConfig

COLUMNS = ("patient_id", "label", "prob_malignant", "predicted_label", "error", "model_id")


def check_units(tiles_uri: str, plan: Plan) -> None:
    """Raise RuntimeError when ``tiles_uri`` holds a unit file outside ``plan``, or lacks
    one of it."""
    there, planned = unit_files(tiles_uri), set(plan.names)
    foreign, missing = sorted(there - planned), sorted(planned - there)
    if foreign:
        raise RuntimeError(
            f"{tiles_uri}: {len(foreign)} unit file(s) outside this job's plan (e.g. "
            f"{foreign[:3]}): another job wrote into the output; _SUCCESS not written. "
            "Rerun once no other job runs on it: the rerun deletes them"
        )
    if missing:
        raise RuntimeError(
            f"{tiles_uri}: {len(missing)} unit file(s) of the plan missing (e.g. "
            f"{missing[:3]}); _SUCCESS not written (was it written by two jobs at once?)"
        )


def check_output(config: ScoreConfig, model_id: str, plan: Plan) -> tuple[dict[str, int], int]:
    """Check the output against the plan (module docstring), write ``patients.parquet``;
    return ({"scored": n, "errors": n}, patients). Streams the unit files in batches: memory
    holds one batch and the per-patient totals. Raises RuntimeError when a check fails."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    tiles_uri = storage.join(config.out, "tiles")
    check_units(tiles_uri, plan)
    fs, path = storage.resolve(tiles_uri)
    files = [f"{path}/{name}" for name in plan.names]
    totals = PatientTotals()
    rows = scored = others = 0
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(columns=list(COLUMNS), batch_size=65_536):
        rows += batch.num_rows
        scored += batch.column("error").null_count  # null exactly when the tile scored
        others += batch.num_rows - pc.sum(pc.equal(batch["model_id"], model_id)).as_py()
        totals.add(batch)
    if rows != sum(plan.rows):
        raise RuntimeError(
            f"{tiles_uri}: {rows} rows for {sum(plan.rows)} input tiles; "
            "the output is inconsistent (was it written by two jobs at once?)"
        )
    if others:
        raise RuntimeError(
            f"{tiles_uri}: {others} row(s) scored by another model than {model_id}; "
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
