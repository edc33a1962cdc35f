"""Classification metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from breakhis.stats.metrics import (
    METRIC_NAMES,
    classification_metrics,
    image_recognition_rate,
    majority_rate,
    patient_accuracy,
    patient_recognition_rate,
    patient_scores,
)

# Patient A (benign, 4 images, 3 right), patient B (malignant, 1 image, wrong),
# patient C (malignant, 5 images, all right).
LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
PROBS = [0.1, 0.2, 0.3, 0.7, 0.4, 0.9, 0.8, 0.6, 0.95, 0.55]
PATIENTS = ["A", "A", "A", "A", "B", "C", "C", "C", "C", "C"]


def test_patient_recognition_rate_is_the_mean_of_patient_scores() -> None:
    preds = [int(p >= 0.5) for p in PROBS]
    assert patient_scores(LABELS, preds, PATIENTS) == {"A": 0.75, "B": 0.0, "C": 1.0}
    assert patient_recognition_rate(LABELS, preds, PATIENTS) == pytest.approx((0.75 + 0 + 1) / 3)
    # Image level weighs the big patients more: 8 of 10 images are right.
    assert image_recognition_rate(LABELS, preds) == pytest.approx(0.8)


def test_classification_metrics_by_hand() -> None:
    m = classification_metrics(LABELS, PROBS, PATIENTS)
    assert set(METRIC_NAMES) <= set(m)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 1, 5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["recall"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    # AUC: pairs (benign, malignant) ranked right; only 0.7 > 0.4, 0.7 > 0.6, 0.7 > 0.55 wrong.
    assert m["roc_auc"] == pytest.approx(1 - 3 / 24)
    expected_loss = -np.mean(
        [math.log(1 - p) if y == 0 else math.log(p) for y, p in zip(LABELS, PROBS, strict=True)]
    )
    assert m["loss"] == pytest.approx(expected_loss)
    assert m["patient_recognition_rate"] == pytest.approx(1.75 / 3)
    # Mean probability per patient: A 0.325 (benign, right), B 0.4 (wrong), C 0.76 (right).
    assert m["patient_accuracy"] == pytest.approx(2 / 3)
    assert (m["images"], m["patients"]) == (10, 3)


def test_one_class_gives_nan_auc_and_no_warning() -> None:
    m = classification_metrics([1, 1, 1], [0.9, 0.2, 0.7], ["P", "P", "Q"])
    assert math.isnan(m["roc_auc"])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["patient_recognition_rate"] == pytest.approx((0.5 + 1.0) / 2)


def test_without_patients_the_patient_metrics_are_nan() -> None:
    m = classification_metrics([0, 1], [0.2, 0.8])
    assert math.isnan(m["patient_recognition_rate"])
    assert m["accuracy"] == 1.0


def test_majority_rate() -> None:
    assert majority_rate(LABELS) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("labels", "probs", "patients", "message"),
    [
        ([], [], None, "no predictions"),
        ([0, 1], [0.5], None, "differ in length"),
        ([0, 2], [0.5, 0.5], None, "must be 0"),
        ([0, 1], [0.5, 1.5], None, r"\[0, 1\]"),
        ([0, 1], [0.5, 0.5], ["A"], "patient_ids"),
    ],
)
def test_bad_inputs_are_named(labels, probs, patients, message) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probs, patients)


def test_patient_with_both_labels_is_rejected() -> None:
    with pytest.raises(ValueError, match="both benign and malignant"):
        patient_accuracy([0, 1], [0.1, 0.9], ["A", "A"])
