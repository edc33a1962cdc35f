"""What the local cluster (breakhis.dev.localcluster) is asked for: its shape
(LocalClusterConfig), its errors, and the runtime_env jobs are submitted with, as
``ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .`` builds it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RESOURCE_PREFIX = "localcluster:"
"""Each worker node offers one unit of ``localcluster:<name>``."""
_RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"
_MIN_OBJECT_STORE_MB = 80  # Ray refuses less than 75 MiB


class LocalClusterError(RuntimeError):
    """A node of the local cluster could not be started or did not join in time."""


class JobFailedError(RuntimeError):
    """A submitted job ended in a state other than the one expected."""


@dataclass(frozen=True)
class LocalClusterConfig:
    """Shape of the local cluster.

    workers: worker nodes started with the head (more can be added with ``add_worker``).
    head_cpus: logical CPUs the head offers to tasks (0: it runs job drivers only).
    worker_cpus: logical CPUs each worker node offers. Logical: Ray schedules by them,
        they do not pin cores, so 2 per node on a 2-core machine is fine for small jobs.
    object_store_mb: each node's object store (shared memory), in MB.
    env: extra environment for every node's processes, e.g. ``S3Server.env()``.
    start_timeout_s: how long each node may take to start and join, retries included.
    keep_temp: keep the temp folder (sessions, logs) after ``stop()``, for debugging.
    """

    workers: int = 2
    head_cpus: int = 0
    worker_cpus: int = 2
    object_store_mb: int = 128
    env: Mapping[str, str] = field(default_factory=dict)
    start_timeout_s: float = 300.0
    keep_temp: bool = False

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: must be >= 0")
        if self.head_cpus < 0 or self.worker_cpus < 0:
            raise ValueError(
                f"head_cpus={self.head_cpus}, worker_cpus={self.worker_cpus}: must be >= 0"
            )
        if self.object_store_mb < _MIN_OBJECT_STORE_MB:
            raise ValueError(
                f"object_store_mb={self.object_store_mb}: Ray needs at least "
                f"{_MIN_OBJECT_STORE_MB} MB per node"
            )
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s={self.start_timeout_s}: must be > 0")
        bad = [k for k, v in self.env.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"env: names and values must be strings; bad entries: {bad}")


def repo_root() -> Path:
    """The checkout this package runs from (the folder holding ``jobs/`` and ``cluster/``).

    Raises FileNotFoundError when the package is installed without its checkout.
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / "jobs").is_dir() or not (root / "cluster").is_dir():
        raise FileNotFoundError(
            f"{root}: not a breakhis checkout (no jobs/ and cluster/ folders); the local "
            "cluster submits jobs from a checkout"
        )
    return root


def load_runtime_env(path: str | os.PathLike | None = None) -> dict:
    """The runtime_env that ``ray job submit --runtime-env cluster/runtime_env.yaml
    --working-dir .`` builds when run from the repository root.

    ``path`` None reads ``cluster/runtime_env.yaml`` of ``repo_root()``; a relative
    ``working_dir`` is taken from the repository root, as the CLI takes it from the
    current folder. Returns a plain dict. Raises FileNotFoundError, or ValueError naming
    the file when it is not a YAML mapping.
    """
    root = repo_root()
    file = Path(path) if path is not None else root / _RUNTIME_ENV_FILE
    runtime_env = yaml.safe_load(file.read_text())
    if not isinstance(runtime_env, dict):
        raise ValueError(f"{file}: a runtime_env must be a YAML mapping")
    working_dir = runtime_env.get("working_dir", ".")
    if "://" not in working_dir:
        runtime_env["working_dir"] = str((root / working_dir).resolve())
    return runtime_env
