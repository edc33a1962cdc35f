"""The training job: pure per-epoch pieces, then real 2-worker Ray Train runs on
generated data (learning, resume, failure recovery) and every bad-input error."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_train_config

import breakhis.train.job as train_module
import breakhis.train.loop as loop_module
from breakhis.data.splits import LeakageError
from breakhis.model.networks import WeightsError, build_model, split_parameters
from breakhis.stats.metrics import classification_metrics, majority_rate
from breakhis.train.config import TrainConfig
from breakhis.train.epoch import (
    early_stopping,
    evaluate,
    kept_epoch,
    lr_scale,
    make_loss,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from breakhis.train.job import run_training
from breakhis.train.loop import load_checkpoint_state
from breakhis.train.result import write_curves

SIDE = 64  # generated tiles are SIDE x SIDE, so the tests train without resizing


def _config(tmp_path: Path, data: str, **overrides) -> TrainConfig:
    storage = overrides.pop("storage", str(tmp_path / "runs"))
    return small_train_config(data, storage, **{"lr": 3e-3, "num_workers": 2, **overrides})


# --------------------------------------------------------------------------- no Ray


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "resnet51"}, "unknown model 'resnet51'; accepted: resnet50"),
        ({"optimizer": "adam"}, "--optimizer 'adam' unknown; accepted: adamw, sgd"),
        ({"metric": "val_auc"}, "--metric 'val_auc' unknown; accepted: val_loss"),
        ({"val_fraction": 1.0}, r"--val-fraction must be in \[0, 1\)"),
        ({"patience": 2, "val_fraction": 0.0}, "--patience need.* validation patients: set --val"),
        ({"refit": True, "val_fraction": 0.0}, "--refit need.* validation patients"),
        (
            {"threshold_rule": "accuracy", "val_fraction": 0.0},
            "--threshold-rule accuracy need.* validation",
        ),
        ({"geometry": "circle"}, "--geometry 'circle' unknown; accepted: aspect, square"),
        ({"name": "runs/x"}, "no slashes"),
        ({"split": "fold0"}, "expected fold:K or rep:K"),
        ({"threshold_rule": "f1"}, "--threshold-rule 'f1' unknown; accepted: argmax, balanced"),
        ({"bn_recalibration_batches": -1}, "--bn-recalibration-batches must be >= 0"),
        ({"weights": "imagenet"}, "smallcnn has no ImageNet weights"),
        ({"magnification": 50}, "accepted 40, 100, 200, 400"),
        ({"batch_size": 0}, "--batch-size must be > 0"),
    ],
)
def test_config_errors_name_the_option(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, "data", **overrides)


def test_fine_tuning_defaults_follow_the_weights(tmp_path: Path) -> None:
    random_init = _config(tmp_path, "data", weights="none", freeze_epochs=None)
    assert (random_init.epochs_frozen, random_init.backbone_lr_ratio) == (0, 1.0)
    pretrained = dataclasses.replace(random_init, arch="resnet18", weights="s3://b/rn18.pt")
    assert (pretrained.epochs_frozen, pretrained.backbone_lr_ratio) == (1, 0.1)
    # An explicit value wins, whatever the weights.
    explicit = _config(tmp_path, "data", weights="none", freeze_epochs=2, backbone_lr_scale=0.5)
    assert (explicit.epochs_frozen, explicit.backbone_lr_ratio) == (2, 0.5)
    # Unset stays unset through a dict (a Tune trial that varies the weights re-derives them).
    assert TrainConfig.from_dict(random_init.to_dict()).freeze_epochs is None
    backbone, head = split_parameters(build_model("smallcnn"), "smallcnn")
    groups = make_optimizer(random_init, backbone, head).param_groups
    assert groups[0]["lr"] == groups[1]["lr"] == random_init.lr


def test_fit_decision_calibrates_then_thresholds_the_validation_predictions() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    # A model 4x too confident and shifted towards benign by 6 logits.
    calibrated = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.0, labels.size)
    margins = 4.0 * calibrated - 6.0
    predictions = loop_module.Predictions(
        margins=margins,
        probs=1 / (1 + np.exp(-margins)),
        labels=labels,
        patient_ids=np.array([f"P{i % 40}" for i in range(labels.size)]),
    )
    temperature, threshold, fitted = loop_module.fit_decision(predictions, "balanced_accuracy")
    assert (
        fitted and temperature > 2.0
    )  # the overconfidence is seen (the fit also absorbs the shift)
    called = 1 / (1 + np.exp(-margins / temperature)) >= threshold
    assert classification_metrics(labels, called.astype(float))["balanced_accuracy"] > 0.80
    # At 0.5 without calibration the shift costs several points.
    assert classification_metrics(labels, predictions.probs)["balanced_accuracy"] < 0.70
    # argmax fits nothing, whatever the predictions.
    assert loop_module.fit_decision(predictions, "argmax") == (1.0, 0.5, False)


def test_no_decision_is_fitted_on_fewer_than_five_patients_of_a_class() -> None:
    """The paper-sized splits hold ~5 validation patients, 2 of them benign: a threshold
    fitted there ranged 0.23-0.92 over splits. Below 5 patients a class, argmax."""
    from breakhis.train.epoch import MIN_DECISION_PATIENTS, patients_per_class

    rng = np.random.default_rng(1)

    def predictions(benign_patients: int) -> object:
        patients = [f"B{i}" for i in range(benign_patients)] + [f"M{i}" for i in range(6)]
        ids = np.repeat(patients, 20)
        labels = np.array([0 if p.startswith("B") else 1 for p in ids])
        margins = np.where(labels == 1, 1.0, -1.0) * 3.0 - 4.0 + rng.normal(0, 0.5, labels.size)
        return loop_module.Predictions(margins, 1 / (1 + np.exp(-margins)), labels, ids)

    few = predictions(MIN_DECISION_PATIENTS - 1)
    assert patients_per_class(few) == (4, 6)
    assert loop_module.fit_decision(few, "balanced_accuracy") == (1.0, 0.5, False)
    enough = predictions(MIN_DECISION_PATIENTS)
    temperature, threshold, fitted = loop_module.fit_decision(enough, "balanced_accuracy")
    assert fitted and threshold < 0.5  # the shift towards benign is corrected


def test_config_round_trips_through_a_dict(tmp_path: Path) -> None:
    config = _config(tmp_path, "data", metric="val_roc_auc")
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.metric_mode == "max" and _config(tmp_path, "data").metric_mode == "min"
    with pytest.raises(ValueError, match="unknown training option.*colour"):
        TrainConfig.from_dict({**config.to_dict(), "colour": 1})


def test_lr_warms_up_then_follows_a_cosine_to_the_floor() -> None:
    scales = [lr_scale(s, total_steps=100, warmup_steps=10, min_scale=0.01) for s in range(101)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0)
    assert scales[10] == pytest.approx(1.0)
    assert scales[55] == pytest.approx(0.01 + 0.99 * 0.5)
    assert scales[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(scales[10:], scales[11:], strict=False))


def test_early_stopping_counts_epochs_since_the_best() -> None:
    history = [
        {"epoch": 1, "val_loss": 0.7},
        {"epoch": 2, "val_loss": 0.5},
        {"epoch": 3, "val_loss": 0.6},
        {"epoch": 4, "val_loss": float("nan")},
    ]
    assert early_stopping(history, "val_loss", "min", patience=2) == (2, True)
    assert early_stopping(history, "val_loss", "min", patience=3) == (2, False)
    assert early_stopping(history, "val_loss", "min", patience=0) == (2, False)
    assert early_stopping(history, "val_loss", "max", patience=1) == (1, True)
    assert early_stopping([], "val_loss", "min", patience=1) == (0, False)


def test_the_model_is_the_last_epoch_unless_early_stopping_asks_for_the_best() -> None:
    history = [
        {"epoch": 1, "val_loss": 0.5},
        {"epoch": 2, "val_loss": 0.6},
        {"epoch": 3, "val_loss": 0.7},
    ]
    base = TrainConfig(data="d", storage="s", name="n", val_fraction=0.2)
    assert (base.patience, base.epoch_rule) == (0, "last")
    assert TrainConfig(data="d", storage="s", name="n").validates is False
    assert kept_epoch(history, base) == (3, False)
    assert kept_epoch(history, dataclasses.replace(base, model_epoch="best")) == (1, False)
    early = dataclasses.replace(base, patience=2)
    assert early.epoch_rule == "best" and kept_epoch(history, early) == (1, True)
    assert kept_epoch([], base) == (0, False)
    with pytest.raises(ValueError, match="--model-epoch 'first' unknown; accepted: last, best"):
        dataclasses.replace(base, model_epoch="first")
    with pytest.raises(ValueError, match="--patience 2 .* use --model-epoch best"):
        dataclasses.replace(base, patience=2, model_epoch="last")


def _toy_batches(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Malignant tiles are darker: a signal a small CNN picks up in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels == 1, 90, 170)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 25, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels)


def test_train_one_epoch_and_evaluate_learn_in_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = _config(tmp_path, "data", epochs=3, lr=1e-2)
    model = build_model("smallcnn")
    backbone, head = split_parameters(model, "smallcnn")
    optimizer = make_optimizer(config, backbone, head)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=4)
    loss_fn = make_loss(config, class_weights=(1.0, 1.0))
    images, labels = _toy_batches(64, seed=1)
    batches = [{"image": images[i : i + 16], "label": labels[i : i + 16]} for i in range(0, 64, 16)]
    losses = []
    for _ in range(config.epochs):
        model.train()
        stats = train_one_epoch(
            model,
            batches,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            device=torch.device("cpu"),
        )
        assert (stats.images, stats.steps) == (64, 4)
        losses.append(stats.loss)
    assert losses[-1] < losses[0]
    assert scheduler.last_epoch == 12

    test_images, test_labels = _toy_batches(40, seed=2)
    patients = np.array([f"P{i % 8}" for i in range(40)])
    predictions = evaluate(
        model,
        [{"image": test_images.numpy(), "label": test_labels.numpy(), "patient_id": patients}],
        device=torch.device("cpu"),
    )
    assert not model.training
    assert predictions.probs.shape == (40,)
    assert classification_metrics(predictions.labels, predictions.probs)["accuracy"] >= 0.9


def test_write_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_roc_auc": float("nan"),
         "backbone_frozen": 1.0, "best_epoch": 1},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.4, "val_roc_auc": 0.8,
         "backbone_frozen": 0.0, "best_epoch": 2},
    ]  # fmt: skip
    png = write_curves(history, str(tmp_path), "val_loss")
    assert Path(png).read_bytes().startswith(b"\x89PNG")
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert saved["metric"] == "val_loss"
    assert [r["epoch"] for r in saved["epochs"]] == [1, 2]
    assert saved["epochs"][0]["val_roc_auc"] is None


# --------------------------------------------------------------------------- Ray fixtures


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    """Generated BreakHis-shaped tiles (~400 images, 81 patients), prepared, in the session's
    local Ray (4 logical CPUs: 2 workers + Ray Data)."""
    return make_prepared(scale=0.05, width=SIDE, height=SIDE)


# --------------------------------------------------------------------------- Ray runs


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_learn_well_above_the_majority_rate(prepared: str, tmp_path: Path) -> None:
    from breakhis.data.dest import PreparedDest
    from breakhis.data.ingest import IngestConfig, build_datasets
    from breakhis.data.splits import SplitSpec
    from breakhis.data.transforms import normalize
    from breakhis.model.artifact import load_artifact

    config = _config(
        tmp_path,
        prepared,
        name="learn",
        image_size=SIDE,
        epochs=6,
        lr=3e-3,
        warmup_epochs=0.5,
        metric="val_balanced_accuracy",
        patience=0,
    )
    result = run_training(config)
    assert result.last_epoch == 6 and len(result.history) == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert Path(result.curves_uri).is_file()
    assert Path(result.curves_uri).with_name("curves.json").is_file()

    # Score the artifact on the test patients (never seen, not used for selection).
    model, card = load_artifact(result.artifact_uri)
    assert (card.architecture, card.image_size, card.epoch) == ("smallcnn", SIDE, result.best_epoch)
    assert card.model_id == result.model_id and card.split == "fold:0"
    assert card.metrics["val_balanced_accuracy"] == pytest.approx(
        result.best_metrics["val_balanced_accuracy"]
    )
    data = build_datasets(
        PreparedDest.open(prepared),
        SplitSpec.parse("fold:0", val_fraction=0.2),
        IngestConfig(image_size=SIDE),
    )
    rows = data.datasets["test"].take_all()
    images = torch.from_numpy(np.stack([r["image"] for r in rows]))
    labels = np.array([r["label"] for r in rows])
    patients = np.array([r["patient_id"] for r in rows])
    with torch.no_grad():
        probs = torch.softmax(model(normalize(images)), dim=1)[:, 1].numpy()
    test = classification_metrics(labels, probs, patients)
    patient_labels = {p: label for p, label in zip(patients, labels, strict=True)}
    chance_bar = majority_rate(list(patient_labels.values()))
    assert test["patient_recognition_rate"] >= chance_bar + 0.15, (test, chance_bar)
    assert test["balanced_accuracy"] >= 0.75, test


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_resumes_at_the_next_epoch_on_s3_and_continues_its_mlflow_run(
    prepared: str, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run and its rerun, two behaviours (each run costs most of a minute here): the
    rerun resumes from the checkpoint on S3, and it continues the first run's MLflow run
    (this was test_tracking's own pair of runs until 2026-12-07)."""
    from mlflow import MlflowClient

    from breakhis import storage
    from breakhis.train import tracking

    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv(tracking.ENV_EXPERIMENT, raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    config = _config(tmp_path, prepared, storage=f"{s3_prefix}/runs", name="resume", epochs=1)
    first = run_training(TrainConfig.from_dict({**config.to_dict(), "tracking_uri": store}))
    assert [r["epoch"] for r in first.history] == [1]
    fs, path = storage.resolve(f"{s3_prefix}/runs/resume/epoch_0001/checkpoint.pt")
    written = fs.get_file_info(path).mtime
    # The run is logged: parameters, tags, every epoch's metrics, its outputs as artifacts.
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("breakhis").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "resume"
    assert run.data.params == tracking.config_params(config.to_dict())

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, key))

    assert steps("train_loss") == steps("val_roc_auc") == [1]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert logged == {int(r["epoch"]): pytest.approx(r["val_loss"]) for r in first.history}
    tags = run.data.tags
    assert tags["split"] == "fold:0" and len(tags["manifest_hash"]) > 8
    assert tags["artifact_uri"] == first.artifact_uri and tags["model_id"] == first.model_id
    assert tags["run_uri"] == first.run_uri
    assert {"curves.png", "curves.json", "model.json"} <= {
        f.path for f in client.list_artifacts(run_id)
    }
    card = json.loads(
        Path(client.download_artifacts(run_id, "model.json", str(tmp_path))).read_text()
    )
    assert card["model_id"] == first.model_id

    # The same storage and name with more epochs resumes the checkpoint and the MLflow run;
    # the tracking URI comes from the environment this time.
    monkeypatch.setenv(tracking.ENV_URI, store)
    second = run_training(TrainConfig.from_dict({**config.to_dict(), "epochs": 2}))
    assert [r["epoch"] for r in second.history] == [1, 2]
    assert second.history[0] == first.history[0]  # epoch 1 restored, not trained again
    assert fs.get_file_info(path).mtime == written
    assert storage.exists(f"{s3_prefix}/runs/resume/model/model.json")
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["changed.epochs"] == "2" and runs[0].data.params["epochs"] == "1"
    assert steps("train_loss") == [1, 2]
    assert runs[0].data.tags["model_id"] == second.model_id

    # Same name, other model: refused before any worker starts.
    with pytest.raises(ValueError, match=r"--arch 'smallcnn' \(now 'resnet18'\)"):
        run_training(TrainConfig.from_dict({**config.to_dict(), "arch": "resnet18"}))


