"""Benchmark of sweeps: an N-trial sweep against the same N training runs one after another.

    breakhis benchmark tune --workdir bench-tune                       # 4 smallcnn trials, CPU
    breakhis benchmark tune --workdir bench-tune --trials 8 --max-concurrent-trials 2

Both sides train the same N configurations (a grid of N learning rates, every
other option equal) on the same generated tiles, in the same local Ray
instance, one side after the other:

1. **the training job**: ``breakhis.train.job.run_training`` N times in a row;
2. **the sweep**: ``breakhis.tune.job.run_sweep`` over the same N configurations,
   with the FIFO scheduler (no early stopping: both sides do the same work) and
   ``max_concurrent_trials`` trials at a time (default 1).

A one-epoch warm-up run comes first and is left out, so first-time costs
(imports in fresh workers, the page cache) fall on neither side. Figures: each
side's wall time and trials per hour, and the scheduler overhead per trial,
``(sweep wall - job wall) / N``. At one trial at a time that is what Tune adds
to every trial (the trial actor, result reporting, experiment state, the
leaderboard and the best-model copy at the end); with trials running side by
side it turns negative when the machine has room for them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from breakhis.benchmarks.harness import (
    device_name,
    prepared_data,
    prepared_dest,
    save_result,
    start_local_ray,
)
from breakhis.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneBenchmarkConfig:
    """Options of ``breakhis benchmark tune``."""

    workdir: str = "bench-tune"
    """Local folder for the generated data (reused between runs), the runs and the sweep."""
    trials: int = 4
    """Configurations (trials of the sweep, runs of the job)."""
    epochs: int = 2
    """Epochs of every run and trial."""
    arch: str = "smallcnn"
    """Model architecture."""
    image_size: int = 64
    """Model input side in pixels (the generated tiles have this size)."""
    batch_size: int = 32
    """Images per step."""
    scale: float = 0.05
    """Size of the generated data set (fraction of BreakHis' 7,909 images; 0.05 ~ 400)."""
    num_workers: int = 1
    """Ray Train workers per run and per trial."""
    gpus_per_trial: float = 0.0
    """GPUs of each run and trial (a fraction shares one GPU between trials)."""
    max_concurrent_trials: int = 1
    """Trials of the sweep at once (1 measures the overhead alone)."""
    cpus: int = 0
    """CPUs of the local Ray instance the benchmark starts; 0: this machine's, or what
    the concurrent trials reserve if that is more."""
    seed: int = 0
    """Seed of the data, the splits and the models' initialisation."""

    def __post_init__(self) -> None:
        for name in ("trials", "epochs", "num_workers", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.gpus_per_trial < 0:
            raise ValueError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if self.cpus < 0:
            raise ValueError(f"--cpus must be >= 0, got {self.cpus}")

    def learning_rates(self) -> list[float]:
        """The N configurations: learning rates spread evenly in log scale over 1e-3..1e-2."""
        rates = np.geomspace(1e-3, 1e-2, self.trials) if self.trials > 1 else [3e-3]
        return [float(f"{rate:.3g}") for rate in rates]


@dataclass(frozen=True)
class TuneBenchmarkResult:
    """What ``breakhis benchmark tune`` measured."""

    date: str
    device: str
    config: dict
    train_images: int
    """Training images per epoch."""
    job_run_s: list[float] = field(default_factory=list)
    """Wall time of each run of the training job, seconds."""
    job_wall_s: float = 0.0
    """Wall time of the N runs one after another."""
    sweep_wall_s: float = 0.0
    """Wall time of run_sweep (Tune's set-up, the trials, leaderboard and best copy)."""
    warmup_s: float = 0.0
    """The left-out warm-up run."""

    @property
    def trials(self) -> int:
        return self.config["trials"]

    @property
    def job_trials_per_hour(self) -> float:
        return 3600.0 * self.trials / self.job_wall_s

    @property
    def sweep_trials_per_hour(self) -> float:
        return 3600.0 * self.trials / self.sweep_wall_s

    @property
    def overhead_per_trial_s(self) -> float:
        """(sweep wall - job wall) / N: what the sweep adds to each trial."""
        return (self.sweep_wall_s - self.job_wall_s) / self.trials

    def format_table(self) -> str:
        """Markdown for the README."""
        c = self.config
        at_once = c["max_concurrent_trials"]
        return "\n".join(
            [
                f"Tune benchmark, {self.date}, {self.device}; {self.trials} configurations of "
                f"{c['arch']} at {c['image_size']} px, {c['epochs']} epochs of "
                f"{self.train_images} training images, batch {c['batch_size']}, "
                f"{c['num_workers']} Train worker(s)"
                + (f" and {c['gpus_per_trial']:g} GPU(s)" if c["gpus_per_trial"] else "")
                + " per run",
                "",
                "| | wall, s | trials/hour |",
                "|---|---:|---:|",
                f"| training job, {self.trials} runs one after another | {self.job_wall_s:.1f} "
                f"| {self.job_trials_per_hour:.1f} |",
                f"| sweep: Ray Tune (FIFO, {at_once} at a time) driving Train V2 "
                f"| {self.sweep_wall_s:.1f} | {self.sweep_trials_per_hour:.1f} |",
                "",
                f"Scheduler overhead per trial: {self.overhead_per_trial_s:+.1f} s "
                f"((sweep - job) / {self.trials}; one run of the job takes "
                f"{statistics.median(self.job_run_s):.1f} s, median). Warm-up run left out: "
                f"{self.warmup_s:.1f} s.",
            ]
        )

    def to_dict(self) -> dict:
        """Measurements and derived figures, for JSON."""
        out = asdict(self)
        out.update(
            job_trials_per_hour=self.job_trials_per_hour,
            sweep_trials_per_hour=self.sweep_trials_per_hour,
            overhead_per_trial_s=self.overhead_per_trial_s,
        )
        return out


def run_tune_benchmark(config: TuneBenchmarkConfig) -> TuneBenchmarkResult:
    """Run both sides (module docstring); write ``benchmark-tune.json`` and
    ``benchmark-tune.md`` into the workdir and return the result.

    Starts a local Ray instance (``cpus`` CPUs) unless Ray is already initialised.
    Raises ValueError for bad options and whatever a run or the sweep raises.
    """
    import ray

    from breakhis.train.job import run_training
    from breakhis.tune.job import SweepConfig, run_sweep
    from breakhis.tune.search_space import parse_search_space

    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    root = os.path.join(workdir, time.strftime("%Y%m%d-%H%M%S"))
    workers = config.num_workers
    base = _base_run(config, workdir, root)
    rates = config.learning_rates()
    sweep = SweepConfig(
        train=dataclasses.replace(base, storage=root, name="sweep"),
        search_space=parse_search_space({"lr": {"grid": rates}}, "benchmark grid"),
        num_samples=1,
        gpus_per_trial=config.gpus_per_trial,
        workers_per_trial=workers,
        max_concurrent_trials=config.max_concurrent_trials,
        scheduler="fifo",
        progress=0,
    )
    if not ray.is_initialized():
        # Ray's CPUs are reservations: the sweep's trials need room for their driver, their
        # workers and a data task each, even where that is more than this machine's cores.
        needed = math.ceil(sweep.trial_request()["CPU"] * config.max_concurrent_trials)
        cpus = config.cpus or max(os.cpu_count() or 1, needed)
        start_local_ray(cpus)
    prepared_data(workdir, scale=config.scale, side=config.image_size, seed=config.seed)
    gpus_per_worker = config.gpus_per_trial / workers or None

    started = time.perf_counter()
    warmup = run_training(dataclasses.replace(base, epochs=1), gpus_per_worker=gpus_per_worker)
    warmup_s = time.perf_counter() - started

    job_run_s, job_wall = _one_after_another(base, rates, gpus_per_worker)

    started = time.perf_counter()
    swept = run_sweep(sweep)
    sweep_wall = time.perf_counter() - started
    if len(swept.rows) != len(rates) or any(r["epochs_run"] != config.epochs for r in swept.rows):
        raise RuntimeError(f"the sweep did not run {len(rates)} full trials: {swept.rows}")

    result = TuneBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(math.ceil(config.gpus_per_trial * config.max_concurrent_trials)),
        config=asdict(config),
        train_images=int(warmup.history[0]["train_images"]),
        job_run_s=job_run_s,
        job_wall_s=job_wall,
        sweep_wall_s=sweep_wall,
        warmup_s=warmup_s,
    )
    save_result(workdir, "tune", result.to_dict(), result.format_table())
    return result


def _base_run(config: TuneBenchmarkConfig, workdir: str, root: str) -> TrainConfig:
    """The training run both sides repeat (one per learning rate): no pretrained weights, no
    augmentation or early stop, a fifth of the patients for validation (the sweep needs it)."""
    return TrainConfig(
        data=prepared_dest(workdir, scale=config.scale, side=config.image_size, seed=config.seed),
        storage=os.path.join(root, "job"),
        name="warmup",
        arch=config.arch,
        weights="none",
        freeze_epochs=0,
        image_size=config.image_size,
        augment_strength=0.0,
        epochs=config.epochs,
        batch_size=config.batch_size,
        warmup_epochs=0.0,
        patience=0,
        val_fraction=0.2,
        num_workers=config.num_workers,
        use_gpu=config.gpus_per_trial > 0,
        max_failures=0,
        seed=config.seed,
    )


def _one_after_another(
    base: TrainConfig, rates: list[float], gpus_per_worker: float | None
) -> tuple[list[float], float]:
    """The job's side: one training run per learning rate, one after another; returns each
    run's seconds and the wall time of them all."""
    from breakhis.train.job import run_training

    run_s = []
    started_all = time.perf_counter()
    for i, lr in enumerate(rates):
        started = time.perf_counter()
        run_training(
            dataclasses.replace(base, name=f"run-{i}", lr=lr), gpus_per_worker=gpus_per_worker
        )
        run_s.append(time.perf_counter() - started)
        log.info("job run %d/%d (lr %g): %.1f s", i + 1, len(rates), lr, run_s[-1])
    return run_s, time.perf_counter() - started_all
