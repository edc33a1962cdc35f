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

The terminal shows each step's header, a progress line and the summary of what it
produced; everything else that Ray, Tune and the jobs print or log goes to
``<workdir>/demo.log``. What the demo made is kept in ``--workdir`` (the embedded S3
server's data goes with the server): ``prepared/`` (manifest and rejects), ``model/``
(the artifact, curves beside it), ``sweep/`` (leaderboard), ``scores/`` (the scored
tiles' Parquet and the patient summary), ``report/`` and ``mlflow.db`` (every training
run and sweep trial: ``mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db``).

``--data s3://...`` is read with your own S3 settings (AWS_* variables, profile or
role): the data is copied into a temporary folder under ``--workdir`` before the
embedded server starts, since from then on every s3:// URI of this process and of
Ray's workers goes to the embedded server. The copy is removed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TextIO, TypeVar

import numpy as np

log = logging.getLogger(__name__)

BUCKET = "breakhis"
LOG_FILE = "demo.log"
"""In --workdir: everything Ray, Tune and the jobs print or log during the demo."""
T = TypeVar("T")


@dataclass(frozen=True)
class DemoConfig:
    """Options of the demo."""

    data: str | None = None
    """A real BreakHis root (local or s3://) to use instead of generated data; s3:// is
    read with your AWS settings (copied under --workdir first, removed at the end)."""
    workdir: str = "demo-output"
    """Local folder that keeps what the demo made (prepared manifest, model, leaderboard,
    scores, report, MLflow runs) and its log."""
    epochs: int = 6
    """Training epochs of the demo model."""
    image_size: int = 64
    """Side of the demo model's input in pixels (small, so the demo runs on 2 CPUs)."""
    scale: float = 0.05
    """Size of the generated data set, as a fraction of the real per-subtype counts."""
    trials: int = 3
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


@contextlib.contextmanager
def console_to_log(path: str) -> Iterator[TextIO]:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so Ray's
    processes started from here, C extensions and every logging handler too) at the file
    ``path`` while the block runs; yield a stream on the original stdout for the lines
    meant for the user. Both are restored on exit, before an exception propagates."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    with open(path, "a", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.close()


class Steps:
    """The demo's terminal: a header per step, a progress line while it runs (redrawn in
    place on a terminal, a line every ``every`` seconds otherwise) and its summary."""

    def __init__(self, console: TextIO, total: int, every: float = 60.0) -> None:
        self.console = console
        self.total = total
        self.every = every
        self.tty = console.isatty()

    def say(self, text: str = "") -> None:
        """Print ``text`` to the user."""
        self.console.write(text + "\n")
        self.console.flush()

    def run(self, number: int, title: str, fn: Callable[[], T]) -> T:
        """Show the header, run ``fn`` with a progress line, return its result."""
        self.say(f"\n=== {number}/{self.total} {title} ===")
        done = threading.Event()
        started = time.monotonic()

        def tick() -> None:
            shown = 0.0
            while not done.wait(1.0):
                elapsed = time.monotonic() - started
                if self.tty:
                    self.console.write(f"\r  running ... {elapsed:4.0f} s")
                    self.console.flush()
                elif elapsed - shown >= self.every:
                    shown = elapsed
                    self.say(f"  running ... {elapsed:.0f} s")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            return fn()
        finally:
            done.set()
            ticker.join()
            if self.tty:
                self.console.write("\r\033[K")
            self.say(f"  ({time.monotonic() - started:.0f} s)")


def keep(uri: str, folder: str) -> str:
    """Copy the file or folder ``uri`` (the embedded server's) into the local ``folder``,
    which outlives the server: a file as ``folder/<name>``, a folder's files at their
    paths below it. Returns ``folder``."""
    from breakhis import storage

    root = uri.rstrip("/")
    for entry in storage.walk(root):
        relative = entry.uri[len(root) + 1 :] or entry.uri.rsplit("/", 1)[-1]
        target = os.path.join(folder, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(storage.read_bytes(entry.uri))
    return folder


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
    """Run every step of the pipeline, showing what each produced; keep the outputs in
    ``config.workdir``, the rest of the output in its demo.log.

    Raises whatever a step raises; the embedded S3 server and Ray are stopped
    in every case.
    """
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, LOG_FILE)
    with local_data(config.data, workdir) as data, console_to_log(log_path) as console:
        steps = Steps(console, total=6)
        steps.say(f"breakhis demo: Ray's and the jobs' own output goes to {log_path}")
        _run_steps(replace(config, data=data, workdir=workdir), steps, shown=config.data)
        _show_outputs(steps, workdir, config.workdir)


