"""Sweeps: search-space files and their errors, the sweep's resource arithmetic, then
real Ray Tune sweeps of Train V2 runs on generated data (ASHA stops, leaderboard, best
artifact) and a sweep whose driver is killed and resumed."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import small_train_config

from breakhis.ray_internals import orphaned_placement_groups
from breakhis.train.config import TrainConfig
from breakhis.tune.config import SweepConfig, derive_max_concurrent
from breakhis.tune.job import resolve_space, run_sweep
from breakhis.tune.search_space import (
    DEFAULT_SEARCH_SPACE,
    SearchSpaceError,
    check_search_space,
    load_search_space,
    parse_search_space,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SIDE = 32  # generated tiles are SIDE x SIDE, so trials train without resizing


def _train(data: str, storage: str, **overrides) -> TrainConfig:
    """A smallcnn training run small enough for a 2-core machine."""
    values = {"name": "sweep", "image_size": SIDE, "epochs": 3, "patience": 0, **overrides}
    return small_train_config(data, storage, **values)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# --------------------------------------------------------------------------- no Ray


def test_the_shipped_search_space_is_the_default_and_fits_the_default_run() -> None:
    path = REPO_ROOT / "cluster" / "search_space.yaml"
    assert yaml.safe_load(path.read_text()) == DEFAULT_SEARCH_SPACE
    space = load_search_space(str(path))
    assert space.to_dict() == DEFAULT_SEARCH_SPACE
    assert load_search_space(None).to_dict() == DEFAULT_SEARCH_SPACE
    check_search_space(space, TrainConfig(data="d", storage="s", name="n", val_fraction=0.2))
    wanted = {"lr", "weight_decay", "batch_size", "freeze_epochs", "augment_strength"}
    assert wanted | {"label_smoothing", "dropout", "arch"} <= set(space.keys)


def test_the_default_space_from_random_weights_leaves_out_what_needs_pretrained_ones(
    tmp_path: Path,
) -> None:
    base = TrainConfig(
        data="d", storage=str(tmp_path), name="n", arch="resnet18", weights="none", val_fraction=0.2
    )
    space = resolve_space(SweepConfig(train=base))
    assert "freeze_epochs" not in space.keys
    assert set(space.keys) == set(DEFAULT_SEARCH_SPACE) - {"freeze_epochs"}
    pretrained = dataclasses.replace(base, weights="imagenet")
    assert "freeze_epochs" in resolve_space(SweepConfig(train=pretrained)).keys


def test_a_space_file_becomes_tune_domains(tmp_path: Path) -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_search_space(
        _write(
            tmp_path,
            """
            lr: {loguniform: [1e-4, 1.0e-2]}   # PyYAML reads 1e-4 as text: accepted
            batch_size: {randint: [16, 65]}
            arch: {grid: [resnet18, resnet50]}
            dropout: 0.3
            oversample: {choice: [true, false]}
            """,
        )
    )
    domains = space.to_tune()
    assert isinstance(domains["lr"], Float) and domains["lr"].lower == pytest.approx(1e-4)
    assert isinstance(domains["batch_size"], Integer)
    assert domains["arch"] == {"grid_search": ["resnet18", "resnet50"]}
    assert domains["dropout"] == 0.3
    assert isinstance(domains["oversample"], Categorical)
    assert space.grid_size == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: {loguniform: [1.0e-4, 1.0e-2]}", "unknown key 'learning_rate'"),
        ("lrr: {loguniform: [1.0e-4, 1.0e-2]}", "did you mean 'lr'"),
        ("epochs: {choice: [5, 10]}", "'epochs' is fixed for the whole sweep"),
        ("split: fold:1", "'split' is fixed"),
        ("lr: {normal: [0.001, 0.0001]}", "key 'lr': unknown distribution 'normal'"),
        ("lr: [0.001, 0.01]", "key 'lr': a bare list is ambiguous"),
        ("lr: {loguniform: [0.0, 0.01]}", "key 'lr' \\(loguniform\\): loguniform needs low > 0"),
        ("lr: {uniform: [0.01, 0.001]}", "key 'lr' \\(uniform\\): low \\(0.01\\) must be below"),
        ("lr: {uniform: [fast, 0.1]}", "key 'lr' \\(uniform\\): expected a number"),
        ("batch_size: {uniform: [16, 64]}", "key 'batch_size' .*integer option; use choice"),
        ("batch_size: {choice: [16, 16.5]}", "key 'batch_size' .*expected an integer"),
        ("arch: {loguniform: [1, 2]}", "key 'arch' .*not numeric; use choice or grid"),
        ("arch: {choice: [resnet50, resnet50]}", "key 'arch' \\(choice\\): values repeat"),
        ("lr: {loguniform: [1.0e-4, 1.0e-2], choice: [1]}", "key 'lr': expected one distribution"),
        ("[lr, dropout]", "expected a mapping of option -> distribution"),
        ("lr: {loguniform: [1.0e-4, 1.0e-2]\n", "not valid YAML"),
    ],
)
def test_bad_space_files_fail_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SearchSpaceError, match=message) as caught:
        load_search_space(path)
    assert path in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arch: {choice: [resnet18, resnet51]}", "key 'arch': 'resnet51' .*unknown model"),
        ("dropout: {uniform: [0.0, 1.0]}", "key 'dropout': 1.0 .*--dropout must be in \\[0, 1\\)"),
        ("freeze_epochs: {choice: [0, -1]}", "key 'freeze_epochs': -1(\\.0)? .*must be >= 0"),
        (
            "arch: {choice: [smallcnn, resnet18]}\nweights: {choice: [none, imagenet]}",
            "keys 'arch' = 'smallcnn' and 'weights' = 'imagenet' cannot go together",
        ),
    ],
)
def test_values_are_checked_against_the_sweeps_options(
    tmp_path: Path, text: str, message: str
) -> None:
    space = load_search_space(_write(tmp_path, text))
    with pytest.raises(SearchSpaceError, match=message):
        check_search_space(space, _train("d", "s", arch="resnet18"))


def test_a_bad_space_fails_before_any_trial(tmp_path: Path) -> None:
    path = _write(tmp_path, "dropout: {uniform: [0.1, 1.5]}")
    config = SweepConfig(train=_train(str(tmp_path / "data"), str(tmp_path / "sweeps")),
                         search_space=path)  # fmt: skip
    with pytest.raises(SearchSpaceError, match="key 'dropout': 1.5"):
        run_sweep(config)  # no Ray needed: nothing has started
    assert not (tmp_path / "sweeps").exists()
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        run_sweep(SweepConfig(train=config.train, search_space=str(tmp_path / "nowhere.yaml")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"gpus_per_trial": 3, "workers_per_trial": 2},
            "1.5 GPUs per worker.*--workers-per-trial to 3",
        ),
        ({"num_samples": 0}, "--num-samples must be >= 1"),
        ({"scheduler": "pbt"}, "--scheduler 'pbt' unknown; accepted: asha, fifo"),
        ({"grace_period": 3}, "--grace-period must be in 1..2"),
        ({"reduction_factor": 1.0}, "--reduction-factor must be > 1"),
        ({"max_concurrent_trials": 0}, "--max-concurrent-trials must be >= 1"),
    ],
)
def test_sweep_config_errors_name_the_option(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SweepConfig(train=_train("d", "s"), **overrides)
    with pytest.raises(ValueError, match="ASHA needs at least 2 epochs"):
        SweepConfig(train=_train("d", "s", epochs=1))
    SweepConfig(train=_train("d", "s", epochs=1), scheduler="fifo")


def test_concurrency_follows_the_scarcest_resource() -> None:
    whole = SweepConfig(train=_train("d", "s", cpus_per_worker=4), gpus_per_trial=1)
    assert (whole.num_workers, whole.gpus_per_worker) == (1, 1.0)
    assert whole.trial_request() == {"CPU": 0.25 + 4 + 1, "GPU": 1}
    assert derive_max_concurrent({"CPU": 64, "GPU": 8}, whole.trial_request(), 32) == 8
    assert derive_max_concurrent({"CPU": 16, "GPU": 8}, whole.trial_request(), 32) == 3

    shared = SweepConfig(train=_train("d", "s"), gpus_per_trial=0.25)
    assert (shared.num_workers, shared.gpus_per_worker) == (1, 0.25)
    assert derive_max_concurrent({"CPU": 64, "GPU": 2}, shared.trial_request(), 32) == 8
    assert derive_max_concurrent({"CPU": 64, "GPU": 2}, shared.trial_request(), 5) == 5

    multi = SweepConfig(train=_train("d", "s"), gpus_per_trial=2)
    assert (multi.num_workers, multi.gpus_per_worker) == (2, 1.0)
    cpu = SweepConfig(train=_train("d", "s"))
    assert cpu.trial_request() == {"CPU": 2.25}
    assert derive_max_concurrent({"CPU": 4}, cpu.trial_request(), 4) == 1
    # Nothing fits now (e.g. GPUs an autoscaler has yet to add): one at a time, not zero.
    assert derive_max_concurrent({"CPU": 8}, whole.trial_request(), 4) == 1


def test_benchmark_figures_and_options() -> None:
    from dataclasses import asdict

    from breakhis.benchmarks.tune import TuneBenchmarkConfig, TuneBenchmarkResult

    config = TuneBenchmarkConfig(trials=4)
    assert config.learning_rates() == [0.001, 0.00215, 0.00464, 0.01]
    assert TuneBenchmarkConfig(trials=1).learning_rates() == [0.003]
    result = TuneBenchmarkResult(
        date="2026-11-22",
        device="test CPU",
        config=asdict(config),
        train_images=96,
        job_run_s=[10.0, 11.0, 12.0, 13.0],
        job_wall_s=46.0,
        sweep_wall_s=66.0,
        warmup_s=9.0,
    )
    assert result.overhead_per_trial_s == pytest.approx(5.0)
    assert result.job_trials_per_hour == pytest.approx(3600 * 4 / 46)
    assert result.sweep_trials_per_hour == pytest.approx(3600 * 4 / 66)
    table = result.format_table()
    assert "Scheduler overhead per trial: +5.0 s" in table and "| 46.0 |" in table
    assert result.to_dict()["overhead_per_trial_s"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="--trials must be >= 1"):
        TuneBenchmarkConfig(trials=0)


# --------------------------------------------------------------------------- Ray sweeps


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    """Generated BreakHis-shaped tiles (~160 images, 31 patients) at 32 px, prepared."""
    return make_prepared(scale=0.02, width=SIDE, height=SIDE)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_bad_trials_the_best_model_is_kept_on_s3_and_mlflow_has_a_run_per_trial(
    prepared: str, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sweep, two behaviours (a sweep costs a minute here): ASHA stops the bad trials
    and the best model is kept; the sweep is an MLflow parent run with a child per trial
    (this was test_tracking's own sweep until 2026-12-07)."""
    import ray

    from breakhis import storage
    from breakhis.model.artifact import load_artifact, read_card
    from breakhis.train import tracking

    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv(tracking.ENV_EXPERIMENT, raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"

    # One trial at a time (2.25 CPUs each on 4), so trials reach the rungs in grid order.
    # lr 0.5 and 1.0 leave a worse model after one epoch than lr 1e-2 (how much worse varies:
    # PreciseBN and the fitted temperature rescue much of it, 0.39 against 0.27 in one CI run).
    space = parse_search_space({"lr": {"grid": [1.0e-2, 3.0e-3, 0.5, 1.0]}}, "test grid")
    config = SweepConfig(
        train=_train(prepared, f"{s3_prefix}/sweeps", name="asha", tracking_uri=store),
        search_space=space,
        num_samples=1,
        reduction_factor=2,  # rungs at epochs 1 and 2 of 3
        progress=0,
    )
    result = run_sweep(config)
    assert not result.resumed
    rows = {row["lr"]: row for row in result.rows}
    assert sorted(rows) == [3.0e-3, 1.0e-2, 0.5, 1.0]
    # The first trial is the first to reach every rung: nothing to compare it with.
    assert (rows[1.0e-2]["stop_reason"], rows[1.0e-2]["epochs_run"]) == ("completed", 3)
    for lr in (0.5, 1.0):
        assert (rows[lr]["stop_reason"], rows[lr]["epochs_run"]) == ("asha", 1), rows[lr]
        assert rows[lr]["val_loss"] > rows[1.0e-2]["val_loss"], (rows[lr], rows[1.0e-2])
    for row in result.rows:
        completed = row["stop_reason"] == "completed"
        assert row["stop_reason"] in ("completed", "asha"), row
        assert row["epochs_run"] in ((3,) if completed else (1, 2))  # ASHA stops at rungs
        assert (row["artifact_uri"] is not None) == completed
        if completed:
            assert storage.exists(f"{row['artifact_uri']}/model.json")
        assert 1 <= row["best_epoch"] <= row["epochs_run"]
    # Stopped trials' Train workers gave their CPUs back (breakhis.tune.job releases them).
    assert orphaned_placement_groups() == []
    deadline = time.monotonic() + 60  # the last trial's actors take a moment to go
    while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(1)
    assert [row["rank"] for row in result.rows] == [1, 2, 3, 4]
    assert [row["val_loss"] for row in result.rows] == sorted(r["val_loss"] for r in result.rows)

    fs, path = storage.resolve(result.leaderboard_uri)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == 4
    assert table.column("trial_id").to_pylist() == [r["trial_id"] for r in result.rows]
    assert table.column("stop_reason").to_pylist() == [r["stop_reason"] for r in result.rows]
    assert {"epochs_run", "best_epoch", "val_loss", "val_roc_auc", "lr", "config"} <= set(
        table.column_names
    )
    csv = pacsv.read_csv(io.BytesIO(storage.read_bytes(f"{config.experiment_uri}/leaderboard.csv")))
    assert csv.num_rows == 4
    assert "asha" in result.format_table() and rows[1.0e-2]["trial_id"] in result.format_table()

    best = next(r for r in result.rows if r["trial_id"] == result.best_trial_id)
    finished = [r for r in result.rows if r["stop_reason"] == "completed"]
    assert best["val_loss"] == min(r["val_loss"] for r in finished)
    assert result.best_artifact_uri == f"{s3_prefix}/sweeps/asha/best"
    model, card = load_artifact(result.best_artifact_uri)
    assert card.model_id == read_card(best["artifact_uri"]).model_id
    assert (card.architecture, card.image_size) == ("smallcnn", SIDE)
    assert card.config["lr"] == best["lr"]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, SIDE, SIDE)).shape == (2, 2)
    _check_sweep_tracking(store, result, space_dict={"lr": {"grid": [0.01, 0.003, 0.5, 1.0]}})

    # The same command again finds the finished sweep: no trial runs twice.
    again = run_sweep(config)
    assert again.resumed
    assert [(r["trial_id"], r["stop_reason"]) for r in again.rows] == [
        (r["trial_id"], r["stop_reason"]) for r in result.rows
    ]
    # A rerun with other options under the same name is refused before anything runs.
    other = SweepConfig(train=config.train, search_space=space, num_samples=2, progress=0)
    with pytest.raises(ValueError, match="num-samples 1 \\(now 2\\)"):
        run_sweep(other)


