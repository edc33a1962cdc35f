"""Private Ray APIs the package needs, in one place, each with why and until when.

Every use of ``ray._private`` (or of another non-public Ray name) lives here, so a Ray
upgrade has one file to check; tests/test_ray_internals.py calls each against a live Ray
and fails loudly when an upgrade renames or changes one.

- ``ray._private.state.state._connect_and_get_accessor().get_placement_group_table()``
  (Ray 2.60): the GCS placement-group table with each group's creator actor and whether
  it died; the public ``ray.util.placement_group_table()`` leaves the creator out. Works
  around placement groups that outlive their Train run: Tune ends a stopped trial's actor
  (an ASHA stop), which takes the trial's Train V2 controller with it before it removes
  its workers' placement group. Train V2's own PlacementGroupCleaner
  (ray-project/ray#58515) asks the State API whether the controller lives; without a
  dashboard, or with another Ray's dashboard on the same port, it gets no answer and
  either never cleans up or, treating "not found" as dead (see ray-project/ray#65447's
  review), removes a live run's group. Drop this when the cleaner is reliable.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def placement_group_table() -> list[Any]:
    """Every placement group Ray's GCS knows, as ``gcs_pb2.PlacementGroupTableData``
    messages. Raises whatever the private accessor raises (e.g. AttributeError after a
    Ray upgrade that changed it)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = state._connect_and_get_accessor().get_placement_group_table()
    return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in table]


def orphaned_placement_groups() -> list[str]:
    """Ids (hex) of this job's placement groups whose creating actor has died.

    Nothing can use such a group any more, yet Ray keeps it (and the CPUs and
    GPUs it reserves) until the job ends. Returns an empty list, with a warning, when
    the placement-group table cannot be read (never fails a sweep).
    """
    import ray
    from ray.core.generated import gcs_pb2

    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    job = ray.get_runtime_context().get_job_id()
    no_actor = ray.ActorID.nil().binary()  # groups the driver itself created
    try:
        rows = placement_group_table()
    except Exception as err:  # a private API: never let it fail a sweep
        log.warning("cannot read the placement-group table (%s); skipping the clean-up", err)
        return []
    return [
        row.placement_group_id.hex()
        for row in rows
        if row.state != removed
        and not row.is_detached
        and row.creator_job_id.hex() == job
        and row.creator_actor_id != no_actor
        and row.creator_actor_dead
    ]


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups orphaned_placement_groups() finds. Returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup

    orphans = orphaned_placement_groups()
    for pg_id in orphans:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        log.info("released placement group %s of a stopped trial's Train run", pg_id)
    return len(orphans)
