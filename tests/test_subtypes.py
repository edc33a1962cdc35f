"""The eight-subtype task (``--task subtype``): class order, the binary call derived from
the subtype probabilities, the subtype metrics by hand (the two-subtype patient rule
included), and subtype training, evaluation, protocol, scoring and export end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_train_config

from breakhis.model.networks import build_model
from breakhis.stats.calibration import (
    choose_threshold,
    fit_subtype_temperature,
    subtype_margins,
    subtype_probabilities,
)
from breakhis.stats.metrics import classification_metrics
from breakhis.subtypes import (
    SUBTYPE_CLASS_NAMES,
    binary_labels,
    class_names,
    class_weights,
    epoch_metrics,
    malignant_indices,
    malignant_probability,
    softmax,
    subtype_index_of_tile,
    subtype_report,
    task_of,
)
from breakhis.train.epoch import Predictions, evaluate, fit_decision

# --------------------------------------------------------------------------- classes


def test_the_eight_classes_are_benign_four_then_malignant_four() -> None:
    assert SUBTYPE_CLASS_NAMES == (
        "adenosis",
        "fibroadenoma",
        "phyllodes_tumor",
        "tubular_adenoma",
        "ductal_carcinoma",
        "lobular_carcinoma",
        "mucinous_carcinoma",
        "papillary_carcinoma",
    )
    assert malignant_indices(SUBTYPE_CLASS_NAMES) == [4, 5, 6, 7]
    assert malignant_indices(class_names("binary")) == [1]
    assert task_of(("benign", "malignant")) == "binary"
    assert binary_labels(range(8)).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="expected"):
        task_of(("a", "b", "c"))
    with pytest.raises(ValueError, match="accepted: binary, subtype"):
        class_names("grade")
    # A tile's class comes from its name; a name that is not BreakHis's has none.
    assert subtype_index_of_tile("SOB_M_LC-14-13412-100-001") == 5
    assert subtype_index_of_tile("SOB_B_PT-14-22704-40-003") == 2
    assert subtype_index_of_tile("my-tile") == -1
    # The binary recipe's weights over eight classes: n / (K n_c), 1 for an empty class.
    assert class_weights([4, 2, 2, 0, 8, 0, 0, 0]) == (0.5, 1.0, 1.0, 1.0, 0.25, 1.0, 1.0, 1.0)


def test_a_subtype_model_has_eight_outputs_and_binary_is_unchanged() -> None:
    torch.manual_seed(0)
    binary = build_model("smallcnn", dropout=0.0)
    torch.manual_seed(0)
    again = build_model("smallcnn", dropout=0.0, num_classes=2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(binary.state_dict().values(), again.state_dict().values(), strict=True)
    )
    subtype = build_model("smallcnn", dropout=0.0, num_classes=8)
    assert subtype(torch.zeros(2, 3, 32, 32)).shape == (2, 8)


def test_config_takes_the_task_and_refuses_subtype_metrics_for_binary(tmp_path: Path) -> None:
    config = small_train_config("d", str(tmp_path), task="subtype", metric="val_subtype_loss")
    assert config.metric_mode == "min"
    assert small_train_config("d", str(tmp_path), task="subtype").task == "subtype"
    assert small_train_config("d", str(tmp_path)).task == "binary"
    with pytest.raises(ValueError, match="--task 'grade' unknown; accepted: binary, subtype"):
        small_train_config("d", str(tmp_path), task="grade")
    with pytest.raises(ValueError, match="--metric val_subtype_balanced_accuracy needs --task"):
        small_train_config("d", str(tmp_path), metric="val_subtype_balanced_accuracy")


# --------------------------------------------------------------------------- the binary call


def test_derived_binary_metrics_equal_those_of_the_summed_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(40, 8))
    classes = rng.integers(0, 8, size=40)
    patients = np.asarray([f"p{c}-{i % 3}" for i, c in enumerate(classes)])
    batch = {
        "image": np.zeros((40, 3, 8, 8), np.uint8),
        "label": binary_labels(classes),
        "patient_id": patients,
        "subtype_class": classes,
    }

    class Fixed(torch.nn.Module):  # a "model" whose logits are the ones above
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(logits, dtype=torch.float32)

    predictions = evaluate(Fixed(), [batch], device=torch.device("cpu"))
    probs = softmax(predictions.logits)
    summed = probs[:, 4:].sum(axis=1)
    # P(malignant) = the sum of the malignant four, and the margin is its logit.
    assert predictions.probs == pytest.approx(summed, abs=1e-6)
    assert predictions.margins == pytest.approx(np.log(summed / (1 - summed)), abs=1e-5)
    assert malignant_probability(probs, SUBTYPE_CLASS_NAMES) == pytest.approx(summed)
    derived = classification_metrics(predictions.labels, predictions.probs, patients)
    direct = classification_metrics(binary_labels(classes), summed, patients)
    for name, value in direct.items():
        assert derived[name] == pytest.approx(value, nan_ok=True, abs=1e-6), name
    # At any temperature P(malignant) stays the sum of the malignant softmax(logits / T).
    assert subtype_probabilities(logits, 2.5) == pytest.approx(softmax(logits, 2.5)[:, 4:].sum(1))
    assert subtype_margins(logits) == pytest.approx(predictions.margins, abs=1e-5)


def test_the_decision_of_a_subtype_model_is_fitted_on_its_summed_probabilities() -> None:
    rng = np.random.default_rng(1)
    classes = np.repeat(np.arange(8), 10)
    logits = rng.normal(0, 1, size=(80, 8)) + 6.0 * np.eye(8)[classes]  # overconfident
    labels = binary_labels(classes)
    predictions = Predictions(
        margins=subtype_margins(logits),
        probs=subtype_probabilities(logits),
        labels=labels,
        patient_ids=np.asarray([f"p{i // 4}" for i in range(80)]),
        logits=logits,
        classes=classes,
    )
    temperature, threshold, fitted = fit_decision(predictions, "balanced_accuracy")
    assert fitted and temperature == pytest.approx(fit_subtype_temperature(logits, labels))
    calibrated = subtype_probabilities(logits, temperature)
    assert threshold == pytest.approx(choose_threshold(calibrated, labels, "balanced_accuracy"))

    # The fitted temperature lowers the binary negative log-likelihood of the summed ones.
    def nll(p: np.ndarray) -> float:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))

    assert nll(calibrated) <= nll(subtype_probabilities(logits)) + 1e-12


# --------------------------------------------------------------------------- subtype metrics


def test_subtype_report_by_hand_leaves_a_two_subtype_patient_out_of_the_patient_matrix() -> None:
    # Four patients; "mixed" has a ductal (4) and a lobular (5) tile, like slide 14-13412.
    patients = ["a", "a", "b", "b", "mixed", "mixed", "c"]
    classes = [0, 0, 4, 4, 4, 5, 6]
    predicted = [0, 1, 4, 5, 4, 4, 6]  # argmax of each tile
    probs = np.full((7, 8), 0.02)
    probs[np.arange(7), predicted] = 0.86
    report = subtype_report(classes, probs, patients)
    matrix = np.asarray(report["confusion_matrix"])
    assert matrix.shape == (8, 8) and matrix.sum() == 7
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1 and matrix[4, 4] == 2 and matrix[4, 5] == 1
    assert matrix[5, 4] == 1 and matrix[6, 6] == 1
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["recall"]["adenosis"] == pytest.approx(0.5)
    assert report["recall"]["ductal_carcinoma"] == pytest.approx(2 / 3)
    assert report["recall"]["lobular_carcinoma"] == 0.0
    assert report["recall"]["fibroadenoma"] is None  # no test image of it
    # Balanced accuracy: the mean recall of the four classes present.
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3 + 0.0 + 1.0) / 4)
    patient = report["patient"]
    assert patient["patients"] == 3 and patient["patients_mixed_subtype"] == 1
    assert patient["mixed_patients"] == ["mixed"]
    pm = np.asarray(patient["confusion_matrix"])
    # a: mean probs tie adenosis / fibroadenoma, argmax takes the first (adenosis): right.
    assert pm[0, 0] == 1 and pm[4].sum() == 1 and pm[6, 6] == 1 and pm.sum() == 3
    assert patient["accuracy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class indices must lie in 0..7"):
        subtype_report([8], np.full((1, 8), 0.125), ["a"])


def test_epoch_metrics_by_hand() -> None:
    logits = np.log(np.asarray([[0.7, 0.1, 0.2], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    metrics = epoch_metrics(np.asarray([0, 2, 2]), logits)
    assert metrics["subtype_loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(0.8)) / 3)
    assert metrics["subtype_accuracy"] == pytest.approx(2 / 3)
    assert metrics["subtype_balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)


def test_subtype_options_need_a_subtype_model(tmp_path: Path) -> None:
    from breakhis.evaluate.config import EvaluateConfig
    from breakhis.model.artifact import ModelCard
    from breakhis.score.config import ScoreConfig

    card = ModelCard(architecture="smallcnn", image_size=32, mean=(0.5,) * 3, std=(0.2,) * 3)
    score = ScoreConfig(model="m", input=str(tmp_path / "in"), out=str(tmp_path / "o"))
    assert score.task_for(card) == "binary" and "task" not in score.job_record(card)
    asked = ScoreConfig(
        model="m", input=str(tmp_path / "in"), out=str(tmp_path / "o"), task="subtype"
    )
    with pytest.raises(ValueError, match="--task subtype: m is a binary model"):
        asked.task_for(card)
    with pytest.raises(ValueError, match="--task 'grade' unknown"):
        EvaluateConfig(model="m", data="d", out=None, task="grade")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    """Generated tiles (~235 images, 51 patients, 48x32 px, every subtype, slide 14-13412
    under DC and LC), prepared with 2 folds: the evaluation and protocol tests' data."""
    return make_prepared(scale=0.03, width=48, height=32, folds=2, repetitions=2, s3=True)


