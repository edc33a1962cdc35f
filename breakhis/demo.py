"""``make demo``: the whole pipeline end to end on embedded defaults.

A local Ray instance, the embedded SeaweedFS S3 server on 127.0.0.1, and a
generated BreakHis-shaped data set (or the real one with ``--data``):

1. generate data into ``s3://breakhis/raw`` (skipped with ``--data``),
   with a few deliberately corrupt files that the jobs must record and skip;
2. prepare it into ``s3://breakhis/prepared`` (shards, manifest, rejects);
3. train a small CNN on fold 0 with Ray Train (2 CPU workers, DDP), checkpoints
   and the model artifact in ``s3://breakhis/runs/demo``;
4. sweep the learning rate of the same model with Ray Tune driving Train V2 (ASHA stops
   the weak trials early) into ``s3://breakhis/sweeps/demo``: leaderboard and best model;
5. score the raw tiles (corrupt ones included) with Grad-CAM maps into
   ``s3://breakhis/scores`` as Parquet;
6. evaluate the model on its held-out patients: ``<workdir>/report/report.html``.

Each step prints what it produced. Local outputs go under ``--workdir``.

``--data s3://...`` is read with your own S3 settings (AWS_* variables, profile or
role): the data is copied into a temporary folder under ``--workdir`` before the
embedded server starts, since from then on every s3:// URI of this process and of
Ray's workers goes to the embedded server. The copy is removed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

log = logging.getLogger(__name__)

BUCKET = "breakhis"


@dataclass(frozen=True)
class DemoConfig:
    """Options of the demo."""

    data: str | None = None
    """A real BreakHis root (local or s3://) to use instead of generated data; s3:// is
    read with your AWS settings (copied under --workdir first, removed at the end)."""
    workdir: str = "demo-output"
    """Local folder for the outputs that outlive the embedded S3 server (report, scores)."""
    epochs: int = 6
    """Training epochs of the demo model."""
    image_size: int = 64
    """Side of the demo model's input in pixels (small, so the demo runs on 2 CPUs)."""
    scale: float = 0.05
    """Size of the generated data set, as a fraction of the real per-subtype counts."""
    trials: int = 4
    """Trials of the demo's learning-rate sweep (3 epochs each); 0 skips the sweep."""
    seed: int = 0
    """Seed of the data, the splits and training."""

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"--scale must be > 0, got {self.scale}")
        if self.trials < 0:
            raise ValueError(f"--trials must be >= 0, got {self.trials}")
        if self.data and not self.data.startswith("s3://") and not os.path.isdir(self.data):
            raise FileNotFoundError(f"--data {self.data}: no such folder")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