def _show_outputs(steps: Steps, workdir: str, shown: str) -> None:
    """The demo's last lines: what it kept and how to open each."""
    scores = os.path.join(shown, "scores", "predictions")
    steps.say(f"\ndemo finished; kept in {workdir}:")
    for name, how in (
        ("report", f"{shown}/report/report.html (open it in a browser)"),
        ("scores", f"python -c \"import pandas as pd; print(pd.read_parquet('{scores}'))\""),
        ("model", f"{shown}/model (breakhis score --model {shown}/model --input DIR --out OUT)"),
        ("sweep", f"{shown}/sweep/leaderboard.csv"),
        ("prepared", f"{shown}/prepared/manifest.parquet and rejects.parquet"),
        ("runs", f"mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db"),
        ("log", f"{shown}/{LOG_FILE}"),
    ):
        steps.say(f"  {name:<9} {how}")


def _run_steps(config: DemoConfig, steps: Steps, shown: str | None) -> None:
    """The six steps, on an embedded S3 server and a local Ray instance (both stopped
    at the end, whatever happens)."""
    import ray

    from breakhis.dev.s3server import embedded_s3

    with embedded_s3(buckets=(BUCKET,)) as server:
        steps.say(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, pid {server.pid}")
        # Ray starts after the server so that its workers inherit the AWS_* variables.
        _start_ray(steps)
        try:
            src = _step_data(config, steps, shown)
            dest = _step_prepare(config, steps, src)
            train, trained = _step_train(config, steps, dest)
            if config.trials:
                _step_sweep(config, steps, train)
            else:
                steps.say("\n=== 4/6 sweep skipped (--trials 0) ===")
            _step_score(config, steps, trained.artifact_uri, src)
            _step_evaluate(config, steps, trained.artifact_uri, dest)
        finally:
            ray.shutdown()


def _start_ray(steps: Steps) -> None:
    import ray
    import ray.data

    # Logical CPUs beyond the cores: the two training workers hold one each, and Ray
    # Data needs CPUs of its own to feed them, or the pipeline waits for ever.
    context = ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    steps.say(f"Ray's worker logs: {context.address_info['session_dir']}/logs")
    ray.data.DataContext.get_current().enable_progress_bars = False


def _step_data(config: DemoConfig, steps: Steps, shown: str | None) -> str:
    """Step 1: the user's data, or generated data with a few bad files. Returns its root."""
    from breakhis.synth.dataset import corrupt_files, synthesize

    if config.data:
        src = config.data
        steps.say(f"\n=== 1/6 data: using {shown}" + (f" ({src})" if src != shown else "") + " ===")
        return src
    src = f"s3://{BUCKET}/raw"

    def generate() -> str:
        summary = synthesize(src, scale=config.scale, seed=config.seed)
        bad = corrupt_files(src, seed=config.seed)
        return (
            summary.format_table()
            + f"\nadded {len(bad)} deliberately bad files: "
            + ", ".join(f"{u.rsplit('/', 1)[-1]} ({k})" for u, k in bad.items())
        )

    steps.say(steps.run(1, f"generating BreakHis-shaped data into {src}", generate))
    return src


def _step_prepare(config: DemoConfig, steps: Steps, src: str) -> str:
    """Step 2: prepare; keeps the manifest and rejects. Returns DEST."""
    from breakhis.data.prepare import PrepareConfig, prepare

    dest = f"s3://{BUCKET}/prepared"
    prepared = steps.run(
        2,
        f"prepare {src} -> {dest}",
        lambda: prepare(PrepareConfig(src=src, dest=dest, seed=config.seed)),
    )
    for name in ("manifest.parquet", "rejects.parquet"):
        keep(f"{dest}/{name}", os.path.join(config.workdir, "prepared"))
    steps.say(prepared.format_table())
    return dest


def _step_train(config: DemoConfig, steps: Steps, dest: str) -> tuple[Any, Any]:
    """Step 3: train on fold 0; keeps the model and curves. Returns (TrainConfig,
    TrainResult)."""
    from breakhis.train.config import TrainConfig
    from breakhis.train.job import run_training

    workdir = config.workdir
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
        # Validation curves for the tour (the sweep ranks on them too); the decision stays
        # argmax (the default threshold rule).
        val_fraction=0.2,
        metric="val_balanced_accuracy",
        patience=0,
        num_workers=2,
        seed=config.seed,
        tracking_uri=f"sqlite:///{os.path.join(workdir, 'mlflow.db')}",
    )
    trained = steps.run(
        3, "train a small CNN on fold 0 (Ray Train, 2 CPU workers)", lambda: run_training(train)
    )
    keep(trained.artifact_uri, os.path.join(workdir, "model"))
    for name in ("curves.png", "curves.json"):
        keep(f"{trained.run_uri}/{name}", os.path.join(workdir, "model"))
    steps.say(trained.format_table())
    return train, trained