def _check_evaluation(folder: Path, test_patients: set[str]) -> dict:
    """The checks every subtype evaluation report passes; returns its metrics.json."""
    metrics = json.loads((folder / "metrics.json").read_text())
    frame = pd.read_parquet(folder / "predictions.parquet")
    headline = frame[frame["headline"]]
    sub = metrics["subtype"]
    assert metrics["task"] == "subtype" and sub["class_names"] == list(SUBTYPE_CLASS_NAMES)
    matrix = np.asarray(sub["confusion_matrix"])
    assert matrix.shape == (8, 8) and matrix.sum() == len(headline)
    # Rows are the tiles' own subtypes (14-13412's DC and LC tiles each in their own row).
    truth = np.bincount(headline["subtype_class"], minlength=8)
    assert matrix.sum(axis=1).tolist() == truth.tolist()
    probs = headline[[f"prob_{n}" for n in SUBTYPE_CLASS_NAMES]].to_numpy()
    assert probs.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    # The binary call is the sum of the malignant four (temperature 1: argmax rule).
    summed = probs[:, 4:].sum(axis=1)
    assert headline["prob_malignant"].to_numpy() == pytest.approx(summed, abs=1e-5)
    direct = classification_metrics(headline["label"], summed, headline["patient_id"])
    for name in ("accuracy", "balanced_accuracy", "roc_auc", "patient_recognition_rate"):
        assert metrics["metrics"][name] == pytest.approx(direct[name], abs=1e-5), name
    # Patients with two subtypes are left out of the patient matrix, and only they.
    mixed = {p for p, rows in headline.groupby("patient_id") if rows["subtype_class"].nunique() > 1}
    assert set(sub["patient"]["mixed_patients"]) == mixed
    assert sub["patient"]["patients"] == len(test_patients) - len(mixed)
    assert np.asarray(sub["patient"]["confusion_matrix"]).sum() == sub["patient"]["patients"]
    html = (folder / "report.html").read_text()
    assert "Subtypes (8 classes)" in html and "papillary_carcinoma" in html
    assert (folder / "subtype_confusion_matrix.png").stat().st_size > 0
    return metrics


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_subtype_protocol_scoring_and_export_end_to_end(prepared: str, tmp_path: Path) -> None:
    from breakhis.data.dest import read_manifest
    from breakhis.data.splits import SplitSpec, select_split
    from breakhis.evaluate.config import EvaluateOptions
    from breakhis.model.artifact import load_artifact
    from breakhis.model.export import export_model
    from breakhis.model.export_config import ExportConfig
    from breakhis.protocol.config import ProtocolConfig
    from breakhis.protocol.job import run_protocol
    from breakhis.score.config import ScoreConfig
    from breakhis.score.job import run_scoring
    from breakhis.score.predict_config import PredictOptions

    train = small_train_config(prepared, str(tmp_path / "runs"), name="sub", task="subtype")
    options = EvaluateOptions(bootstrap=50, correct_examples=2, thumbnail_size=32)
    config = ProtocolConfig(train=train, scheme="fold", splits=(0,), evaluation=options)
    result = run_protocol(config)

    # Training: eight outputs named on the card, the subtype validation metrics per epoch.
    run = result.runs[0]
    model, card = load_artifact(run.artifact_uri)
    assert card.class_names == SUBTYPE_CLASS_NAMES and card.task == "subtype"
    assert model(torch.zeros(1, 3, 32, 48)).shape == (1, 8)
    assert "val_subtype_balanced_accuracy" in card.metrics

    # Evaluation (the run's own report) and the protocol's report.
    test = set(select_split(read_manifest(prepared), SplitSpec("fold", 0)).test)
    _check_evaluation(Path(run.report_html).parent, test)
    assert run.subtype is not None
    protocol = json.loads((Path(config.report_dir) / "metrics.json").read_text())
    assert np.asarray(protocol["subtype"]["all"]["confusion_matrix"]).shape == (8, 8)
    assert "Subtypes (8 classes), mean" in (Path(config.report_dir) / "report.html").read_text()
    assert "subtypes, all model(s)" in result.format_table()

    # Scoring: the eight probabilities beside prob_malignant, their sum over the four.
    out = tmp_path / "scores"
    run_scoring(
        ScoreConfig(
            model=run.artifact_uri,
            input=prepared,
            out=str(out),
            predict=PredictOptions(attribution="gradcam", map_size=8),
        )
    )
    tiles = pq.read_table(out / "predictions").to_pandas()
    names = [f"prob_{n}" for n in SUBTYPE_CLASS_NAMES]
    assert list(tiles.columns).index("prob_malignant") == list(tiles.columns).index(names[-1]) + 1
    probs = tiles[names].to_numpy()
    assert tiles["prob_malignant"].to_numpy() == pytest.approx(probs[:, 4:].sum(1), abs=1e-5)
    assert (tiles["predicted_subtype"] == np.asarray(SUBTYPE_CLASS_NAMES)[probs.argmax(1)]).all()
    assert set(tiles["predicted_class"]) <= {"benign", "malignant"}
    # Maps explain the most probable class on the side of the call.
    maps = pq.read_table(out / "attributions").to_pandas().set_index("tile_id")
    targets = maps.loc[tiles["tile_id"], "target"].to_numpy()
    called = tiles["predicted_label"].to_numpy() == 1
    assert (targets[called] >= 4).all() and (targets[~called] < 4).all()
    meta = json.loads(
        pq.read_schema(next((out / "predictions").glob("*.parquet"))).metadata[b"breakhis.score"]
    )
    assert meta["class_names"] == list(SUBTYPE_CLASS_NAMES)

    # Export: the contract names the classes; --task binary reduces to the two sums.
    exported = export_model(
        ExportConfig(model=run.artifact_uri, format="torchscript", out=str(tmp_path / "x"))
    )
    contract = json.loads(Path(exported.contract_uri).read_text())
    assert contract["class_names"] == list(SUBTYPE_CLASS_NAMES) and contract["task"] == "subtype"
    assert contract["malignant_classes"] == list(SUBTYPE_CLASS_NAMES[4:])
    binary = export_model(
        ExportConfig(
            model=run.artifact_uri, format="torchscript", out=str(tmp_path / "b"), task="binary"
        )
    )
    assert json.loads(Path(binary.contract_uri).read_text())["class_names"] == [
        "benign",
        "malignant",
    ]
    image = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        full = torch.jit.load(exported.model_uri)(image)[0]
        two = torch.jit.load(binary.model_uri)(image)[0]
    assert full.shape == (3, 8) and two.shape == (3, 2)
    assert two[:, 1].numpy() == pytest.approx(full[:, 4:].sum(1).numpy(), abs=1e-5)
    assert math.isclose(float(two.sum(1).mean()), 1.0, abs_tol=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_a_subtype_model_trains_and_evaluates_on_the_real_sample(
    realdata_dir: Path, tmp_path: Path, ray_local
) -> None:
    from breakhis.data.dest import read_manifest
    from breakhis.data.prepare import PrepareConfig, prepare
    from breakhis.data.splits import SplitSpec, select_split
    from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
    from breakhis.evaluate.job import run_evaluation
    from breakhis.score.predict_config import PredictOptions
    from breakhis.train.job import run_training, subtype_counts

    dest = str(tmp_path / "prepared")
    prepare(PrepareConfig(src=str(realdata_dir), dest=dest, folds=2, repetitions=2))
    manifest = read_manifest(dest)
    split = select_split(manifest, SplitSpec("fold", 0))
    # 14-13412 (ductal and lobular) is one patient, on one side; its tiles keep both labels.
    sides = [side for side in (split.train, split.test) if "14-13412" in side]
    assert len(sides) == 1
    counts = subtype_counts(manifest, frozenset({"14-13412"}), None)
    assert counts[4] == 12 and counts[5] == 1 and sum(counts) == 13

    config = small_train_config(
        dest,
        str(tmp_path / "runs"),
        task="subtype",
        split="fold:0",
        val_fraction=0.0,
        epochs=2,
        batch_size=8,
        bn_recalibration_batches=0,
    )
    trained = run_training(config)
    assert {"train_loss"} <= set(trained.history[-1])
    out = tmp_path / "report"
    result = run_evaluation(
        EvaluateConfig(
            model=trained.artifact_uri,
            data=dest,
            out=str(out),
            options=EvaluateOptions(
                bootstrap=50,
                correct_examples=2,
                thumbnail_size=32,
                predict=PredictOptions(attribution="none"),
            ),
        )
    )
    assert result.split.leakage_check.startswith("passed")
    metrics = _check_evaluation(out, set(split.test))
    assert metrics["subtype"]["images"] == len(result.predictions)
    mixed = metrics["subtype"]["patient"]["mixed_patients"]
    assert mixed == (["14-13412"] if "14-13412" in split.test else [])


def test_the_reports_balanced_training_set_weighs_each_subtype_alike() -> None:
    import pyarrow as pa

    from breakhis.evaluate.data import data_distribution

    table = pa.table(
        {
            "patient_id": ["a", "a", "b", "c", "c", "c"],
            "label": [0, 0, 0, 1, 1, 1],
            "subtype": ["adenosis"] * 2 + ["fibroadenoma"] + ["ductal_carcinoma"] * 3,
            "magnification": [40, 100, 40, 40, 100, 200],
        }
    )
    sides = {"train": frozenset({"a", "b", "c"})}
    dist = data_distribution(table, sides, magnification=None, class_weighted=True, task="subtype")
    # n / (8 n_c) per image: every subtype present weighs n / 8 = 0.75.
    assert dist["train_balanced"]["subtype"] == pytest.approx(
        {"adenosis": 0.75, "ductal_carcinoma": 0.75, "fibroadenoma": 0.75}
    )
    assert dist["train_balanced"]["class"] == pytest.approx({"benign": 1.5, "malignant": 0.75})


def test_a_run_from_before_the_task_option_resumes_as_binary(tmp_path: Path, monkeypatch) -> None:
    from breakhis.train import job as train

    config = small_train_config("d", str(tmp_path))
    old = {k: v for k, v in config.to_dict().items() if k != "task"}  # written before --task
    monkeypatch.setattr(train, "_latest_checkpoint_config", lambda c: {"epoch": 3, "config": old})
    assert train.check_resumable(config) == 3
    with pytest.raises(ValueError, match="--task 'binary' \\(now 'subtype'\\)"):
        train.check_resumable(small_train_config("d", str(tmp_path), task="subtype"))
