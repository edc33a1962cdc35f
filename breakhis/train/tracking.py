"""Experiment tracking in MLflow: every training run and sweep trial, findable later.

    breakhis train ... --tracking-uri sqlite:///runs/mlflow.db
    MLFLOW_TRACKING_URI=http://mlflow.internal:5000 breakhis tune ...
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

Nothing is logged anywhere without a tracking URI (``--tracking-uri``, else the
``MLFLOW_TRACKING_URI`` variable); mlflow is imported only when one is set.

What a run holds: its TrainConfig as parameters (the tracking URI left out),
every epoch's metrics with the epoch as step, tags ``split``, ``manifest_hash``,
``run_uri`` and, once written, ``artifact_uri`` and ``model_id`` (the model
itself stays in the run's storage; the tag links to it), and the curves
(``curves.png``, ``curves.json``) and model card (``model.json``) as artifacts.
A sweep is a parent run with one child run per trial.

Ray Train V2 does not take Tune's logger callbacks, so the driver opens the run
(open_run) before the workers start, world rank 0 logs each epoch as it is
checkpointed (log_epochs), and the driver logs the outputs and closes the run
(finish_training). The run id is kept in the run's folder (``mlflow.json``), so
rerunning the same ``--storage``/``--name`` continues the same MLflow run, as
Ray Train continues the same checkpoints; log_epochs adds whatever epochs the
store lacks, so an epoch whose logging failed is logged at the next call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from breakhis import storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "breakhis"
"""The MLflow experiment of the runs, unless MLFLOW_EXPERIMENT_NAME names another."""
RUN_FILE = "mlflow.json"
"""In a run's (or sweep's) folder: its MLflow run id per tracking URI."""
EPOCH_MARKER = "train_loss"
"""The metric every epoch reports: its steps are the epochs the store has."""
NOT_PARAMS: tuple[str, ...] = ("tracking_uri",)
"""TrainConfig fields not logged as parameters (where the run is logged is no property
of the run)."""
STOP_STATUS = {"completed": "FINISHED", "patience": "FINISHED", "asha": "KILLED", "error": "FAILED"}
"""MLflow status of a sweep's child run for each breakhis.tune.job stop reason."""


def check_uri(uri: str | None) -> None:
    """Raise ValueError when the tracking URI ``uri`` carries a user name or password:
    it would be written into the run's config, checkpoints and model card."""
    if uri is None:
        return
    if not uri.strip():
        raise ValueError("--tracking-uri is empty; give a URI or leave it out (no tracking)")
    parts = urllib.parse.urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"--tracking-uri {parts.scheme}://***@{parts.hostname}...: credentials in the URI "
            "would be saved with the run; pass them as MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the job's environment"
        )


def resolve_uri(uri: str | None) -> str | None:
    """The tracking URI to use: ``uri``, else MLFLOW_TRACKING_URI, else None (no tracking).

    A local store is made absolute (``sqlite:///relative.db``, a plain path), since Tune
    runs each trial in its own working directory. Raises what check_uri raises.
    """
    uri = uri or os.environ.get(ENV_URI) or None
    check_uri(uri)
    if uri is None:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri).resolve().as_uri()
    return uri


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run: where it is and its id (what the Ray workers are handed)."""

    tracking_uri: str
    run_id: str

    def client(self) -> MlflowClient:
        """An MlflowClient of this run's store (no global MLflow state is touched)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


def _artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the database
    (MLflow's default is ./mlruns under whatever the working directory is). None: the
    store's own default (a server, or a file store, decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.parent / "mlartifacts").as_uri()


def experiment_id(client: MlflowClient, tracking_uri: str) -> str:
    """The id of the experiment the runs go to (MLFLOW_EXPERIMENT_NAME, else
    DEFAULT_EXPERIMENT), created when missing."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(tracking_uri))
    except MlflowException:  # another trial created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A config dict as MLflow parameters (strings; None as ``None``), without NOT_PARAMS."""
    return {k: str(v) for k, v in config.items() if k not in NOT_PARAMS}


def _recorded_run_id(folder_uri: str, tracking_uri: str) -> str | None:
    path = storage.join(folder_uri, RUN_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path)).get(tracking_uri)


