"""The one place a job connects to Ray.

Every job runs on whatever Ray cluster the process is connected to: the one ``ray job
submit`` puts it on (RAY_ADDRESS), one given with ``--ray-address``, or a local instance
started here when there is none. The jobs check their inputs first and connect only then,
so bad input fails in a second instead of after Ray's start-up.
"""

from __future__ import annotations


def ensure_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (None: RAY_ADDRESS, else a new local
    instance) unless this process is connected already. Returns None; raises what
    ``ray.init`` raises (e.g. ConnectionError for an address nobody answers)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, configure_logging=False)
