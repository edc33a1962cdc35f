"""Evaluation: metrics and the patient bootstrap against hand-computed values, the
leakage refusal, and a real evaluation of a saved model on generated data."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.data.splits import LeakageError, SplitSpec, add_split_columns, select_split
from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
from breakhis.evaluate.data import data_distribution, model_patients
from breakhis.evaluate.job import (
    choose_examples,
    classification_report,
    per_magnification_metrics,
    run_evaluation,
    score_predictions,
)
from breakhis.score.predict import PredictOptions
from breakhis.stats.bootstrap import (
    BOOTSTRAP_METRICS,
    draw_patients,
    patient_bootstrap,
    patient_table,
    weighted_metrics,
)
from breakhis.stats.metrics import classification_metrics

# A small fixed example: three patients, two magnifications, ten images.
#   P1 benign:     40X 0.2 (right) 0.6 (wrong); 100X 0.1 (right)        -> score 2/3
#   P2 malignant:  40X 0.9 0.7 (right) 0.4 (wrong); 100X 0.8 (right)    -> score 3/4
#   P3 malignant:  40X 0.3 (wrong); 100X 0.55 0.65 (right)             -> score 2/3
EXAMPLE = pd.DataFrame(
    {
        "patient_id": ["P1"] * 3 + ["P2"] * 4 + ["P3"] * 3,
        "magnification": [40, 40, 100, 40, 40, 40, 100, 40, 100, 100],
        "label": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
        "prob_malignant": [0.2, 0.6, 0.1, 0.9, 0.7, 0.4, 0.8, 0.3, 0.55, 0.65],
    }
)


def _f(value: Fraction) -> float:
    return float(value)


# --------------------------------------------------------------------------- metrics


def test_every_metric_of_the_fixed_example_by_hand() -> None:
    m = score_predictions(EXAMPLE["label"], EXAMPLE["prob_malignant"], EXAMPLE["patient_id"])
    # Confusion: benign 0.2, 0.1 right (tn 2), 0.6 wrong (fp 1); malignant 5 right, 0.4/0.3 wrong.
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (2, 1, 2, 5)
    assert m["image_recognition_rate"] == pytest.approx(0.7)  # 7 of 10 images
    assert m["accuracy"] == pytest.approx(0.7)
    # Patient level: mean of 2/3, 3/4, 2/3 = 25/36, not the image rate.
    assert m["patient_recognition_rate"] == pytest.approx(_f(Fraction(25, 36)))
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["recall"] == pytest.approx(5 / 7)
    assert m["f1"] == pytest.approx(10 / 13)  # 2tp / (2tp + fp + fn)
    assert m["balanced_accuracy"] == pytest.approx((5 / 7 + 2 / 3) / 2)
    # ROC-AUC: 18 of the 7 x 3 (malignant, benign) pairs are ordered right.
    assert m["roc_auc"] == pytest.approx(18 / 21)
    # Patient calls from mean probabilities: P1 0.3 (benign, right), P2 0.7, P3 0.5 (right).
    assert m["patient_accuracy"] == pytest.approx(1.0)
    assert (m["images"], m["patients"]) == (10, 3)


def test_per_magnification_metrics_by_hand() -> None:
    per_mag = per_magnification_metrics(EXAMPLE)
    assert list(per_mag) == [40, 100]
    at40, at100 = per_mag[40], per_mag[100]
    # 40X: P1 1/2, P2 2/3, P3 0/1 -> image rate 3/6, patient rate (1/2 + 2/3 + 0) / 3.
    assert at40["image_recognition_rate"] == pytest.approx(0.5)
    assert at40["patient_recognition_rate"] == pytest.approx(_f(Fraction(7, 18)))
    assert (at40["tn"], at40["fp"], at40["fn"], at40["tp"]) == (1, 1, 2, 2)
    # 100X: every image right.
    assert at100["image_recognition_rate"] == at100["patient_recognition_rate"] == 1.0
    assert (at100["images"], at100["patients"]) == (4, 3)


def test_classification_report_by_hand() -> None:
    predicted = (EXAMPLE["prob_malignant"] >= 0.5).astype(int)
    report, text = classification_report(EXAMPLE["label"], predicted)
    # Benign: 2 of the 4 images called benign are benign; 2 of 3 benign images found.
    assert report["benign"]["precision"] == pytest.approx(0.5)
    assert report["benign"]["recall"] == pytest.approx(2 / 3)
    assert report["benign"]["support"] == 3
    assert report["malignant"]["precision"] == pytest.approx(5 / 6)
    assert report["malignant"]["support"] == 7
    assert "benign" in text and "malignant" in text


def test_choose_examples_balances_classes_and_orders_mistakes() -> None:
    frame = EXAMPLE.assign(
        tile_id=[f"t{i}" for i in range(10)],
        predicted_label=(EXAMPLE["prob_malignant"] >= 0.5).astype(int),
    )
    frame["correct"] = frame["label"] == frame["predicted_label"]
    correct, wrong = choose_examples(frame, count=4, seed=0)
    # Only 2 benign images are right, so the malignant side fills the other 2 places.
    assert sorted(correct["label"].tolist()) == [0, 0, 1, 1]
    assert correct["correct"].all()
    # Every mistake, the most confident first: 0.3 is 0.2 from the threshold; 0.6 and 0.4
    # are both 0.1 from it and keep tile order (t1 before t5).
    assert wrong["prob_malignant"].tolist() == [0.3, 0.6, 0.4]


def test_data_distribution_counts_and_balancing() -> None:
    table = pa.table(
        {
            "patient_id": ["a", "a", "b", "c", "c", "c", "d"],
            "label": [0, 0, 0, 1, 1, 1, 1],
            "subtype": ["adenosis"] * 2 + ["fibroadenoma"] + ["ductal_carcinoma"] * 4,
            "magnification": [40, 100, 40, 40, 100, 200, 40],
        }
    )
    sides = {"train": frozenset({"a", "b", "c"}), "test": frozenset({"d"})}
    dist = data_distribution(table, sides, magnification=None, class_weighted=True)
    assert list(dist) == ["train", "train_balanced", "test"]
    assert dist["train"]["class"] == {"benign": 3.0, "malignant": 3.0}
    assert dist["test"]["class"] == {"benign": 0.0, "malignant": 1.0}
    assert dist["train"]["magnification"] == {"40": 3.0, "100": 2.0, "200": 1.0, "400": 0.0}
    assert dist["train_balanced"] == dist["train"]  # equal classes: weights 1

    # At 40X: a, b benign (2), c malignant (1). Class weights n / (2 n_c) = 3/4 and 3/2.
    weighted = data_distribution(table, sides, magnification=40, class_weighted=True)
    assert weighted["train"]["class"] == {"benign": 2.0, "malignant": 1.0}
    assert weighted["train_balanced"]["class"] == {"benign": 1.5, "malignant": 1.5}
    assert weighted["train_balanced"]["subtype"] == {
        "adenosis": 0.75,
        "ductal_carcinoma": 1.5,
        "fibroadenoma": 0.75,
    }
    assert weighted["train_balanced"]["magnification"]["40"] == 3.0
    # Oversampling alone: the malignant tile twice (round(2 / 1) copies).
    copied = data_distribution(table, sides, magnification=40, oversample=True)
    assert copied["train_balanced"]["class"] == {"benign": 2.0, "malignant": 2.0}
    plain = data_distribution(table, sides, magnification=40)
    assert plain["train_balanced"] == plain["train"]
    # A model trained without validation patients (--val-fraction 0): an empty side.
    empty = data_distribution(table, {**sides, "val": frozenset()}, magnification=None)
    assert empty["val"]["class"] == {"benign": 0.0, "malignant": 0.0}


# --------------------------------------------------------------------------- bootstrap


def _random_predictions(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    patients = np.array([f"p{i % 13}" for i in range(200)])
    labels = np.array([int(p[1:]) % 3 == 0 for p in patients], dtype=int)
    probs = np.round(rng.random(200) * 0.7 + 0.3 * labels, 1)  # rounded: many ties
    return labels, probs, patients


@pytest.mark.parametrize("example", ["fixed", "random"])
def test_weighted_metrics_with_unit_weights_are_classification_metrics(example: str) -> None:
    if example == "fixed":
        labels = EXAMPLE["label"].to_numpy()
        probs = EXAMPLE["prob_malignant"].to_numpy()
        patients = EXAMPLE["patient_id"].to_numpy()
    else:
        labels, probs, patients = _random_predictions()
    table = patient_table(labels, probs, patients)
    got = weighted_metrics(table, np.ones((1, len(table.patient_ids))))
    want = classification_metrics(labels, probs, patients)
    for name in BOOTSTRAP_METRICS:
        assert got[name][0] == pytest.approx(want[name], abs=1e-12), name


def test_a_patient_drawn_twice_counts_as_two_patients() -> None:
    labels, probs, patients = _random_predictions()
    table = patient_table(labels, probs, patients)
    weights = np.ones(len(table.patient_ids))
    weights[0], weights[4] = 2, 0  # p0 twice, p12 (sorted 5th: p0 p1 p10 p11 p12) left out
    rows = []
    for index, count in enumerate(weights):
        members = np.flatnonzero(table.image_patient == index)
        rows += [(m, f"{index}#{k}") for k in range(int(count)) for m in members]
    idx = np.array([m for m, _ in rows])
    ids = np.array([i for _, i in rows])
    want = classification_metrics(table.image_labels[idx], table.image_probs[idx], ids)
    got = weighted_metrics(table, weights[None, :])
    for name in BOOTSTRAP_METRICS:
        assert got[name][0] == pytest.approx(want[name], abs=1e-12), name


def test_bootstrap_resamples_patients_not_images() -> None:
    # Benign A: 1 image, right; benign B: 3 images, all wrong; malignant C: 2 right,
    # malignant D: 2 right. Resampling patients, a replicate's image accuracy can only be
    # (right images) / (images) of a multiset of whole patients.
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    probs = [0.1, 0.9, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7]
    patients = ["A", "B", "B", "B", "C", "C", "D", "D"]
    result = patient_bootstrap(labels, probs, patients, replicates=2000, seed=3)
    # Benign draws (stratified: two of A/B): AA -> 2 right of 2 benign images, AB -> 1 of 4,
    # BB -> 0 of 6; malignant draws always give 4 right of 4.
    possible_accuracy = {Fraction(2 + 4, 2 + 4), Fraction(1 + 4, 4 + 4), Fraction(0 + 4, 6 + 4)}
    accuracy = result.samples["accuracy"]
    assert {Fraction(v).limit_denominator(100) for v in accuracy} <= possible_accuracy
    # Patient rate: benign AA -> (1+1+1+1)/4, AB -> 3/4, BB -> 2/4.
    assert set(np.round(result.samples["patient_recognition_rate"], 9)) <= {1.0, 0.75, 0.5}
    # AA, AB, BB are drawn with probabilities 1/4, 1/2, 1/4.
    share_all_right = np.mean(accuracy == 1.0)
    share_all_wrong = np.mean(np.isclose(accuracy, 0.4))
    assert share_all_right == pytest.approx(0.25, abs=0.04)
    assert share_all_wrong == pytest.approx(0.25, abs=0.04)
    # Stratified: every replicate keeps 2 benign and 2 malignant patients, so AUC is defined.
    assert result.defined["roc_auc"] == 2000
    # The interval is the 2.5th and 97.5th percentile of the replicates.
    low, high = result.intervals["accuracy"]
    assert (low, high) == pytest.approx(tuple(np.percentile(accuracy, [2.5, 97.5])))
    assert (low, high) == pytest.approx((0.4, 1.0))


def test_bootstrap_draws_and_determinism() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1])
    draws = draw_patients(labels, 50, rng, stratified=True)
    assert (draws[:, :3].sum(axis=1) == 3).all() and (draws[:, 3:].sum(axis=1) == 2).all()
    loose = draw_patients(labels, 50, rng, stratified=False)
    assert (loose.sum(axis=1) == 5).all()
    assert (loose[:, :3].sum(axis=1) != 3).any()  # classes not kept without stratification
    labels_, probs, patients = _random_predictions()
    one = patient_bootstrap(labels_, probs, patients, replicates=300, seed=7)
    two = patient_bootstrap(labels_, probs, patients, replicates=300, seed=7)
    other = patient_bootstrap(labels_, probs, patients, replicates=300, seed=8)
    assert one.intervals == two.intervals
    assert one.intervals != other.intervals
    point = classification_metrics(labels_, probs, patients)
    for name in ("accuracy", "patient_recognition_rate", "roc_auc"):
        low, high = one.intervals[name]
        assert low <= point[name] <= high, name
    assert json.dumps(one.to_dict())  # JSON-ready
    with pytest.raises(ValueError, match="replicates must be >= 1"):
        patient_bootstrap(labels_, probs, patients, replicates=0)
    with pytest.raises(ValueError, match="both benign and malignant"):
        patient_bootstrap([0, 1], [0.2, 0.8], ["x", "x"])


# --------------------------------------------------------------------------- leakage


def _manifest(seed: int = 0, patients: int = 12) -> pa.Table:
    rows = []
    for p in range(patients):
        label = int(p % 2)
        for mag in (40, 100):
            rows.append(
                {
                    "tile_id": f"t{p}-{mag}",
                    "patient_id": f"14-{p:04d}",
                    "label": label,
                    "subtype": ("adenosis", "ductal_carcinoma")[label],
                    "magnification": mag,
                }
            )
    table = pa.Table.from_pylist(rows)
    return add_split_columns(table, folds=2, repetitions=2, seed=seed)


def _write_manifest(dest: Path, table: pa.Table) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest / "manifest.parquet")
    return str(dest)


def _artifact(uri: str, *, split: str, manifest_hash: str, data: str, **card) -> str:
    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.model.networks import build_model

    save_artifact(
        uri,
        build_model("smallcnn"),
        ModelCard(
            architecture="smallcnn",
            image_size=32,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            split=split,
            manifest_hash=manifest_hash,
            config={"data": data, "val_fraction": 0.2, "seed": 0},
            **card,
        ),
    )
    return uri


def test_evaluating_on_the_models_training_patients_is_refused(tmp_path: Path) -> None:
    from breakhis.data.dest import manifest_hash
    from breakhis.model.artifact import read_card

    table = _manifest()
    data = _write_manifest(tmp_path / "prepared", table)
    model = _artifact(
        str(tmp_path / "model"), split="fold:0", manifest_hash=manifest_hash(table), data=data
    )
    out = tmp_path / "report"
    # fold:1's test patients are fold:0's training patients.
    leaked = sorted(select_split(table, SplitSpec("fold", 1)).test)
    with pytest.raises(LeakageError, match="refusing to evaluate") as info:
        run_evaluation(EvaluateConfig(model=model, data=data, out=str(out), split="fold:1"))
    for patient in leaked:
        assert patient in str(info.value)
    assert not out.exists()  # nothing computed, nothing written
    # The model's own split: its test patients are all unseen.
    known = model_patients(read_card(model), PreparedDest(uri=data, manifest=table))
    own = select_split(table, SplitSpec("fold", 0))
    assert known.seen == own.train | own.val and not (known.seen & own.test)
    assert known.split is not None and len(known.split.val) > 0


def test_a_model_from_another_manifest_is_checked_against_its_own_patients(
    tmp_path: Path,
) -> None:
    from breakhis.data.dest import manifest_hash

    first = _manifest(seed=0)
    second = _manifest(seed=5)  # the same patients, split differently
    assert manifest_hash(first) != manifest_hash(second)
    data_a = _write_manifest(tmp_path / "a", first)
    data_b = _write_manifest(tmp_path / "b", second)
    model = _artifact(
        str(tmp_path / "model"), split="rep:0", manifest_hash=manifest_hash(first), data=data_a
    )
    seen = (
        frozenset(first.column("patient_id").to_pylist())
        - select_split(first, SplitSpec("rep", 0)).test
    )
    overlap = seen & select_split(second, SplitSpec("rep", 0)).test
    assert overlap  # the other prepare run tests some patients this model trained on
    with pytest.raises(LeakageError, match=sorted(overlap)[0]):
        run_evaluation(EvaluateConfig(model=model, data=data_b, out=None, split="rep:0"))

    # When the training manifest is gone (or was re-prepared), nothing can be proven.
    (tmp_path / "a" / "manifest.parquet").unlink()
    with pytest.raises(LeakageError, match="cannot be read"):
        run_evaluation(EvaluateConfig(model=model, data=data_b, out=None, split="rep:0"))
    _write_manifest(tmp_path / "a", second)
    with pytest.raises(LeakageError, match="has changed since"):
        run_evaluation(EvaluateConfig(model=model, data=data_a, out=None, split="rep:0"))


def test_column_splits_are_checked_against_the_patients_the_model_saw(tmp_path: Path) -> None:
    from breakhis.data.dest import manifest_hash
    from breakhis.model.artifact import read_card

    table = _manifest()
    fold0 = select_split(table, SplitSpec("fold", 0))
    # A user-defined split whose test patients are two of fold:0's training patients.
    borrowed = sorted(fold0.train)[:2]
    sides = ["test" if p in borrowed else "train" for p in table["patient_id"].to_pylist()]
    with_site = table.append_column("site", pa.array(sides, pa.string()))
    assert manifest_hash(with_site) != manifest_hash(table)  # the column is part of the data
    data = _write_manifest(tmp_path / "prepared", with_site)
    model = _artifact(
        str(tmp_path / "model"), split="fold:0", manifest_hash=manifest_hash(with_site), data=data
    )
    with pytest.raises(LeakageError, match="refusing to evaluate") as info:
        run_evaluation(EvaluateConfig(model=model, data=data, out=None, split="column:site"))
    assert all(patient in str(info.value) for patient in borrowed)

    # A model trained on the column saw every patient but the column's test patients.
    own = _artifact(
        str(tmp_path / "own"),
        split="column:site",
        manifest_hash=manifest_hash(with_site),
        data=data,
    )
    known = model_patients(read_card(own), PreparedDest(uri=data, manifest=with_site))
    assert known.split.test == frozenset(borrowed) and not known.seen & known.split.test
    assert known.seen == frozenset(table["patient_id"].to_pylist()) - frozenset(borrowed)

    # The column edited by hand after training: the model's manifest is gone.
    edited = with_site.set_column(
        with_site.schema.get_field_index("site"),
        "site",
        pa.array(
            [
                "train" if p == borrowed[0] else side
                for p, side in zip(table["patient_id"].to_pylist(), sides, strict=True)
            ],
            pa.string(),
        ),
    )
    assert manifest_hash(edited) != manifest_hash(with_site)
    _write_manifest(tmp_path / "prepared", edited)
    with pytest.raises(LeakageError, match="has changed since"):
        run_evaluation(EvaluateConfig(model=own, data=data, out=None, split="column:site"))


def test_a_model_without_a_recorded_split_is_refused(tmp_path: Path) -> None:
    table = _manifest()
    data = _write_manifest(tmp_path / "prepared", table)
    model = _artifact(str(tmp_path / "model"), split="", manifest_hash="", data=data)
    with pytest.raises(LeakageError, match="records no training split"):
        run_evaluation(EvaluateConfig(model=model, data=data, out=None, split="fold:0"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.0}, "--threshold must be in"),
        ({"attribution": "shap"}, "--attribution 'shap'; accepted: gradcam"),
        ({"bootstrap": 0}, "--bootstrap must be >= 1"),
        ({"device": "tpu"}, "--device 'tpu'"),
        ({"thumbnail_size": 8}, "--thumbnail-size"),
    ],
)
def test_options_errors_name_the_option(kwargs: dict, message: str) -> None:
    predicting = {k: kwargs.pop(k) for k in ("threshold", "attribution", "device") if k in kwargs}
    with pytest.raises(ValueError, match=message):
        EvaluateOptions(predict=PredictOptions(**predicting), **kwargs)


def test_config_rejects_a_bad_split() -> None:
    with pytest.raises(ValueError, match="expected fold:K or rep:K"):
        EvaluateConfig(model="m", data="d", out=None, split="fold0")


# --------------------------------------------------------------------------- a real evaluation

SIDE = 32


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    """Generated tiles (~235 images, 51 patients, 48x32 px), prepared with 2 folds into
    the embedded S3 server, so that evaluation reads shards from S3 in Ray workers."""
    return make_prepared(scale=0.03, width=48, height=SIDE, folds=2, repetitions=2, s3=True)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_evaluation_of_a_saved_model_end_to_end(prepared: str, tmp_path: Path) -> None:
    import torch

    from breakhis.data.dest import manifest_hash, read_manifest
    from breakhis.data.imaging import decode_rgb
    from breakhis.model.artifact import load_artifact
    from breakhis.train.result import write_curves

    manifest = read_manifest(prepared)
    torch.manual_seed(0)
    model_uri = _artifact(
        prepared.replace("/prepared", "/run/model"),
        split="fold:0",
        manifest_hash=manifest_hash(manifest),
        data=prepared,
        magnification=40,
    )
    # The training job's curves beside the artifact become the report's training history.
    write_curves(
        [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_accuracy": 0.5, "best_epoch": 1}],
        model_uri.rsplit("/", 1)[0],
        "val_loss",
    )
    out = tmp_path / "report"
    result = run_evaluation(
        EvaluateConfig(
            model=model_uri,
            data=prepared,
            out=str(out),
            options=EvaluateOptions(bootstrap=200, correct_examples=4, thumbnail_size=32),
        )
    )
    test = select_split(manifest, SplitSpec("fold", 0)).test
    expected = manifest.filter(pa.compute.is_in(manifest["patient_id"], pa.array(sorted(test))))
    frame = result.predictions
    # Every test tile of every magnification, once; headline = the model's 40X.
    assert sorted(frame["tile_id"]) == sorted(expected["tile_id"].to_pylist())
    assert set(frame.loc[frame["headline"], "magnification"]) == {40}
    assert result.split.test_patients == len(test) and result.split.split == "fold:0"
    assert result.split.leakage_check.startswith("passed")

    # The probabilities are the model's own, for the right tiles.
    model, card = load_artifact(model_uri)
    png = {}
    for entry in storage.walk(f"{prepared}/shards", (".parquet",)):
        fs, path = storage.resolve(entry.uri)
        for row in pq.read_table(path, filesystem=fs, columns=["tile_id", "png"]).to_pylist():
            png[row["tile_id"]] = row["png"]
    some = frame.iloc[:: max(1, len(frame) // 5)]
    images = np.stack([decode_rgb(png[t], card.image_size) for t in some["tile_id"]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = torch.softmax(model(x), dim=1)[:, 1].numpy()
    assert some["prob_malignant"].to_numpy() == pytest.approx(direct, abs=1e-5)

    # Metrics: breakhis.stats.metrics on the headline rows; cross-magnification row over 4 mags.
    headline = frame[frame["headline"]]
    want = classification_metrics(
        headline["label"], headline["prob_malignant"], headline["patient_id"]
    )
    for name in ("accuracy", "patient_recognition_rate", "roc_auc", "f1"):
        assert result.metrics[name] == pytest.approx(want[name], nan_ok=True)
    assert list(result.per_magnification) == [40, 100, 200, 400]
    assert result.per_magnification[40]["accuracy"] == pytest.approx(want["accuracy"])
    assert len(result.wrong) == int((~headline["correct"]).sum())
    assert all(e.overlay_png is not None and not e.correct for e in result.wrong)
    assert 0 < len(result.correct) <= 4
    # One map scale for the report, a panel per headline patient with its call.
    assert result.map_scale is not None and result.map_scale > 0
    assert [p.patient_id for p in result.patients] == sorted(set(headline["patient_id"]))
    for panel in result.patients:
        probs = [e.prob_malignant for e in panel.examples]
        assert probs == sorted(probs, reverse=True) and 0 < len(probs) <= 8
        assert panel.call in (0, 1) and panel.label in (0, 1)
    assert len(list((out / "patients").glob("*.png"))) == len(result.patients)

    # The report: every file, and numbers equal to the result's.
    metrics = json.loads((out / "metrics.json").read_text())
    for name in (
        "report.html",
        "metrics.json",
        "predictions.parquet",
        "confusion_matrix.png",
        "roc_curve.png",
        "dataset_distribution.png",
        "bootstrap.png",
        "correct_predictions.png",
        "training_history.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "wrong_predictions").glob("*.png"))) == len(result.wrong)
    assert metrics["protocol"]["test_patients"] == len(test)
    assert metrics["cross_magnification"]["trained_at"] == 40
    assert list(metrics["cross_magnification"]["evaluated_at"]) == ["40", "100", "200", "400"]
    for name, value in result.metrics.items():
        if isinstance(value, float) and math.isnan(value):
            assert metrics["metrics"][name] is None
        else:
            assert metrics["metrics"][name] == pytest.approx(value)
    assert "report.html" in result.format_table()