@contextlib.contextmanager
def local_data(data: str | None, workdir: str) -> Iterator[str | None]:
    """``data`` where the demo can read it once the embedded S3 server has replaced the
    caller's S3 settings: a local path or None as given; an s3:// tree copied, with the
    caller's settings (read now, before that server starts), into a temporary folder
    under ``workdir`` that is removed on exit. Yields the path to read.

    Raises S3UnreachableError when the endpoint does not answer and FileNotFoundError
    when nothing is at ``data``.
    """
    import pyarrow.fs as pafs

    from breakhis import storage

    if not data or not storage.is_s3(data):
        yield data
        return
    storage.check_reachable(data)
    if not storage.exists(data):
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="s3-data-", dir=workdir) as folder:
        fs, path = storage.resolve(data)
        print(f"copying {data} into {folder} (with your S3 settings)", flush=True)
        pafs.copy_files(
            path, folder, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        yield folder


def run_demo(config: DemoConfig) -> None:
    """Run every step of the pipeline that exists, printing what each produced.

    Raises whatever a step raises; the embedded S3 server and Ray are stopped
    in every case.
    """
    os.makedirs(config.workdir, exist_ok=True)
    with local_data(config.data, config.workdir) as data:
        _run_steps(replace(config, data=data), shown=config.data)
    print(f"\ndemo finished; local outputs in {os.path.abspath(config.workdir)}")


def _run_steps(config: DemoConfig, shown: str | None) -> None:
    import ray

    from breakhis.evaluate import EvaluateConfig, EvaluateOptions, run_evaluation
    from breakhis.prepare import PrepareConfig, prepare
    from breakhis.s3server import embedded_s3
    from breakhis.score import ScoreConfig, run_scoring
    from breakhis.synth import corrupt_files, synthesize
    from breakhis.train import TrainConfig, run_training
    from breakhis.tune import SweepConfig, parse_search_space, run_sweep

    with embedded_s3(buckets=(BUCKET,)) as server:
        print(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, pid {server.pid}")
        # Ray starts after the server so that its workers inherit the AWS_* variables.
        # Logical CPUs beyond the cores: the two training workers hold one each, and Ray
        # Data needs CPUs of its own to feed them, or the pipeline waits for ever.
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            configure_logging=False,
        )
        try:
            if config.data:
                src = config.data
                _banner(f"1/6 data: using {shown}" + (f" ({src})" if src != shown else ""))
            else:
                src = f"s3://{BUCKET}/raw"
                _banner(f"1/6 generating BreakHis-shaped data into {src}")
                summary = synthesize(src, scale=config.scale, seed=config.seed)
                print(summary.format_table())
                bad = corrupt_files(src, seed=config.seed)
                print(
                    f"added {len(bad)} deliberately bad files: "
                    + ", ".join(f"{u.rsplit('/', 1)[-1]} ({k})" for u, k in bad.items())
                )
            dest = f"s3://{BUCKET}/prepared"
            _banner(f"2/6 prepare {src} -> {dest}")
            print(prepare(PrepareConfig(src=src, dest=dest, seed=config.seed)).format_table())

            _banner("3/6 train a small CNN on fold 0 (Ray Train, 2 CPU workers)")
            train = TrainConfig(
                data=dest,
                storage=f"s3://{BUCKET}/runs",
                name="demo",
                split="fold:0",
                arch="smallcnn",
                weights="none",
                image_size=config.image_size,
                epochs=config.epochs,
                batch_size=32,
                lr=3e-3,
                freeze_epochs=0,
                metric="val_balanced_accuracy",
                patience=0,
                num_workers=2,
                seed=config.seed,
            )
            trained = run_training(train)
            print(trained.format_table())

            if config.trials:
                sweeps = f"s3://{BUCKET}/sweeps"
                _banner(
                    f"4/6 sweep the learning rate, {config.trials} trials with ASHA (Ray Tune "
                    f"driving Train V2) -> {sweeps}/demo"
                )
                # Highest rate first: the trials run one at a time here, and ASHA stops a
                # trial at a rung only behind ones that reached it before (small rates learn
                # least in 3 epochs, so they arrive last and are stopped). Ranked by ROC-AUC:
                # after one epoch every model may still call one class at the 0.5 threshold
                # (balanced accuracy 0.5 for all, seen 2026-11-27), and ASHA cannot stop a
                # trial that ties the rung's cutoff; the ranking separates them.
                rates = [float(f"{r:.2g}") for r in np.geomspace(1e-2, 3e-4, config.trials)]
                swept = run_sweep(
                    SweepConfig(
                        train=replace(
                            train, storage=sweeps, epochs=3, num_workers=1, metric="val_roc_auc"
                        ),
                        search_space=parse_search_space({"lr": {"grid": rates}}, "demo"),
                        num_samples=1,
                        workers_per_trial=1,
                        progress=0,
                    )
                )
                print(swept.format_table())
            else:
                _banner("4/6 sweep skipped (--trials 0)")

            scores = f"s3://{BUCKET}/scores"
            _banner(f"5/6 score every raw tile with Grad-CAM -> {scores}")
            print(
                run_scoring(
                    ScoreConfig(model=trained.artifact_uri, input=src, output=scores)
                ).format_table()
            )

            report = os.path.join(os.path.abspath(config.workdir), "report")
            _banner(f"6/6 evaluate on the held-out patients of fold 0 -> {report}")
            evaluation = run_evaluation(
                EvaluateConfig(
                    model=trained.artifact_uri,
                    data=dest,
                    out=report,
                    options=EvaluateOptions(bootstrap=200),
                )
            )
            print(evaluation.format_table())
        finally:
            ray.shutdown()
