"""MLflow tracking: runs read back from a real SQLite store with MLflow's own client. The
tracked Ray runs (a training run and its resumption, a sweep's parent and child runs) are
checked in test_train.py and test_tune.py, on runs those tests make anyway (end of file)."""

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
#
# A tracked training run and its rerun, and a tracked sweep, cost a minute or more each on
# 2 cores; they share the runs other slow tests make anyway (merged 2026-12-07 to keep CI
# within its time budget):
# - tests/test_train.py::test_rerun_resumes_at_the_next_epoch_on_s3_and_continues_its_mlflow_run
#   (parameters, tags, metrics per epoch and artifacts; the rerun continues the same run);
# - tests/test_tune.py::test_asha_stops_bad_trials_the_best_model_is_kept_on_s3_and_mlflow_has_a_run_per_trial
#   (the sweep's parent run and one child per trial, stopped trials included).
