"""MLflow tracking: runs read back from a real SQLite store with MLflow's own client,
a training run, its resumption, and a sweep's parent and child runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_train_config

from breakhis.train import tracking
from breakhis.train.config import TrainConfig

SIDE = 32


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store; the tracking variables of the environment cleared."""
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv(tracking.ENV_EXPERIMENT, raising=False)
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


# --------------------------------------------------------------------------- no Ray


def test_no_uri_no_tracking_and_the_variable_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    assert tracking.resolve_uri(None) is None
    monkeypatch.setenv(tracking.ENV_URI, "http://mlflow.internal:5000")
    assert tracking.resolve_uri(None) == "http://mlflow.internal:5000"
    assert tracking.resolve_uri("http://other:5000") == "http://other:5000"
    # Local stores become absolute: Tune trials run in other working directories.
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///runs/mlflow.db") == (
        f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    )
    assert tracking.resolve_uri("mlruns") == (tmp_path / "mlruns").as_uri()


def test_credentials_in_the_uri_are_refused_without_repeating_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_USERNAME") as err:
        small_train_config("data", str(tmp_path), tracking_uri="https://me:s3cret@mlflow.example")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match="--tracking-uri is empty"):
        small_train_config("data", str(tmp_path), tracking_uri=" ")


def test_the_tracking_uri_round_trips_and_is_not_a_parameter(tmp_path: Path) -> None:
    config = small_train_config("data", str(tmp_path), tracking_uri="sqlite:////x/mlflow.db")
    assert TrainConfig.from_dict(config.to_dict()) == config
    params = tracking.config_params(config.to_dict())
    assert "tracking_uri" not in params
    assert params["arch"] == "smallcnn" and params["magnification"] == "None"


def test_a_run_folder_keeps_its_run_and_epochs_are_logged_once(store: str, tmp_path: Path) -> None:
    folder = str(tmp_path / "runs" / "a")
    params = {"lr": "0.001", "epochs": "2"}
    first = tracking.open_run(store, folder, name="a", params=params, tags={"split": "fold:0"})
    history = [{"epoch": 1, "train_loss": 0.9, "val_loss": float("nan")}]
    assert tracking.log_epochs(first, history) == 1
    history.append({"epoch": 2, "train_loss": 0.5, "val_loss": 0.7, "backbone_frozen": True})
    assert tracking.log_epochs(first, history) == 1  # only the new epoch
    assert tracking.log_epochs(first, history) == 0

    # The same folder again (a resumed run): the same MLflow run, the new value of a
    # parameter kept as a tag (MLflow parameters cannot change).
    again = tracking.open_run(
        store, folder, name="a", params={**params, "epochs": "3"}, tags={"split": "fold:0"}
    )
    assert again == first
    client = _client(store)
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "a"
    assert run.data.params == params
    assert run.data.tags["changed.epochs"] == "3" and run.data.tags["split"] == "fold:0"
    assert _steps(client, first.run_id, "train_loss") == [1, 2]
    assert _steps(client, first.run_id, "val_loss") == [1, 2]
    assert "epoch" not in run.data.metrics and "backbone_frozen" not in run.data.metrics
    recorded = json.loads((tmp_path / "runs" / "a" / tracking.RUN_FILE).read_text())
    assert recorded == {store: first.run_id}

    # Artifacts of a SQLite store go beside it, not into the working directory.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.DEFAULT_EXPERIMENT
    assert experiment.artifact_location == (tmp_path / "mlflow" / "mlartifacts").as_uri()

    # Another store: another run, recorded beside the first.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    elsewhere = tracking.open_run(other, folder, name="a", params=params, tags={})
    assert elsewhere.run_id != first.run_id
    recorded = json.loads((tmp_path / "runs" / "a" / tracking.RUN_FILE).read_text())
    assert recorded == {store: first.run_id, other: elsewhere.run_id}


