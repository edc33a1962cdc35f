"""What ``breakhis tune`` is asked to do: SweepConfig (the training options every trial
starts from, the search space, the scheduler, the resources of a trial), how many trials
fit the cluster at once, and where each trial's run lives."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from breakhis import storage
from breakhis.train.config import TrainConfig
from breakhis.tune.search_space import (
    DEFAULT_SEARCH_SPACE,
    PRETRAINED_ONLY,
    SearchSpace,
    check_search_space,
    load_search_space,
    parse_search_space,
)

log = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = ("asha", "fifo")
RUNS_DIR = "runs"
BEST_DIR = "best"


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
    scheduler: str = dataclasses.field(default="asha", metadata={"choices": SCHEDULERS})
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
        if not self.train.validates:
            raise ValueError(
                "--val-fraction 0: a sweep ranks its trials on validation patients; set "
                "--val-fraction (e.g. 0.2)"
            )
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


def resolve_space(config: SweepConfig) -> SearchSpace:
    """The sweep's search space, loaded and checked against its training options.

    Returns the SearchSpace. Raises FileNotFoundError and SearchSpaceError as
    load_search_space() and check_search_space() do.
    """
    space = config.search_space
    base = trial_base(config)
    if space is None and (not base.pretrained or base.freeze_backbone):
        # Freezing a randomly initialised backbone keeps nothing worth keeping; a linear
        # probe (--freeze-backbone) keeps it frozen throughout, at no backbone rate.
        default = {k: v for k, v in DEFAULT_SEARCH_SPACE.items() if k not in PRETRAINED_ONLY}
        why = "--freeze-backbone" if base.freeze_backbone else "--weights none"
        space = parse_search_space(default, f"<default search space, {why}>")
    elif not isinstance(space, SearchSpace):
        space = load_search_space(space)
    check_search_space(space, base)
    return space