def _check_sweep_tracking(store: str, result, space_dict: dict) -> None:
    """The sweep in the MLflow store ``store``: a parent run (its search space, best trial
    and leaderboard) with one child per trial (its lr, stop reason and status, an epoch
    logged per epoch it ran, its artifact)."""
    import json

    from mlflow import MlflowClient

    from breakhis.train.tracking import STOP_STATUS

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("breakhis").experiment_id
    [parent] = client.search_runs([experiment], "tags.sweep_uri != ''")
    assert parent.info.run_name == "asha" and parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["search_space"]) == space_dict
    assert parent.data.tags["best_trial_id"] == result.best_trial_id
    logged = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.parquet", "leaderboard.csv"} <= logged
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(f"trial-{r['trial_id']}" for r in result.rows)
    for row in result.rows:
        child = by_name[f"trial-{row['trial_id']}"]
        assert float(child.data.params["lr"]) == row["lr"]
        assert child.data.tags["stop_reason"] == row["stop_reason"]
        assert child.info.status == STOP_STATUS[row["stop_reason"]], (row, child.info.status)
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_loss"))
        epochs = list(range(1, row["epochs_run"] + 1))
        if row["stop_reason"] == "completed":
            assert steps == epochs
            assert child.data.tags["artifact_uri"] == row["artifact_uri"]
        else:  # ASHA may stop the trial before its worker logs the epoch it reported
            assert set(steps) <= set(epochs)


