"""What a training run's driver checks and builds before any worker starts: DataPlan (the
split, read once) and RunPlan (the datasets and the workers' config). breakhis.train.job makes
them; breakhis.train.result reads them when the fit is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from breakhis.data.splits import SplitPatients, SplitSpec
from breakhis.train.config import TrainConfig

if TYPE_CHECKING:
    import ray.data

    from breakhis.data.dest import PreparedDest


@dataclass(frozen=True)
class DataPlan:
    """The split a run trains on, read and checked once on the driver, before Ray starts."""

    spec: SplitSpec
    dest: PreparedDest = field(repr=False)
    """The prepared DEST, opened once and handed to ingest."""
    patients: SplitPatients


@dataclass(frozen=True)
class RunPlan:
    """Everything run_training checked and built before starting workers."""

    config: TrainConfig
    datasets: dict[str, ray.data.Dataset]
    loop_config: dict[str, Any]
    manifest_hash: str
    resumed_from_epoch: int
    data: DataPlan | None = field(default=None, repr=False)
    """The split it was planned on (the refit reuses its opened DEST)."""
    stain: Any = None
    """The run's fitted breakhis.data.stain.StainNormalizer (None: no stain normalisation); the
    artifact records it."""

    @property
    def validate(self) -> bool:
        """False for a refit: no validation patients, every epoch kept as trained."""
        return bool(self.loop_config.get("validate", True))
