"""What a training run's driver checks and builds before any worker starts: DataPlan (the
split, read once: plan_data) and RunPlan (the datasets and the workers' config).
breakhis.train.job makes them; breakhis.train.result reads them when the fit is done.

Light on purpose (no torch, no Ray): ``breakhis train`` runs plan_data's checks before it
imports the job, so a missing or leaking manifest is reported in about a second."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from breakhis.data.dest import PreparedDest
from breakhis.data.splits import SplitPatients, SplitSpec
from breakhis.train.config import TrainConfig

if TYPE_CHECKING:
    import ray.data

DATA_CPUS = 1.0
"""CPUs a run needs beside its workers' reservations, for Ray Data's decode tasks."""


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


def _count_images(manifest: Any, patients: frozenset[str], magnification: int | None) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pc.is_in(manifest.column("patient_id"), pa.array(sorted(patients), pa.string()))
    if magnification is not None:
        mask = pc.and_(mask, pc.equal(manifest.column("magnification"), magnification))
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


def subtype_counts(
    manifest: Any, patients: frozenset[str], magnification: int | None
) -> tuple[int, ...]:
    """Training images per subtype class (breakhis.subtypes.SUBTYPE_CLASS_NAMES) of
    ``patients`` in ``manifest``, each tile's class from its name (as the training rows
    carry it). Raises ValueError naming the first tile whose id is not a BreakHis name
    (--task subtype needs every tile's subtype)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from breakhis.subtypes import SUBTYPE_CLASS_NAMES, subtype_indices

    mask = pc.is_in(manifest.column("patient_id"), pa.array(sorted(patients), pa.string()))
    if magnification is not None:
        mask = pc.and_(mask, pc.equal(manifest.column("magnification"), magnification))
    tile_ids = manifest.filter(mask).column("tile_id").to_pylist()
    classes = subtype_indices(tile_ids)
    if (classes < 0).any():
        bad = tile_ids[int(np.flatnonzero(classes < 0)[0])]
        raise ValueError(
            f"--task subtype: tile {bad!r} of the manifest has no BreakHis subtype in its name "
            "(expected e.g. SOB_B_A-14-22549AB-40-001); train it with --task binary"
        )
    counts = np.bincount(classes, minlength=len(SUBTYPE_CLASS_NAMES))
    return tuple(int(c) for c in counts)


def check_batches(train_rows: int, config: TrainConfig) -> int:
    """Optimizer steps per epoch on each worker; raises ValueError when there is none."""
    steps = train_rows // config.num_workers // config.batch_size
    if steps < 1:
        raise ValueError(
            f"{train_rows} training images over {config.num_workers} worker(s) do not fill "
            f"one batch of --batch-size {config.batch_size}; lower it or use fewer workers"
        )
    return steps


def plan_data(
    config: TrainConfig, *, validate: bool | None = None, dest: PreparedDest | None = None
) -> DataPlan:
    """Open the prepared DEST (unless given), select the split and check it holds validation
    patients (``validate``; default: whether the config holds any out) and a batch of
    training images. Needs no Ray.

    Returns the DataPlan. Raises FileNotFoundError for missing data, ValueError for a
    bad split or too little data for the batch size, and LeakageError for a split with
    a patient on two sides.
    """
    validate = config.validates if validate is None else validate
    spec = SplitSpec.parse(
        config.split, val_fraction=config.val_fraction if validate else 0.0, seed=config.seed
    )
    dest = PreparedDest.open(config.data) if dest is None else dest
    patients = dest.split(spec)  # raises LeakageError for a leaking split
    if validate and not patients.val:
        raise ValueError(
            f"split {spec} with --val-fraction {config.val_fraction} leaves no validation "
            "patient; raise --val-fraction"
        )
    # Counted from the manifest, so too small a data set fails before anything is decoded.
    check_batches(_count_images(dest.manifest, patients.train, config.magnification), config)
    if config.task == "subtype":
        subtype_counts(dest.manifest, patients.train | patients.val, config.magnification)
    return DataPlan(spec=spec, dest=dest, patients=patients)