def test_checkpoint_state_is_read_from_storage_without_a_shared_download_folder(
    s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import tempfile

    import ray.train

    from breakhis import storage

    # Ray's as_directory() downloads a remote checkpoint into one folder per node that a
    # late worker re-downloads in place while another reads it; this reader never uses it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    state = {"epoch": 3, "model": {"w": torch.arange(6.0)}, "history": [{"epoch": 1.0}]}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(f"{s3_prefix}/ckpt/checkpoint.pt", buffer.getvalue())
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "checkpoint.pt").write_bytes(buffer.getvalue())

    for uri in (f"{s3_prefix}/ckpt", str(tmp_path / "local")):
        fs, path = storage.resolve(uri)
        loaded = load_checkpoint_state(ray.train.Checkpoint(path, filesystem=fs))
        assert loaded["epoch"] == 3 and loaded["history"] == state["history"]
        assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert os.listdir(tmp_path / "tmp") == []

    fs, path = storage.resolve(f"{s3_prefix}/empty")
    with pytest.raises(FileNotFoundError, match=r"empty holds no checkpoint\.pt"):
        load_checkpoint_state(ray.train.Checkpoint(path, filesystem=fs))


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_that_fails_mid_epoch_is_restarted_and_refit_trains_on_every_training_patient(
    prepared: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run with --refit, two behaviours (a run costs most of a minute here): a worker
    that fails mid-epoch is restarted from the checkpoint; then the refit trains again on
    every training patient for the chosen epochs (its own test until 2026-12-07)."""
    from breakhis.model.artifact import read_card

    marker = str(tmp_path / "failed-once")

    def flaky_loop(config: dict) -> None:
        # Runs on each worker: rank 1 raises after one step of epoch 2, once per test.
        import ray.train

        import breakhis.train.loop as worker_module

        # The worker's own module is not monkeypatched: these are the real functions.
        real_loop, real_epoch = worker_module.train_loop_per_worker, worker_module.train_one_epoch
        calls = []
        if ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):

            def failing_epoch(model, batches, **kwargs):
                calls.append(1)
                if len(calls) == 1:  # epoch 1 trains and is checkpointed
                    return real_epoch(model, batches, **kwargs)

                def one_batch_then_fail():
                    for batch in batches:
                        yield batch
                        open(marker, "w").close()
                        raise RuntimeError("injected worker failure")

                return real_epoch(model, one_batch_then_fail(), **kwargs)

            worker_module.train_one_epoch = failing_epoch
        real_loop(config)

    monkeypatch.setattr(train_module, "train_loop_per_worker", flaky_loop)
    # Pretrained-from-file weights with a frozen first epoch: the restart crosses the unfreeze.
    weights = tmp_path / "smallcnn.pt"
    torch.save(build_model("smallcnn").state_dict(), weights)
    config = _config(
        tmp_path, prepared, name="flaky", epochs=2, max_failures=1, weights=str(weights),
        freeze_epochs=1, refit=True,
    )  # fmt: skip
    result = run_training(config)
    assert os.path.exists(marker), "the injected failure never happened"
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert [r["backbone_frozen"] for r in result.history] == [1.0, 0.0]
    assert math.isfinite(result.history[-1]["val_loss"])

    # The refit (the failure is injected once: it trains undisturbed).
    run = Path(result.run_uri)
    assert result.refit_epochs == result.best_epoch >= 1
    assert result.artifact_uri == str(run / "model")
    validated, handed = read_card(str(run / "validated-model")), read_card(result.artifact_uri)
    assert handed.model_id == result.model_id != validated.model_id
    # The decision fitted on validation travels with the refit model.
    assert (handed.temperature, handed.threshold) == (validated.temperature, validated.threshold)
    assert handed.metrics["refit_epochs"] == result.refit_epochs and handed.config["refit"]
    refit_curves = json.loads((run / "refit" / "curves.json").read_text())["epochs"]
    assert len(refit_curves) == result.refit_epochs
    # Training and validation patients together: more images per epoch than validated.
    assert refit_curves[0]["train_images"] > result.history[0]["train_images"]
    assert "val_loss" not in refit_curves[0]


# --------------------------------------------------------------------------- bad input


def _leaky_copy(prepared: str, dest: Path) -> str:
    """A copy of the prepared data whose manifest puts one patient in two folds."""
    manifest = pq.read_table(Path(prepared) / "manifest.parquet")
    fold = manifest.column("fold").to_numpy().copy()
    patient = manifest.column("patient_id")[int(np.flatnonzero(fold == 0)[0])].as_py()
    rows = np.flatnonzero(pc.equal(manifest.column("patient_id"), patient).to_numpy())
    fold[rows[-1]] = 1
    dest.mkdir()
    index = manifest.column_names.index("fold")
    leaky = manifest.set_column(index, "fold", pa.array(fold, pa.int8()))
    pq.write_table(leaky, dest / "manifest.parquet")
    os.symlink(Path(prepared) / "shards", dest / "shards")
    return str(dest)


@pytest.mark.ray
@pytest.mark.parametrize(
    "case", ["missing data", "leaky split", "weights that do not fit", "imagenet offline",
             "batch larger than the data", "more workers than the cluster holds"],
)  # fmt: skip
def test_bad_input_fails_before_any_worker_starts(
    case: str, prepared: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_workers(*args, **kwargs):
        raise AssertionError("a trainer was built: the error came too late")

    monkeypatch.setattr(train_module, "make_trainer", no_workers)
    if case == "missing data":
        config, error, message = (
            _config(tmp_path, str(tmp_path / "nowhere")),
            FileNotFoundError,
            "no manifest",
        )
    elif case == "leaky split":
        data = _leaky_copy(prepared, tmp_path / "leaky")
        config, error, message = _config(tmp_path, data), LeakageError, "patient-disjoint"
    elif case == "weights that do not fit":
        other = tmp_path / "resnet18.pt"
        torch.save(build_model("resnet18").state_dict(), other)
        config = _config(tmp_path, prepared, weights=str(other))
        error, message = WeightsError, "does not fit smallcnn"
    elif case == "imagenet offline":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
        for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        config = _config(tmp_path, prepared, arch="resnet18", weights="imagenet", freeze_epochs=1)
        error, message = WeightsError, "cannot download resnet18 ImageNet weights"
    elif case == "batch larger than the data":
        config = _config(tmp_path, prepared, batch_size=4096)
        error, message = ValueError, "do not fill one batch of --batch-size 4096"
    else:  # the session's Ray instance has 4 CPUs
        config = _config(tmp_path, prepared, num_workers=4)
        error, message = ValueError, r"too small for this run \(5 CPU needed, the cluster has 4\)"
    with pytest.raises(error, match=message):
        run_training(config)
    assert not (tmp_path / "runs").exists()


def test_the_cluster_must_hold_the_workers_and_a_cpu_for_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, "data", num_workers=2, cpus_per_worker=2.0)
    train_module.check_cluster_fits(config, {"CPU": 5.0})
    with pytest.raises(ValueError, match="5 CPU needed, the cluster has 4") as raised:
        train_module.check_cluster_fits(config, {"CPU": 4.0})
    assert "--num-workers 2 x --cpus-per-worker 2" in str(raised.value)
    assert "--wait-for-resources" in str(raised.value)

    gpu = dataclasses.replace(config, use_gpu=True)
    with pytest.raises(ValueError, match="2 GPU needed, the cluster has 0"):
        train_module.check_cluster_fits(gpu, {"CPU": 8.0})
    train_module.check_cluster_fits(gpu, {"CPU": 8.0, "GPU": 1.0}, gpus_per_worker=0.5)

    waiting = dataclasses.replace(gpu, wait_for_resources=True)
    with caplog.at_level(logging.WARNING, logger="breakhis.train.job"):
        train_module.check_cluster_fits(waiting, {"CPU": 1.0})
    assert "waiting (--wait-for-resources)" in caplog.text


def test_gpus_per_worker_is_checked_first(tmp_path: Path) -> None:
    config = _config(tmp_path, str(tmp_path / "nowhere"), use_gpu=True)
    with pytest.raises(ValueError, match=r"gpus_per_worker must be in \(0, 1\]"):
        run_training(config, gpus_per_worker=2.0)


def test_benchmark_figures_leave_out_the_warm_up_epoch() -> None:
    from breakhis.benchmarks.train import TrainBenchmarkConfig, TrainBenchmarkResult

    config = TrainBenchmarkConfig(workdir="unused")
    assert config.resolved()["arch"] == "resnet18"
    assert TrainBenchmarkConfig(use_gpu=True).resolved()["image_size"] == 224
    result = TrainBenchmarkResult(
        date="2026-11-22",
        device="test CPU",
        gpus=0,
        config=config.resolved(),
        train_images=100,
        job_epoch_s=[9.0, 2.2, 2.0, 2.4],
        job_full_epoch_s=[10.0, 3.0, 3.0, 3.0],
        loop_epoch_s=[5.0, 2.0, 1.9, 2.1],
        job_wall_s=40.0,
    )
    assert result.ratio == pytest.approx(2.2 / 2.0)
    assert result.startup_s == pytest.approx(40.0 - 19.0)
    assert result.job_images_per_s_per_worker == pytest.approx(100 / 2.2)
    assert "1.100 (target <= 1.1)" in result.format_table()
    with pytest.raises(ValueError, match="--epochs must be >= 2"):
        TrainBenchmarkConfig(epochs=1)