def test_an_unusable_store_fails_naming_the_uri(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    with pytest.raises(ValueError, match="--tracking-uri sqlite:///.*cannot log the run there"):
        tracking.open_run(uri, str(tmp_path / "run"), name="a", params={}, tags={})


# --------------------------------------------------------------------------- Ray runs


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    """Generated BreakHis-shaped tiles (~160 images, 31 patients) at 32 px, prepared."""
    return make_prepared(scale=0.02, width=SIDE, height=SIDE)


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_run_is_logged_and_a_rerun_continues_it(
    prepared: str, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from breakhis.train.job import run_training

    config = small_train_config(
        prepared, str(tmp_path / "runs"), name="tracked", image_size=SIDE, epochs=2
    )
    first = run_training(TrainConfig.from_dict({**config.to_dict(), "tracking_uri": store}))
    client = _client(store)
    [run] = client.search_runs([client.get_experiment_by_name("breakhis").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == tracking.config_params(config.to_dict())
    assert _steps(client, run_id, "train_loss") == [1, 2]
    assert _steps(client, run_id, "val_roc_auc") == [1, 2]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert logged == {int(r["epoch"]): pytest.approx(r["val_loss"]) for r in first.history}
    tags = run.data.tags
    assert tags["split"] == "fold:0" and len(tags["manifest_hash"]) > 8
    assert tags["artifact_uri"] == first.artifact_uri and tags["model_id"] == first.model_id
    assert tags["run_uri"] == first.run_uri
    assert {"curves.png", "curves.json", "model.json"} <= _artifacts(client, run_id)
    card = json.loads(
        Path(client.download_artifacts(run_id, "model.json", str(tmp_path))).read_text()
    )
    assert card["model_id"] == first.model_id

    # The same storage and name with more epochs resumes the checkpoint and the MLflow run;
    # the tracking URI comes from the environment this time.
    monkeypatch.setenv(tracking.ENV_URI, store)
    second = run_training(TrainConfig.from_dict({**config.to_dict(), "epochs": 3}))
    assert [int(r["epoch"]) for r in second.history] == [1, 2, 3]
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["changed.epochs"] == "3" and runs[0].data.params["epochs"] == "2"
    assert _steps(client, run_id, "train_loss") == [1, 2, 3]
    assert runs[0].data.tags["model_id"] == second.model_id


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_is_a_parent_run_with_a_child_per_trial(
    prepared: str, store: str, tmp_path: Path
) -> None:
    from breakhis.tune.job import SweepConfig, run_sweep
    from breakhis.tune.search_space import parse_search_space

    train = small_train_config(
        prepared,
        str(tmp_path / "sweeps"),
        name="tracked-sweep",
        image_size=SIDE,
        epochs=2,
        tracking_uri=store,
    )
    config = SweepConfig(
        train=train,
        search_space=parse_search_space({"lr": {"grid": [1.0e-2, 3.0e-3]}}, "grid"),
        num_samples=1,
        scheduler="fifo",
        max_concurrent_trials=1,
        progress=0,
    )
    result = run_sweep(config)
    client = _client(store)
    experiment = client.get_experiment_by_name("breakhis").experiment_id
    [parent] = client.search_runs([experiment], "tags.sweep_uri != ''")
    assert parent.info.run_name == "tracked-sweep" and parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["search_space"]) == {"lr": {"grid": [0.01, 0.003]}}
    assert parent.data.tags["best_trial_id"] == result.best_trial_id
    assert {"leaderboard.parquet", "leaderboard.csv"} <= _artifacts(client, parent.info.run_id)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(f"trial-{r['trial_id']}" for r in result.rows)
    for row in result.rows:
        child = by_name[f"trial-{row['trial_id']}"]
        assert float(child.data.params["lr"]) == row["lr"]
        assert child.data.tags["stop_reason"] == "completed" and child.info.status == "FINISHED"
        assert _steps(client, child.info.run_id, "val_loss") == [1, 2]
        assert child.data.tags["artifact_uri"] == row["artifact_uri"]

    # The same command again resumes the (finished) sweep: the same parent, no new child.
    again = run_sweep(config)
    assert again.resumed
    assert len(client.search_runs([experiment])) == 3