def _step_sweep(config: DemoConfig, steps: Steps, train: Any) -> None:
    """Step 4: sweep the learning rate; keeps the leaderboard."""
    from breakhis.tune.config import SweepConfig
    from breakhis.tune.job import run_sweep
    from breakhis.tune.search_space import parse_search_space

    sweeps = f"s3://{BUCKET}/sweeps"
    # Highest rate first: the trials run one at a time here, and ASHA stops a
    # trial at a rung only behind ones that reached it before (small rates learn
    # least in 3 epochs, so they arrive last and are stopped). Ranked by ROC-AUC:
    # after one epoch every model may still call one class at the 0.5 threshold
    # (balanced accuracy 0.5 for all, seen 2026-11-27), and ASHA cannot stop a
    # trial that ties the rung's cutoff; the ranking separates them.
    rates = [float(f"{r:.2g}") for r in np.geomspace(1e-2, 3e-4, config.trials)]
    sweep = SweepConfig(
        train=replace(train, storage=sweeps, epochs=3, num_workers=1, metric="val_roc_auc"),
        search_space=parse_search_space({"lr": {"grid": rates}}, "demo"),
        num_samples=1,
        workers_per_trial=1,
        progress=0,
    )
    swept = steps.run(
        4,
        f"sweep the learning rate, {config.trials} trials with ASHA (Ray Tune "
        f"driving Train V2) -> {sweeps}/demo",
        lambda: run_sweep(sweep),
    )
    for name in ("leaderboard.parquet", "leaderboard.csv"):
        keep(
            f"{swept.leaderboard_uri.rsplit('/', 1)[0]}/{name}",
            os.path.join(config.workdir, "sweep"),
        )
    steps.say(swept.format_table())


def _step_score(config: DemoConfig, steps: Steps, model: str, src: str) -> None:
    """Step 5: score every raw tile with Grad-CAM; keeps the scores."""
    from breakhis.score.job import ScoreConfig, run_scoring

    scores = f"s3://{BUCKET}/scores"
    scored = steps.run(
        5,
        f"score every raw tile with Grad-CAM -> {scores}",
        lambda: run_scoring(ScoreConfig(model=model, input=src, out=scores)),
    )
    keep(scores, os.path.join(config.workdir, "scores"))
    steps.say(scored.format_table())


def _step_evaluate(config: DemoConfig, steps: Steps, model: str, dest: str) -> None:
    """Step 6: evaluate on the held-out patients of fold 0, writing the report."""
    from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
    from breakhis.evaluate.job import run_evaluation

    report = os.path.join(config.workdir, "report")
    evaluation = steps.run(
        6,
        f"evaluate on the held-out patients of fold 0 -> {report}",
        lambda: run_evaluation(
            EvaluateConfig(
                model=model, data=dest, out=report, options=EvaluateOptions(bootstrap=200)
            )
        ),
    )
    steps.say(evaluation.format_table())
