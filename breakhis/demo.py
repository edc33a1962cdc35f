"""``make demo``: the whole pipeline end to end on embedded defaults.

A local Ray instance, the embedded SeaweedFS S3 server on 127.0.0.1, and a
generated BreakHis-shaped data set (or the real one with ``--data``):

1. generate data into ``s3://breakhis/raw`` (skipped with ``--data``);
2. prepare it into ``s3://breakhis/prepared`` (shards, manifest, rejects),
   with a few deliberately corrupt files that the job must record and skip.

Each step prints what it produced. Local outputs go under ``--workdir``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

BUCKET = "breakhis"


@dataclass(frozen=True)
class DemoConfig:
    """Options of the demo."""

    data: str | None = None
    """A real BreakHis root (local or s3://) to use instead of generated data."""
    workdir: str = "demo-output"
    """Local folder for the outputs that outlive the embedded S3 server (report, scores)."""
    scale: float = 0.05
    """Size of the generated data set, as a fraction of the real per-subtype counts."""
    seed: int = 0
    """Seed of the data, the splits and training."""

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"--scale must be > 0, got {self.scale}")
        if self.data and not self.data.startswith("s3://") and not os.path.isdir(self.data):
            raise FileNotFoundError(f"--data {self.data}: no such folder")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(config: DemoConfig) -> None:
    """Run every step of the pipeline that exists, printing what each produced.

    Raises whatever a step raises; the embedded S3 server and Ray are stopped
    in every case.
    """
    import ray

    from breakhis.prepare import PrepareConfig, prepare
    from breakhis.s3server import embedded_s3
    from breakhis.synth import corrupt_files, synthesize

    os.makedirs(config.workdir, exist_ok=True)
    with embedded_s3(buckets=(BUCKET,)) as server:
        print(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, pid {server.pid}")
        # Ray starts after the server so that its workers inherit the AWS_* variables.
        ray.init(address="local", include_dashboard=False, configure_logging=False)
        try:
            if config.data:
                src = config.data
                _banner(f"1/2 data: using {src}")
            else:
                src = f"s3://{BUCKET}/raw"
                _banner(f"1/2 generating BreakHis-shaped data into {src}")
                summary = synthesize(src, scale=config.scale, seed=config.seed)
                print(summary.format_table())
                bad = corrupt_files(src, seed=config.seed)
                print(
                    f"added {len(bad)} deliberately bad files: "
                    + ", ".join(f"{u.rsplit('/', 1)[-1]} ({k})" for u, k in bad.items())
                )
            dest = f"s3://{BUCKET}/prepared"
            _banner(f"2/2 prepare {src} -> {dest}")
            print(prepare(PrepareConfig(src=src, dest=dest, seed=config.seed)).format_table())
        finally:
            ray.shutdown()
    print(f"\ndemo finished; local outputs in {os.path.abspath(config.workdir)}")
