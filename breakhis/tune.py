"""Hyperparameter sweeps: every trial is a full training run (Ray Train V2 inside Ray Tune).

    breakhis tune --data s3://bucket/breakhis-prepared --storage s3://bucket/sweeps \\
        --name rn50-sweep --search-space cluster/search_space.yaml --num-samples 32 \\
        --gpus-per-trial 1
    ray job submit --working-dir . -- python jobs/tune.py ... (same options)

How it runs, in reading order:

1. ``run_sweep`` checks the search space against the sweep's training options
   before any trial starts (every value of every key alone, then every pair of
   keys), so a bad file fails with a message naming the key.
2. Ray Tune runs ``run_trial`` once per sampled config. It is a *driver
   function*, the Ray 2.60 way of tuning Train V2: it builds the trial's
   TrainConfig (the same shape as a single run, with the sampled values) and
   calls ``breakhis.train.run_training`` with Tune's ``TuneReportCallback``, so
   every epoch's validation metrics reach Tune. The trial's Train run lives at
   ``STORAGE/NAME/runs/trial-<trial id>``: a name that survives a restart, so a
   restarted trial continues its run from the last checkpoint.
3. ASHA (asynchronous successive halving) stops trials whose metric at a rung
   (``grace_period * reduction_factor**k`` epochs) is in the worse part of
   those recorded there. Rungs stop before the last epoch: a trial that reaches
   its last epoch always finishes and writes its model artifact. A stopped
   trial's Train workers are released by the sweep's driver
   (ReleaseStoppedTrialResources), whatever the cluster's dashboard does.
4. The Train workers are not part of a Tune trial's resource request (Train V2
   schedules them itself), so concurrency is bounded by ``max_concurrent_trials``,
   derived from the cluster's resources and what one trial needs (workers, GPUs,
   CPUs for its data pipeline and its driver) unless given.
5. At the end: the leaderboard (``leaderboard.parquet`` and ``.csv``: every
   trial's config, epochs run, best-epoch metrics and stop reason) and a copy of
   the best trial's model artifact in ``STORAGE/NAME/best/``.

Running the same command again after the driver died resumes the sweep
(``Tuner.restore``): finished trials are kept, unfinished and errored ones
continue from their Train checkpoints. A sweep that already finished is not
run again; its leaderboard and best artifact are rewritten from the results.

Search spaces: breakhis.search_space.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from ray.tune import Callback

from breakhis import storage, tracking
from breakhis.epoch import kept_epoch
from breakhis.ray_internals import release_orphaned_placement_groups
from breakhis.search_space import (
    DEFAULT_SEARCH_SPACE,
    PRETRAINED_ONLY,
    SearchSpace,
    check_search_space,
    load_search_space,
    parse_search_space,
)
from breakhis.train_config import TrainConfig

log = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = ("asha", "fifo")
STOP_REASONS: tuple[str, ...] = ("completed", "patience", "asha", "error")
"""Why a trial ended: all its epochs ran; the training run's own early stopping
(``patience``); ASHA stopped it at a rung; it failed."""

RUNS_DIR = "runs"
BEST_DIR = "best"
LEADERBOARD_PARQUET = "leaderboard.parquet"
LEADERBOARD_CSV = "leaderboard.csv"
SWEEP_FILE = "sweep.json"
_ARTIFACT_FILES = ("model.pt", "model.json")  # the card last: a folder with it is complete


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SweepConfig:
    """Options of a sweep. ``train`` holds the options every trial shares, in the
    shape of a single training run; its ``data``, ``storage`` and ``name`` are the
    sweep's, and the search space overrides the keys it varies."""

    train: TrainConfig
    """Fixed training options; the sweep lives at train.storage/train.name, and
    train.num_workers and train.use_gpu are replaced by the per-trial resources."""
    search_space: str | SearchSpace | None = None
    """Search-space YAML file, local or s3:// (or a SearchSpace); default: the built-in
    space, as in cluster/search_space.yaml."""
    num_samples: int = 16
    """Samples drawn from the space (each grid point is sampled this many times)."""
    gpus_per_trial: float = 0.0
    """GPUs of one trial's Train run; below 1 lets trials of small models share a GPU."""
    workers_per_trial: int | None = None
    """Train workers per trial; None: one per whole GPU (at least one)."""
    max_concurrent_trials: int | None = None
    """Trials at once; None: derived from the cluster's resources and one trial's needs."""
    scheduler: str = "asha"
    """``asha`` (early stopping at rungs) or ``fifo`` (every trial runs all its epochs)."""
    grace_period: int = 1
    """ASHA: epochs before the first rung (no trial stops earlier)."""
    reduction_factor: float = 3.0
    """ASHA: rungs at grace_period * reduction_factor**k epochs; keeps 1/factor at each."""
    driver_cpus: float = 0.25
    """CPUs reserved for each trial's driver function (it only coordinates)."""
    data_cpus_per_trial: float = 1.0
    """CPUs left to each trial's Ray Data pipeline when deriving the concurrency."""
    trial_max_failures: int = 1
    """Times Tune restarts a trial whose driver died (it resumes its Train checkpoints)."""
    search_seed: int | None = 0
    """Seed of the search-space sampling (None: different samples each time)."""
    progress: int = 1
    """Tune's console progress: 0 quiet, 1 status tables, 2 every result."""

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.gpus_per_trial < 0:
            raise ValueError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if self.workers_per_trial is not None and self.workers_per_trial < 1:
            raise ValueError(f"--workers-per-trial must be >= 1, got {self.workers_per_trial}")
        if self.gpus_per_worker > 1:
            raise ValueError(
                f"--gpus-per-trial {self.gpus_per_trial:g} over {self.num_workers} worker(s) "
                f"is {self.gpus_per_worker:g} GPUs per worker; a worker uses at most one: "
                f"raise --workers-per-trial to {math.ceil(self.gpus_per_trial)}"
            )
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(
                f"--max-concurrent-trials must be >= 1, got {self.max_concurrent_trials}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"--scheduler {self.scheduler!r} unknown; accepted: {', '.join(SCHEDULERS)}"
            )
        if self.scheduler == "asha":
            epochs = self.train.epochs
            if epochs < 2:
                raise ValueError(
                    f"--epochs {epochs}: ASHA needs at least 2 epochs (a rung before the "
                    "last one); use --scheduler fifo for single-epoch trials"
                )
            if not 1 <= self.grace_period < epochs:
                raise ValueError(
                    f"--grace-period must be in 1..{epochs - 1} (below --epochs), "
                    f"got {self.grace_period}"
                )
            if self.reduction_factor <= 1:
                raise ValueError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.driver_cpus <= 0:
            raise ValueError(f"--driver-cpus must be > 0, got {self.driver_cpus}")
        if self.data_cpus_per_trial < 0:
            raise ValueError(f"--data-cpus-per-trial must be >= 0, got {self.data_cpus_per_trial}")
        if self.trial_max_failures < 0:
            raise ValueError(f"--trial-max-failures must be >= 0, got {self.trial_max_failures}")

    @property
    def name(self) -> str:
        return self.train.name

    @property
    def num_workers(self) -> int:
        """Train workers of each trial."""
        if self.workers_per_trial is not None:
            return self.workers_per_trial
        return max(1, int(self.gpus_per_trial))

    @property
    def gpus_per_worker(self) -> float:
        return self.gpus_per_trial / self.num_workers

    @property
    def experiment_uri(self) -> str:
        """STORAGE/NAME: Tune's experiment folder, the leaderboard and best/."""
        return storage.join(storage.absolute(self.train.storage), self.train.name)

    @property
    def runs_uri(self) -> str:
        """Where the trials' Train runs live (one folder per trial)."""
        return storage.join(self.experiment_uri, RUNS_DIR)

    @property
    def best_uri(self) -> str:
        """The best trial's model artifact (STORAGE/NAME/best)."""
        return storage.join(self.experiment_uri, BEST_DIR)

    def trial_request(self) -> dict[str, float]:
        """What one running trial holds: its driver, its Train workers and the
        CPUs its data pipeline needs."""
        cpus = self.driver_cpus + self.num_workers * self.train.cpus_per_worker
        request = {"CPU": cpus + self.data_cpus_per_trial}
        if self.gpus_per_trial > 0:
            request["GPU"] = self.gpus_per_trial
        return request


