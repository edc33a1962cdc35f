"""Every benchmark runs end to end through ``breakhis benchmark NAME`` at a tiny size and
writes figures that make sense. Nothing here judges speed (that is what the benchmarks
are for); these tests keep the benchmarks themselves working."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _benchmark(name: str, workdir: Path, *options: str) -> dict:
    """Run ``breakhis benchmark NAME`` in its own process (each benchmark starts its own Ray
    instance) and return the figures of its ``benchmark-NAME.json``."""
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "benchmark", name, "--workdir", str(workdir),
         *options],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads((workdir / f"benchmark-{name}.json").read_text())
    table = (workdir / f"benchmark-{name}.md").read_text()
    assert table.strip() and table.strip() in done.stdout  # the table printed is the one saved
    return figures


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_ingest_benchmark(tmp_path: Path) -> None:
    figures = _benchmark(
        "ingest", tmp_path, "--scale", "0.01", "--width", "64", "--height", "48",
        "--image-size", "32", "--batch-size", "8", "--epochs", "2",
    )  # fmt: skip
    assert figures["images"] > 0 and figures["device"]
    assert len(figures["ray_epoch_s"]) == len(figures["loader_epoch_s"]) == 2
    assert _positive(*figures["ray_epoch_s"], *figures["loader_epoch_s"])
    assert _positive(figures["ray_peak_bytes"], figures["loader_peak_bytes"])
    # The cache: every tile decoded in the first epoch, none in the second.
    assert figures["decodes_first_epoch"] == figures["images"]
    assert figures["decodes_later_epochs"] == 0


def test_train_benchmark(tmp_path: Path) -> None:
    figures = _benchmark(
        "train", tmp_path, "--arch", "smallcnn", "--image-size", "32", "--scale", "0.02",
        "--batch-size", "16", "--epochs", "2",
    )  # fmt: skip
    assert figures["train_images"] > 0 and figures["gpus"] == 0
    assert len(figures["job_epoch_s"]) == len(figures["loop_epoch_s"]) == 2
    assert _positive(*figures["job_epoch_s"], *figures["loop_epoch_s"], figures["job_wall_s"])


def test_tune_benchmark(tmp_path: Path) -> None:
    figures = _benchmark(
        "tune", tmp_path, "--trials", "2", "--epochs", "1", "--image-size", "32",
        "--scale", "0.01", "--batch-size", "16",
    )  # fmt: skip
    assert len(figures["job_run_s"]) == 2
    assert _positive(*figures["job_run_s"], figures["sweep_wall_s"], figures["job_wall_s"])


def test_score_benchmark(tmp_path: Path) -> None:
    figures = _benchmark(
        "score", tmp_path, "--tiles", "16", "--arch", "smallcnn", "--image-size", "32",
        "--tile-width", "64", "--tile-height", "48", "--batch-size", "8", "--unit-size", "8",
        "--attribution-tiles", "4", "--ig-steps", "2", "--memory-tiles", "8",
        "--memory-scales", "1,2",
    )  # fmt: skip
    names = [row["name"] for row in figures["throughput"]]
    assert names[0] == "plain PyTorch loop" and len(names) == 4
    assert all(row["tiles"] > 0 and _positive(row["tiles_per_s"]) for row in figures["throughput"])
    assert sorted(int(k) for k in figures["peak_memory_mb"]) == [1, 2]
    assert _positive(*figures["peak_memory_mb"].values())
