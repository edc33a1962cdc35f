"""Hyperparameter sweeps: every trial is a full training run (Ray Train V2 inside Ray Tune).

    breakhis tune --data s3://bucket/breakhis-prepared --storage s3://bucket/sweeps \\
        --name rn50-sweep --val-fraction 0.2 --search-space cluster/search_space.yaml \\
        --num-samples 32 --gpus-per-trial 1
    ray job submit --working-dir . -- python jobs/tune.py ... (same options)

How it runs, in reading order:

1. ``run_sweep`` checks the search space against the sweep's training options
   before any trial starts (every value of every key alone, then every pair of
   keys), so a bad file fails with a message naming the key.
2. Ray Tune runs ``run_trial`` once per sampled config. It is a *driver
   function*, the Ray 2.60 way of tuning Train V2: it builds the trial's
   TrainConfig (the same shape as a single run, with the sampled values) and
   calls ``breakhis.train.job.run_training`` with Tune's ``TuneReportCallback``, so
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

Search spaces: breakhis.tune.search_space.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from breakhis import storage
from breakhis.ray_internals import release_orphaned_placement_groups
from breakhis.train import tracking
from breakhis.train.config import TrainConfig
from breakhis.tune.config import (
    SweepConfig,
    derive_max_concurrent,
    resolve_space,
    trial_base,
    trial_dir_name,
    trial_run_name,
)
from breakhis.tune.leaderboard import (
    SweepResult,
    copy_artifact,
    leaderboard_rows,
    trial_row,
    write_leaderboard,
)
from breakhis.tune.search_space import (
    SearchSpace,
)

log = logging.getLogger(__name__)


SWEEP_FILE = "sweep.json"


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

    from breakhis.train.job import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    train_config = TrainConfig.from_dict({**config["train"], "name": trial_run_name(trial_id)})
    run_training(
        train_config,
        callbacks=[TuneReportCallback()],
        gpus_per_worker=config["gpus_per_worker"],
        parent_run_id=config.get("parent_run_id"),
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

    from breakhis.data.dest import PreparedDest

    tracking_uri = tracking.resolve_uri(config.train.tracking_uri)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, tracking_uri=tracking_uri)
    )
    space = resolve_space(config)
    # Missing data fails here, not in every trial.
    dest = PreparedDest.open(storage.absolute(config.train.data))
    record = _sweep_record(config, space)
    _check_same_sweep(config, record)
    if not ray.is_initialized():
        raise RuntimeError("run_sweep needs a Ray connection: call ray.init() first")

    num_trials = config.num_samples * space.grid_size
    if config.max_concurrent_trials is not None:
        max_concurrent = config.max_concurrent_trials
    else:
        max_concurrent = derive_max_concurrent(
            ray.cluster_resources(), config.trial_request(), num_trials
        )
    parent = None
    if tracking_uri is not None:
        parent = open_sweep_tracking(config, record, dest.hash)
    tuner, resumed = _tuner(config, space, record, max_concurrent, parent)
    log.info(
        "sweep %s: %d trial(s), up to %d at once, each %s; %s on %s",
        config.name,
        num_trials,
        max_concurrent,
        config.trial_request(),
        config.scheduler,
        config.train.metric,
    )
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    release_orphaned_placement_groups()  # the last stopped trials' (see the callback)
    return _results(config, space, grid, parent, wall_seconds=wall, resumed=resumed)


def _tuner(
    config: SweepConfig,
    space: SearchSpace,
    record: dict[str, Any],
    max_concurrent: int,
    parent: tracking.TrackedRun | None,
) -> tuple[Any, bool]:
    """The Tuner of the sweep: restored when STORAGE/NAME holds one (finished trials
    kept, the others continued), else a new one (its sweep.json written first).
    Returns (tuner, resumed)."""
    from ray import tune

    experiment_path, filesystem = storage.for_ray(config.experiment_uri)
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        log.info("resuming the sweep at %s", config.experiment_uri)
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable=tune.with_resources(run_trial, {"CPU": config.driver_cpus}),
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
        return tuner, True
    storage.make_dirs(config.experiment_uri)
    storage.write_bytes(
        storage.join(config.experiment_uri, SWEEP_FILE),
        json.dumps(record, indent=2, sort_keys=True).encode(),
    )
    return _make_tuner(config, space, max_concurrent, parent and parent.run_id), False


def _results(
    config: SweepConfig,
    space: SearchSpace,
    grid: Any,
    parent: tracking.TrackedRun | None,
    *,
    wall_seconds: float,
    resumed: bool,
) -> SweepResult:
    """The leaderboard of a finished ``grid`` (Tune's ResultGrid), written, and the best
    trial's artifact copied to STORAGE/NAME/best. Raises RuntimeError for unfinished
    trials or when no trial has a model."""
    from breakhis.train.config import VAL_METRICS

    train = config.train
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished:
        raise RuntimeError(
            f"sweep {config.experiment_uri} stopped with {unfinished} unfinished trial(s); "
            "run the same command again to resume it"
        )
    # The subtype metrics only for a --task subtype sweep: a binary leaderboard is unchanged.
    metric_keys = [
        "train_loss",
        *(k for k in VAL_METRICS if train.task == "subtype" or "subtype" not in k),
    ]
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
        wall_seconds=wall_seconds,
        resumed=resumed,
    )
