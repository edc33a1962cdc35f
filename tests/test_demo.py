"""``make demo`` end to end, at a small size: every step runs and prints what it made, and
the report it ends with is on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_the_demo_runs_every_step_and_ends_with_the_report(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    # One sweep trial: the demo's step 4 is wired through (ASHA stopping trials and the
    # sweep's runs are test_tune's); each trial costs most of a minute on 2 cores.
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "demo", "--workdir", str(workdir),
         "--scale", "0.02", "--epochs", "2", "--image-size", "32", "--trials", "1"],
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
    # A quiet terminal: headers, progress lines and summaries; the rest is in demo.log.
    assert len(out.splitlines()) < 100, out
    assert "Parquet dataset sampling" not in out and "Configuration for experiment" not in out
    assert (workdir / "demo.log").stat().st_size > 0 and not done.stderr.strip()
    # What the demo made outlives its S3 server, and opens as the last lines say.
    for kept in ("prepared/manifest.parquet", "prepared/rejects.parquet", "model/model.json",
                 "model/model.pt", "model/curves.png", "sweep/leaderboard.csv",
                 "scores/patients.parquet", "scores/_SUCCESS"):  # fmt: skip
        assert (workdir / kept).is_file(), kept
    tiles = pd.read_parquet(workdir / "scores" / "predictions")
    assert len(tiles) > 0 and tiles["uri"].is_unique
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db" in out
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and len(runs) == 3  # the training run, the sweep and its trial
    trained = next(r for r in runs if r not in children and "model_id" in r.data.tags)
    assert trained.data.metrics["val_roc_auc"] > 0.5 and trained.info.status == "FINISHED"
    # Evaluation applies the model's decision: argmax, the default threshold rule.
    calibration = json.loads((workdir / "report" / "metrics.json").read_text())["calibration"]
    assert calibration["threshold_source"].startswith("the model's decision rule: argmax")
    assert calibration["temperature"] == 1.0 and set(calibration) >= {"before", "after"}


def _user_data(prefix: str) -> list[str]:
    """A few files on the user's S3 under ``prefix``: one with a BreakHis name (not an
    image, so prepare rejects it) and one other. Returns their relative names."""
    from breakhis import storage

    names = [
        "BreaKHis_v1/benign/SOB_B_A-14-22549AB-40-001.png",
        "BreaKHis_v1/notes.txt",
    ]
    for name in names:
        storage.write_bytes(f"{prefix}/{name}", f"user data: {name}".encode())
    return names


@pytest.mark.s3
def test_demo_data_on_s3_is_read_with_the_users_settings(s3_server, s3_prefix, tmp_path) -> None:
    import os

    from breakhis import storage
    from breakhis.demo import local_data
    from breakhis.dev.s3server import embedded_s3

    names = _user_data(f"{s3_prefix}/raw")
    with (
        local_data(f"{s3_prefix}/raw", str(tmp_path)) as src,
        embedded_s3(buckets=("breakhis",)) as demo_server,
    ):
        # From here on every s3:// URI goes to the demo's own server, with its own
        # credentials, where the user's data is not...
        assert os.environ["AWS_ENDPOINT_URL"] == demo_server.endpoint_url
        assert demo_server.endpoint_url != s3_server.endpoint_url
        assert demo_server.access_key != s3_server.access_key
        assert not storage.exists(f"{s3_prefix}/raw")
        # ...yet the demo reads it: copied with the user's settings before that server started.
        assert Path(src).parent == tmp_path
        found = sorted(str(p.relative_to(src)) for p in Path(src).rglob("*") if p.is_file())
        assert found == sorted(names)
        assert (Path(src) / names[1]).read_bytes() == f"user data: {names[1]}".encode()
    assert not Path(src).exists()  # the copy goes with the demo


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_demo_reads_data_from_the_users_s3_through_the_cli(s3_server, s3_prefix, tmp_path):
    # Before: the demo read --data through its own server (no such bucket there). Now the
    # user's files reach prepare, which finds no decodable image among them.
    _user_data(f"{s3_prefix}/raw")
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "demo", "--data", f"{s3_prefix}/raw",
         "--workdir", str(tmp_path / "demo"), "--trials", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    assert f"copying {s3_prefix}/raw into " in done.stdout
    assert "no image decoded" in done.stderr, done.stderr[-2000:]
    assert "no such file or folder" not in done.stderr
    assert not list((tmp_path / "demo").glob("s3-data-*"))