def _record_run_id(folder_uri: str, tracking_uri: str, run_id: str) -> None:
    path = storage.join(folder_uri, RUN_FILE)
    runs = json.loads(storage.read_bytes(path)) if storage.exists(path) else {}
    runs[tracking_uri] = run_id
    storage.write_bytes(path, json.dumps(runs, indent=2, sort_keys=True).encode())


def open_run(
    tracking_uri: str,
    folder_uri: str,
    *,
    name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> TrackedRun:
    """The MLflow run of the run (or sweep) folder ``folder_uri``, marked RUNNING.

    The run recorded in ``folder_uri``/mlflow.json for this tracking URI is
    continued when the store still has it: parameters it lacks are added, and a
    parameter whose value changed (e.g. ``epochs`` raised to continue a run) is
    kept as first logged, the new value in tag ``changed.<key>``. Otherwise a
    new run named ``name`` is created (a child of ``parent_run_id`` when given)
    and recorded there.

    Returns the TrackedRun. Raises ValueError naming the URI when the store
    cannot be reached or refuses the run (before any worker starts).
    """
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    run = TrackedRun(tracking_uri, "")
    try:
        client = run.client()
        run_id = _recorded_run_id(folder_uri, tracking_uri)
        existing = _live_run(client, run_id)
        if existing is None:
            all_tags = dict(tags)
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            created = client.create_run(
                experiment_id(client, tracking_uri), run_name=name, tags=all_tags
            )
            run_id = created.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            _record_run_id(folder_uri, tracking_uri, run_id)
            log.info("MLflow run %s (%s) in %s", run_id, name, tracking_uri)
        else:
            logged = existing.data.params
            new = [Param(k, v) for k, v in params.items() if k not in logged]
            changed = [
                RunTag(f"changed.{k}", v)
                for k, v in params.items()
                if k in logged and logged[k] != v
            ]
            client.log_batch(run_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()])
            client.log_batch(run_id, tags=changed)
            client.update_run(run_id, status="RUNNING")
            log.info("continuing MLflow run %s (%s) in %s", run_id, name, tracking_uri)
    except (MlflowException, OSError) as err:
        raise ValueError(f"--tracking-uri {tracking_uri}: cannot log the run there: {err}") from err
    return dataclasses.replace(run, run_id=run_id)