def derive_max_concurrent(
    cluster: Mapping[str, float], request: Mapping[str, float], num_trials: int
) -> int:
    """How many trials fit on the cluster at once: the scarcest resource over what
    one trial requests, at most ``num_trials`` and at least 1 (with a warning when
    not even one fits now: an autoscaler may add nodes).

    Returns the number of concurrent trials.
    """
    fits = min(
        (int(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in request.items() if amount),
        default=num_trials,
    )
    if fits < 1:
        log.warning(
            "one trial needs %s but the cluster has %s now; trials wait for an autoscaler",
            dict(request),
            {k: cluster.get(k, 0.0) for k in request},
        )
    return max(1, min(fits, num_trials))


def trial_run_name(trial_id: str) -> str:
    """The Train run name of a trial: stable across restarts, so the run resumes."""
    return f"trial-{trial_id}"


def trial_dir_name(trial: Any) -> str:
    """Tune's folder name for a trial (the same as its Train run's)."""
    return trial_run_name(trial.trial_id)


def trial_base(config: SweepConfig) -> TrainConfig:
    """The TrainConfig every trial starts from: the sweep's options with its Train
    runs under ``runs/``, absolute paths and the sweep's workers."""
    weights = config.train.weights
    if weights not in ("imagenet", "none"):
        weights = storage.absolute(weights)
    return dataclasses.replace(
        config.train,
        data=storage.absolute(config.train.data),
        storage=config.runs_uri,
        num_workers=config.num_workers,
        use_gpu=config.gpus_per_trial > 0,
        weights=weights,
    )


# --------------------------------------------------------------------------- trial


def run_trial(config: dict[str, Any]) -> None:
    """The function Tune runs for every trial: one full training run.

    ``config`` is ``{"train": TrainConfig dict (sampled values filled in),
    "gpus_per_worker": GPU share of each worker, None for one GPU or a CPU
    run, "parent_run_id": the sweep's MLflow run or None}``. The run is named
    after the trial, so a trial that Tune restarts (or a resumed sweep)
    continues it from its checkpoint, and its MLflow run, a child of the
    sweep's.
    Returns None; raises whatever run_training raises (the trial errors).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from breakhis.train import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    train_config = TrainConfig.from_dict({**config["train"], "name": trial_run_name(trial_id)})
    run_training(
        train_config,
        callbacks=[TuneReportCallback()],
        gpus_per_worker=config["gpus_per_worker"],
        parent_run_id=config.get("parent_run_id"),
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SweepResult:
    """What a sweep produced."""

    experiment_uri: str
    """STORAGE/NAME (Tune's experiment, the trials' runs, the leaderboard)."""
    leaderboard_uri: str
    """The leaderboard as Parquet (the CSV sits beside it)."""
    best_trial_id: str
    best_artifact_uri: str
    """STORAGE/NAME/best: the best trial's model artifact."""
    metric: str
    mode: str
    searched: tuple[str, ...]
    """The options the space varied (leaderboard columns)."""
    rows: tuple[dict[str, Any], ...] = field(repr=False)
    """The leaderboard, best first."""
    wall_seconds: float
    """Wall time of Tuner.fit() in this call (a resumed sweep counts only this part)."""
    resumed: bool

    @property
    def trials_per_hour(self) -> float:
        return 3600.0 * len(self.rows) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def stop_counts(self) -> dict[str, int]:
        """Trials per stop reason."""
        return {r: sum(row["stop_reason"] == r for row in self.rows) for r in STOP_REASONS}

    def format_table(self) -> str:
        """The leaderboard for the terminal."""
        header = ["rank", "trial", "stop", "epochs", "best", self.metric, *self.searched]
        lines = []
        for row in self.rows:
            cells = [
                str(row["rank"]),
                row["trial_id"],
                row["stop_reason"],
                str(row["epochs_run"]),
                str(row["best_epoch"]),
                _format_value(row.get(self.metric)),
                *(_format_value(row.get(key)) for key in self.searched),
            ]
            lines.append(cells)
        widths = [max([len(h), *(len(c[i]) for c in lines)]) for i, h in enumerate(header)]
        text = [" ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
        text += [
            " ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines
        ]
        counts = ", ".join(f"{n} {r}" for r, n in self.stop_counts().items() if n)
        text.append(
            f"{len(self.rows)} trials ({counts}) in {self.wall_seconds:.0f} s "
            f"({self.trials_per_hour:.1f} trials/hour){' after resuming' if self.resumed else ''}"
        )
        text.append(
            f"best: {self.best_trial_id}, model at {self.best_artifact_uri}; "
            f"leaderboard at {self.leaderboard_uri}"
        )
        return "\n".join(text)


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _history(result: Any) -> list[dict[str, Any]]:
    """A trial's per-epoch rows (the last report of each epoch), in epoch order."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "epoch" not in frame.columns:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in frame.to_dict("records"):
        epoch = row.get("epoch")
        if epoch is not None and not (isinstance(epoch, float) and math.isnan(epoch)):
            by_epoch[int(epoch)] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _score(value: Any, mode: str) -> float:
    """Larger is better; NaN and missing rank last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value) if mode == "max" else -float(value)


def trial_row(
    result: Any, *, searched: Sequence[str], metric_keys: Sequence[str], config: SweepConfig
) -> dict[str, Any]:
    """One leaderboard row from a Tune Result (ranked later by leaderboard_rows()).

    The stop reason, from the epochs Tune saw: ``error`` when the trial failed;
    ``completed`` when it reported its last epoch; ``patience`` when its own
    early stopping ended it (its history says so); otherwise ``asha``: in a
    finished sweep only the scheduler ends a trial early (never at the last
    epoch). ``artifact_uri`` is set for trials that ran to their end: a run
    ASHA stopped may finish an epoch it had started, but the sweep dropped it.
    """
    train = TrainConfig.from_dict(result.config["train"])
    run_uri = storage.join(config.runs_uri, os.path.basename(result.path.rstrip("/")))
    trial_id = os.path.basename(run_uri).removeprefix("trial-")
    history = _history(result)
    best_epoch, patience_stop = kept_epoch(history, train)
    best = next((r for r in history if int(r["epoch"]) == best_epoch), {})
    epochs_run = int(history[-1]["epoch"]) if history else 0
    if result.error is not None:
        reason = "error"
    elif epochs_run >= train.epochs:
        reason = "completed"
    elif patience_stop:
        reason = "patience"
    else:
        reason = "asha"
    artifact = storage.join(run_uri, "model")
    has_artifact = reason in ("completed", "patience") and storage.exists(
        storage.join(artifact, "model.json")
    )
    row: dict[str, Any] = {
        "rank": 0,
        "trial_id": trial_id,
        "stop_reason": reason,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        **{key: _float_or_none(best.get(key)) for key in metric_keys},
        **{key: result.config["train"][key] for key in searched},
        "seconds": _float_or_none((result.metrics or {}).get("time_total_s")),
        "run_uri": run_uri,
        "artifact_uri": artifact if has_artifact else None,
        "error": str(result.error).strip().splitlines()[0] if result.error is not None else None,
        "config": json.dumps(train.to_dict(), sort_keys=True),
    }
    return row


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def leaderboard_rows(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> list[dict]:
    """The rows ranked by the best value of ``metric`` (errored and unscored trials
    last), ``rank`` filled in from 1."""
    ordered = sorted(
        rows,
        key=lambda r: (r["stop_reason"] == "error", -_score(r.get(metric), mode), r["trial_id"]),
    )
    return [{**row, "rank": i} for i, row in enumerate(ordered, start=1)]


def write_leaderboard(rows: Sequence[dict[str, Any]], experiment_uri: str) -> str:
    """Write the leaderboard as ``leaderboard.parquet`` and ``leaderboard.csv`` under
    ``experiment_uri``. Returns the Parquet file's URI."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(experiment_uri, LEADERBOARD_PARQUET)
    storage.write_bytes(uri, buffer.getvalue())
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    storage.write_bytes(storage.join(experiment_uri, LEADERBOARD_CSV), buffer.getvalue())
    return uri


def copy_artifact(source: str, dest: str) -> None:
    """Copy a model artifact folder (weights first, card last, so a reader of
    ``dest`` never sees a card without its weights). Raises FileNotFoundError
    naming a missing file."""
    storage.delete(storage.join(dest, "model.json"))
    for name in _ARTIFACT_FILES:
        storage.write_bytes(
            storage.join(dest, name), storage.read_bytes(storage.join(source, name))
        )


# --------------------------------------------------------------------------- driver


def _sweep_record(config: SweepConfig, space: SearchSpace) -> dict[str, Any]:
    """What must stay the same for a rerun to resume the sweep (saved as sweep.json)."""
    return {
        "train": trial_base(config).to_dict(),
        "search_space": space.to_dict(),
        "num_samples": config.num_samples,
        "gpus_per_trial": config.gpus_per_trial,
        "workers_per_trial": config.num_workers,
        "scheduler": config.scheduler,
        "grace_period": config.grace_period,
        "reduction_factor": config.reduction_factor,
        "search_seed": config.search_seed,
    }


def _check_same_sweep(config: SweepConfig, record: dict[str, Any]) -> None:
    """Raise ValueError naming what differs from the sweep saved at STORAGE/NAME."""
    path = storage.join(config.experiment_uri, SWEEP_FILE)
    if not storage.exists(path):
        return
    old = json.loads(storage.read_bytes(path))
    differ = []
    for key, value in record.items():
        if key == "train":
            differ += [
                f"--{k.replace('_', '-')} {old[key].get(k)!r} (now {v!r})"
                for k, v in value.items()
                if old[key].get(k) != v
            ]
        elif old.get(key) != value:
            differ.append(f"{key.replace('_', '-')} {old.get(key)!r} (now {value!r})")
    if differ:
        raise ValueError(
            f"{config.experiment_uri} holds a sweep run with {'; '.join(differ)}. Resuming "
            "needs the same options; use another --name for a new sweep"
        )


class ReleaseStoppedTrialResources(Callback):
    """Tune callback that frees the Train workers' resources of stopped trials.

    Tune stops a trial (an ASHA stop) by ending its actor, which takes the
    trial's Train controller with it before the controller can remove its
    workers' placement group. Ray Train V2 starts a cleaner for this, but the
    cleaner asks the State API (the dashboard), which a Ray started without a
    dashboard, or one of several on a machine, cannot answer: the group would
    then hold its CPUs/GPUs until the job ends and later trials would wait for
    them forever. Every few seconds, on the sweep's driver, this removes the
    job's placement groups whose creator died.
    """

    def __init__(self, period_s: float = 3.0) -> None:
        self.period_s = period_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.period_s:
            self._last = time.monotonic()
            release_orphaned_placement_groups()


def _make_tuner(
    config: SweepConfig, space: SearchSpace, max_concurrent: int, parent_run_id: str | None
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    train = config.train
    if config.scheduler == "asha":
        # time_attr "epoch": the run's own epoch count survives a restart (Tune's
        # training_iteration restarts at 1). max_t = epochs - 1 with stop_last_trials
        # off puts every rung before the last epoch: a trial that reaches it is never
        # stopped while it writes its model artifact.
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=train.epochs - 1,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor,
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    storage_path, filesystem = storage.for_ray(storage.absolute(train.storage))
    param_space = {
        "train": {**trial_base(config).to_dict(), **space.to_tune()},
        "gpus_per_worker": config.gpus_per_worker or None,
        "parent_run_id": parent_run_id,
    }
    return tune.Tuner(
        tune.with_resources(run_trial, {"CPU": config.driver_cpus}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=train.metric,
            mode=train.metric_mode,
            scheduler=scheduler,
            # The limit goes to the generator itself: Tune ignores max_concurrent_trials
            # when given a generator instance (which the seed needs).
            search_alg=BasicVariantGenerator(
                max_concurrent=max_concurrent, random_state=config.search_seed
            ),
            num_samples=config.num_samples,
            trial_dirname_creator=trial_dir_name,
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=config.trial_max_failures),
            callbacks=[ReleaseStoppedTrialResources()],
            verbose=config.progress,
        ),
    )


def open_sweep_tracking(
    config: SweepConfig, record: Mapping[str, Any], manifest: str
) -> tracking.TrackedRun:
    """The sweep's parent MLflow run (new, or the one STORAGE/NAME records): the trials'
    shared options and the sweep's (``search_space`` as JSON) as parameters, tags
    ``split``, ``manifest_hash`` and ``sweep_uri``. Raises ValueError naming the tracking
    URI when its store cannot be used."""
    params = tracking.config_params(record["train"])
    params |= {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in record.items()
        if key != "train"
    }
    assert config.train.tracking_uri is not None
    return tracking.open_run(
        config.train.tracking_uri,
        config.experiment_uri,
        name=config.name,
        params=params,
        tags={
            "split": config.train.split,
            "manifest_hash": manifest,
            "sweep_uri": config.experiment_uri,
        },
    )


def resolve_space(config: SweepConfig) -> SearchSpace:
    """The sweep's search space, loaded and checked against its training options.

    Returns the SearchSpace. Raises FileNotFoundError and SearchSpaceError as
    load_search_space() and check_search_space() do.
    """
    space = config.search_space
    base = trial_base(config)
    if space is None and not base.pretrained:
        # Freezing a randomly initialised backbone keeps nothing worth keeping.
        default = {k: v for k, v in DEFAULT_SEARCH_SPACE.items() if k not in PRETRAINED_ONLY}
        space = parse_search_space(default, "<default search space, --weights none>")
    elif not isinstance(space, SearchSpace):
        space = load_search_space(space)
    check_search_space(space, base)
    return space


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep STORAGE/NAME on the connected Ray cluster.

    Returns the SweepResult (leaderboard written, best artifact copied to
    STORAGE/NAME/best). Raises, before any trial starts: SearchSpaceError for a
    bad space, FileNotFoundError for missing data or space file, ValueError when
    STORAGE/NAME holds a sweep with other options. Raises RuntimeError when Ray
    is not initialised, when the sweep was interrupted (trials unfinished: run
    again to resume) and when no trial produced a model.
    """
    import ray
    from ray import tune

    from breakhis.prepare import manifest_hash, read_manifest

    tracking_uri = tracking.resolve_uri(config.train.tracking_uri)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, tracking_uri=tracking_uri)
    )
    space = resolve_space(config)
    # Missing data fails here, not in every trial.
    manifest = read_manifest(storage.absolute(config.train.data))
    record = _sweep_record(config, space)
    _check_same_sweep(config, record)
    if not ray.is_initialized():
        raise RuntimeError("run_sweep needs a Ray connection: call ray.init() first")

    train = config.train
    num_trials = config.num_samples * space.grid_size
    if config.max_concurrent_trials is not None:
        max_concurrent = config.max_concurrent_trials
    else:
        max_concurrent = derive_max_concurrent(
            ray.cluster_resources(), config.trial_request(), num_trials
        )
    experiment_path, filesystem = storage.for_ray(config.experiment_uri)
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if not resumed:
        storage.make_dirs(config.experiment_uri)
    parent = None
    if tracking_uri is not None:
        parent = open_sweep_tracking(config, record, manifest_hash(manifest))
    if resumed:
        log.info("resuming the sweep at %s", config.experiment_uri)
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable=tune.with_resources(run_trial, {"CPU": config.driver_cpus}),
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        storage.write_bytes(
            storage.join(config.experiment_uri, SWEEP_FILE),
            json.dumps(record, indent=2, sort_keys=True).encode(),
        )
        tuner = _make_tuner(config, space, max_concurrent, parent and parent.run_id)
    log.info(
        "sweep %s: %d trial(s), up to %d at once, each %s; %s on %s",
        config.name,
        num_trials,
        max_concurrent,
        config.trial_request(),
        config.scheduler,
        train.metric,
    )
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    release_orphaned_placement_groups()  # the last stopped trials' (see the callback)

    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished:
        raise RuntimeError(
            f"sweep {config.experiment_uri} stopped with {unfinished} unfinished trial(s); "
            "run the same command again to resume it"
        )
    from breakhis.train_config import VAL_METRICS

    metric_keys = ["train_loss", *VAL_METRICS]
    rows = [
        trial_row(result, searched=space.keys, metric_keys=metric_keys, config=config)
        for result in grid
    ]
    rows = leaderboard_rows(rows, train.metric, train.metric_mode)
    leaderboard_uri = write_leaderboard(rows, config.experiment_uri)
    with_model = [r for r in rows if r["artifact_uri"]]
    if not with_model:
        raise RuntimeError(
            f"no trial of {config.experiment_uri} finished with a model (see the errors in "
            f"{leaderboard_uri})"
        )
    best = with_model[0]
    copy_artifact(best["artifact_uri"], config.best_uri)
    if parent is not None:
        tracking.finish_sweep(parent, rows, leaderboard_uri=leaderboard_uri, metric=train.metric)
    log.info("best trial %s: %s %s", best["trial_id"], train.metric, best.get(train.metric))
    return SweepResult(
        experiment_uri=config.experiment_uri,
        leaderboard_uri=leaderboard_uri,
        best_trial_id=best["trial_id"],
        best_artifact_uri=config.best_uri,
        metric=train.metric,
        mode=train.metric_mode,
        searched=space.keys,
        rows=tuple(rows),
        wall_seconds=wall,
        resumed=resumed,
    )
