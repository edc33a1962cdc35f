"""Shared pytest fixtures: real data on disk and the embedded S3 server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from breakhis.dev.s3server import S3Server, embedded_s3

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the S3 server ``s3``, so ``-m "not s3"`` leaves it out."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


# --- small training runs -----------------------------------------------------------------


def small_train_config(data: str, storage: str, **overrides):
    """A TrainConfig of a smallcnn run small enough for a 2-core machine (32 px, one epoch,
    batches of 16, no augmentation, one worker, no retries, a fifth of the training patients
    held out for validation, and PreciseBN over 16 batches: these runs are a handful of steps,
    the short runs it is for, where BatchNorm's running averages are still mostly their
    initial values); ``overrides`` change any field."""
    from breakhis.train.config import TrainConfig

    values = dict(
        data=data,
        storage=storage,
        name="run",
        arch="smallcnn",
        weights="none",
        freeze_epochs=0,
        image_size=32,
        augment_strength=0.0,
        epochs=1,
        batch_size=16,
        warmup_epochs=0.0,
        num_workers=1,
        max_failures=0,
        val_fraction=0.2,
        bn_recalibration_batches=16,
    )
    return TrainConfig(**{**values, **overrides})


# --- real data ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    """The small real BreakHis sample shipped beside the repo (skips the test if absent)."""
    path = (REPO_ROOT / ".." / "shared" / "realdata" / "breakhis-sample").resolve()
    if not path.is_dir():
        pytest.skip(f"real BreakHis sample not found at {path}")
    return path


# --- S3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One embedded SeaweedFS for the session, buckets ``breakhis`` and ``test``.

    The AWS_* variables point at it from the first test that asks for it until the session
    ends, so fixtures that start processes needing S3 (Ray) must depend on this one.
    """
    with embedded_s3(buckets=("breakhis", "test"), set_env=True) as server:
        yield server


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh ``s3://test/<uuid>`` prefix, so tests never see each other's objects."""
    return f"s3://test/{uuid.uuid4().hex}"


# --- Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[None]:
    """One local Ray instance for the whole session (starting one costs seconds).

    Depends on ``s3_server`` so that Ray's workers inherit the AWS_* variables that point
    at it. ``address="local"`` never attaches to a cluster someone else started.
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


# --- generated, prepared data ------------------------------------------------------------


@pytest.fixture(scope="session")
def make_prepared(ray_local, tmp_path_factory: pytest.TempPathFactory):
    """A function that returns the DEST of generated BreakHis-shaped tiles, prepared; each
    set of arguments is generated and prepared once per session (Ray tasks, so it needs the
    session's Ray; on S3 with ``s3=True``).

    make_prepared(scale=, width=, height=, folds=5, repetitions=5, s3=False) -> DEST
    """
    from breakhis.data.prepare import PrepareConfig, prepare
    from breakhis.synth.dataset import synthesize

    made: dict[tuple, str] = {}

    def make(
        *, scale: float, width: int, height: int, folds: int = 5, repetitions: int = 5, s3=False
    ) -> str:
        key = (scale, width, height, folds, repetitions, s3)
        if key not in made:
            root = tmp_path_factory.mktemp("prepared")
            synthesize(
                str(root / "raw"), scale=scale, seed=0, width=width, height=height, workers=1
            )
            dest = f"s3://test/{uuid.uuid4().hex}/prepared" if s3 else str(root / "prepared")
            prepare(
                PrepareConfig(
                    src=str(root / "raw"), dest=dest, folds=folds, repetitions=repetitions
                )
            )
            made[key] = dest
        return made[key]

    return make