def _live_run(client: MlflowClient, run_id: str | None) -> Any:
    """The run ``run_id`` if the store has it and it is not deleted, else None."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return None
    try:
        found = client.get_run(run_id)
    except MlflowException:
        log.warning(
            "MLflow run %s recorded for this run is gone from the store; starting a new one", run_id
        )
        return None
    return found if found.info.lifecycle_stage == "active" else None


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one history row (its ``epoch`` is the step, not a metric)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def log_epochs(run: TrackedRun, history: Sequence[Mapping[str, Any]]) -> int:
    """Log the rows of ``history`` whose epoch the store lacks (step = epoch).

    Returns the number of epochs logged. Never raises: a tracking store that
    fails must not stop a training run; it is logged as a warning and the
    missing epochs are logged by the next call.
    """
    from mlflow.entities import Metric

    try:
        client = run.client()
        have = {m.step for m in client.get_metric_history(run.run_id, EPOCH_MARKER)}
        now = int(time.time() * 1000)
        rows = [r for r in history if int(r["epoch"]) not in have]
        for row in rows:
            step = int(row["epoch"])
            metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(row).items()]
            client.log_batch(run.run_id, metrics=metrics)
        return len(rows)
    except Exception as err:  # any failure of a side channel: warn, training goes on
        log.warning(
            "MLflow run %s: logging epochs failed (%s); retried next epoch", run.run_id, err
        )
        return 0


def _log_files(client: MlflowClient, run_id: str, uris: Sequence[str], path: str | None) -> None:
    """Copy files (local or s3://) into the run's artifacts under ``path``; missing ones
    are skipped."""
    with tempfile.TemporaryDirectory() as folder:
        for uri in uris:
            if not storage.exists(uri):
                continue
            local = Path(folder) / uri.rstrip("/").rsplit("/", 1)[-1]
            local.write_bytes(storage.read_bytes(uri))
            client.log_artifact(run_id, str(local), path)


class FinishedTraining(Protocol):
    """What finish_training reads of a finished run: the fields of
    breakhis.train.result.TrainResult (this module sits below the training modules, which
    log through it, so it names the fields instead of importing the class)."""

    run_uri: str
    artifact_uri: str
    curves_uri: str
    model_id: str
    best_epoch: int
    history: Sequence[Mapping[str, Any]]
    refit_epochs: int


def finish_training(run: TrackedRun, result: FinishedTraining) -> None:
    """Close the run of a finished training: the epochs it lacks, the curves (and the
    refit's), the model card, tags ``artifact_uri``, ``model_id``, ``model_epoch``;
    status FINISHED. Logs a warning instead of raising (the model is written already)."""
    try:
        client = run.client()
        log_epochs(run, result.history)
        curves_json = storage.join(result.run_uri, "curves.json")
        _log_files(client, run.run_id, [result.curves_uri, curves_json], None)
        if result.refit_epochs:
            refit = storage.join(result.run_uri, "refit")
            files = [storage.join(refit, "curves.png"), storage.join(refit, "curves.json")]
            _log_files(client, run.run_id, files, "refit")
        _log_files(client, run.run_id, [storage.join(result.artifact_uri, "model.json")], None)
        tags = {
            "artifact_uri": result.artifact_uri,
            "model_id": result.model_id,
            "model_epoch": str(result.best_epoch),
        }
        for key, value in tags.items():
            client.set_tag(run.run_id, key, value)
        client.set_terminated(run.run_id, status="FINISHED")
    except Exception as err:  # the run's outputs are written; only their record failed
        log.warning("MLflow run %s: recording the outputs failed: %s", run.run_id, err)


def fail(run: TrackedRun) -> None:
    """Mark the run FAILED (a rerun that resumes it marks it RUNNING again); never raises."""
    try:
        run.client().set_terminated(run.run_id, status="FAILED")
    except Exception as err:  # already failing: do not hide the first error
        log.warning("MLflow run %s: cannot mark it failed: %s", run.run_id, err)


def child_run_id(tracking_uri: str, run_uri: str) -> str | None:
    """The MLflow run id recorded in a training run's folder for ``tracking_uri``."""
    return _recorded_run_id(run_uri, tracking_uri)


def finish_sweep(
    parent: TrackedRun,
    rows: Sequence[Mapping[str, Any]],
    *,
    leaderboard_uri: str,
    metric: str,
) -> None:
    """Close a sweep's parent run: each trial's child run gets tags ``stop_reason`` and
    ``rank`` and, if still RUNNING (a trial ASHA stopped never closes its own run) or an
    ASHA-stopped trial's run marked FAILED by its own stop, the status of STOP_STATUS; the
    parent gets the leaderboard (Parquet and CSV), tags ``best_trial_id`` and
    ``best_artifact_uri``, metric ``best_<metric>``; status FINISHED. Logs a warning instead
    of raising (the sweep's outputs are written)."""
    try:
        client = parent.client()
        for row in rows:
            run_id = child_run_id(parent.tracking_uri, row["run_uri"])
            if run_id is None:
                continue
            client.set_tag(run_id, "stop_reason", row["stop_reason"])
            client.set_tag(run_id, "rank", str(row["rank"]))
            status = client.get_run(run_id).info.status
            # A trial ASHA stops may be cut down while its own code marks the run FAILED
            # (the stop reaches it as an exception): the sweep knows why it ended.
            if status == "RUNNING" or (row["stop_reason"] == "asha" and status == "FAILED"):
                client.set_terminated(run_id, status=STOP_STATUS[row["stop_reason"]])
        csv = leaderboard_uri.removesuffix(".parquet") + ".csv"
        _log_files(client, parent.run_id, [leaderboard_uri, csv], None)
        best = next((r for r in rows if r.get("artifact_uri")), None)
        if best is not None:
            client.set_tag(parent.run_id, "best_trial_id", best["trial_id"])
            client.set_tag(parent.run_id, "best_artifact_uri", best["artifact_uri"])
            value = best.get(metric)
            if value is not None and math.isfinite(float(value)):
                client.log_metric(parent.run_id, f"best_{metric}", float(value))
        client.set_terminated(parent.run_id, status="FINISHED")
    except Exception as err:  # the leaderboard and best model are written already
        log.warning("MLflow sweep run %s: recording the results failed: %s", parent.run_id, err)
