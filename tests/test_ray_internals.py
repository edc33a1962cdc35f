"""The private Ray APIs of breakhis.ray_internals against a live Ray: a Ray upgrade that
renames or changes one fails here, by name, instead of silently skipping the clean-up
that depends on it (orphaned_placement_groups() swallows errors on purpose)."""

from __future__ import annotations

import pytest

from breakhis.ray_internals import (
    orphaned_placement_groups,
    placement_group_table,
    release_orphaned_placement_groups,
)


@pytest.mark.ray
def test_the_placement_group_table_shows_creators_and_orphans_are_released(ray_local) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Owner:
        def make(self) -> str:
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            return group.id.hex()

    # The driver's own group: never an orphan (no creator actor).
    mine = placement_group([{"CPU": 0.01}])
    ray.get(mine.ready())
    owner = Owner.remote()
    orphan = ray.get(owner.make.remote())
    rows = {row.placement_group_id.hex(): row for row in placement_group_table()}
    assert mine.id.hex() in rows and orphan in rows
    job = ray.get_runtime_context().get_job_id()
    assert rows[orphan].creator_job_id.hex() == job and not rows[orphan].creator_actor_dead

    assert orphan not in orphaned_placement_groups()  # its creator lives
    ray.kill(owner)
    for _ in range(100):  # the GCS marks the creator dead shortly after
        if orphan in orphaned_placement_groups():
            break
        ray.get(ray.remote(lambda: None).remote())
    assert orphaned_placement_groups() == [orphan]
    assert release_orphaned_placement_groups() == 1
    assert orphaned_placement_groups() == []
    assert mine.id.hex() not in orphaned_placement_groups()
    remove_placement_group(mine)