def _interrupted_sweep(prepared: str, storage: str) -> SweepConfig:
    """Three trials of one epoch, one at a time, no early stopping: the sweep the
    interrupt test kills (in a subprocess) and resumes (here). One epoch: what is resumed
    is whole trials (a trial's epochs resuming is test_train's)."""
    return SweepConfig(
        train=_train(prepared, storage, name="killed", epochs=1),
        search_space=parse_search_space({"lr": {"grid": [1.0e-2, 3.0e-3, 1.0e-3]}}, "grid"),
        num_samples=1,
        scheduler="fifo",
        max_concurrent_trials=1,
        progress=0,
    )


_DRIVER = """
import sys
import ray
sys.path.insert(0, sys.argv[3])
from test_tune import _interrupted_sweep
from breakhis.tune.job import run_sweep
ray.init(address=sys.argv[4], configure_logging=False, log_to_driver=False)
run_sweep(_interrupted_sweep(sys.argv[1], sys.argv[2]))
"""


def _terminated_trials(experiment: Path) -> set[str]:
    """Trials the sweep's saved state records as finished (what a restore will keep)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(experiment)).trials
    except Exception:  # no state saved yet, or caught mid-write: ask again later
        return set()
    return {t.trial_id for t in trials if t.status == "TERMINATED"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_sweep_resumes_keeping_finished_trials(prepared: str, tmp_path: Path) -> None:
    import ray

    sweeps = tmp_path / "sweeps"
    experiment = sweeps / "killed"
    # The sweep's driver as `ray job submit` runs it: its own process on the running cluster.
    cluster = ray.get_runtime_context().gcs_address
    args = [prepared, str(sweeps), str(Path(__file__).parent), cluster]
    output = tmp_path / "driver.log"
    with output.open("wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, *args], cwd=REPO_ROOT, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 600
        finished: set[str] = set()
        while not finished:
            assert driver.poll() is None, output.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished within 10 minutes"
            time.sleep(2)
            finished = _terminated_trials(experiment)
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # no clean-up: as if its node died
        driver.wait()
    assert len(finished) < 3, "the sweep ended before it was killed: nothing to resume"
    models = {t: experiment / "runs" / f"trial-{t}" / "model" / "model.json" for t in finished}
    written = {t: path.stat().st_mtime_ns for t, path in models.items()}

    result = run_sweep(_interrupted_sweep(prepared, str(sweeps)))
    assert result.resumed
    assert len(result.rows) == 3
    assert {r["stop_reason"] for r in result.rows} == {"completed"}
    assert {r["epochs_run"] for r in result.rows} == {1}
    assert finished <= {r["trial_id"] for r in result.rows}
    assert len({r["trial_id"] for r in result.rows}) == 3
    # Trials that had finished were kept, not trained again.
    assert {t: path.stat().st_mtime_ns for t, path in models.items()} == written
    assert (experiment / "best" / "model.json").is_file()
