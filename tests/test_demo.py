"""``make demo`` end to end, at a small size: every step runs and prints what it made, and
the report it ends with is on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_the_demo_runs_every_step_and_ends_with_the_report(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "demo", "--workdir", str(workdir),
         "--scale", "0.02", "--epochs", "2", "--image-size", "32", "--trials", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    out = done.stdout
    for step in ("1/6 generating", "2/6 prepare", "3/6 train", "4/6 sweep", "5/6 score",
                 "6/6 evaluate"):  # fmt: skip
        assert f"=== {step}" in out, f"step {step!r} missing from the demo's output"
    assert "deliberately bad files" in out
    assert "leaderboard" in out.lower()
    report = workdir / "report" / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    assert f"report: {report}" in out
    assert "demo finished" in out
    # Evaluation applies the decision the training fitted on its validation patients.
    calibration = json.loads((workdir / "report" / "metrics.json").read_text())["calibration"]
    assert calibration["threshold_source"].startswith("the model's, chosen by balanced_accuracy")
    assert calibration["temperature"] > 0 and set(calibration) >= {"before", "after"}
