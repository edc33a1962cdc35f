"""The scoring job's output checked against its plan before ``_SUCCESS``.

What must hold for ``_SUCCESS``: every unit of the plan is there and no other unit file
(another job writing into the output, e.g. one that planned from a newer listing of a growing
input, would leave units outside this plan: duplicates under ``_SUCCESS``); the files hold one
row per input tile; every row carries the model id the job checked (rows are stamped by the
actors with the hash of the weights they loaded).
"""

from __future__ import annotations

from breakhis.score_output import unit_files
from breakhis.score_units import Plan


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
