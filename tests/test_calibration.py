"""Temperature scaling, threshold choice, patient calls and calibration measures."""

from __future__ import annotations

import numpy as np
import pytest

from breakhis.stats.calibration import (
    TEMPERATURE_RANGE,
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    patient_calls,
    probabilities,
    reliability,
    sigmoid,
)


def _overconfident(n: int, true_temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Margins of a model ``true_temperature`` times too confident, and labels drawn from
    the calibrated probabilities sigmoid(margin / true_temperature)."""
    rng = np.random.default_rng(seed)
    calibrated = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < sigmoid(calibrated)).astype(np.int64)
    return calibrated * true_temperature, labels


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_temperature_of_a_known_miscalibration_is_recovered_and_fixes_it(
    true_temperature: float,
) -> None:
    margins, labels = _overconfident(20_000, true_temperature, seed=0)
    fitted = fit_temperature(margins, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    raw, fixed = probabilities(margins), probabilities(margins, fitted)
    assert (
        expected_calibration_error(fixed, labels) < 0.02 < expected_calibration_error(raw, labels)
    )
    assert brier_score(fixed, labels) < brier_score(raw, labels)
    # A ranking measure does not move: the order of the probabilities is the same.
    assert (np.argsort(raw, kind="stable") == np.argsort(fixed, kind="stable")).all()


def test_temperature_without_anything_to_fit_is_one_and_stays_in_range() -> None:
    assert fit_temperature([1.0, 2.0, 3.0], [1, 1, 1]) == 1.0
    assert fit_temperature([0.0, 0.0], [0, 1]) == 1.0
    # Perfectly separated data pushes towards ever sharper probabilities: bounded.
    assert fit_temperature([-5.0, -4.0, 4.0, 5.0], [0, 0, 1, 1]) == pytest.approx(
        TEMPERATURE_RANGE[0], rel=1e-3
    )
    with pytest.raises(ValueError, match="equal, non-empty"):
        fit_temperature([], [])
    with pytest.raises(ValueError, match="temperature must be a positive"):
        probabilities([1.0], 0.0)


def test_threshold_separates_a_model_shifted_towards_benign() -> None:
    # Ranks perfectly but every probability is below 0.5: at 0.5 all are called benign.
    probs = np.array([0.05, 0.10, 0.12, 0.15, 0.22, 0.25, 0.30, 0.40])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    threshold = choose_threshold(probs, labels)
    assert 0.15 < threshold <= 0.22
    assert threshold == pytest.approx((0.15 + 0.22) / 2)
    assert ((probs >= threshold) == labels).all()


def test_threshold_rules_differ_on_imbalanced_data_and_ties_take_the_widest_middle() -> None:
    # 2 benign, 8 malignant. Balanced accuracy wants both benign images right (cut in
    # (0.35, 0.40]); plain accuracy is 9/10 there and in (0.10, 0.30] too, a tie that the
    # wider interval wins, at its middle.
    probs = np.array([0.10, 0.35, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95])
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert choose_threshold(probs, labels, "balanced_accuracy") == pytest.approx(0.375)
    assert choose_threshold(probs, labels, "accuracy") == pytest.approx(0.20)
    # One class only: nothing to choose, the neutral 0.5.
    assert choose_threshold([0.1, 0.9], [1, 1]) == 0.5
    with pytest.raises(ValueError, match="threshold rule 'f1'"):
        choose_threshold(probs, labels, "f1")


def test_patient_calls_by_mean_and_by_majority() -> None:
    probs = [0.9, 0.45, 0.45, 0.2, 0.8, 0.6]
    patients = ["A", "A", "A", "B", "B", "B"]
    # A: mean 0.6 but one tile in three called malignant; B: mean 0.53, two in three.
    assert patient_calls(probs, patients, 0.5, "mean") == {"A": 1, "B": 1}
    assert patient_calls(probs, patients, 0.5, "majority") == {"A": 0, "B": 1}
    assert patient_calls(probs, patients, 0.55, "mean") == {"A": 1, "B": 0}
    with pytest.raises(ValueError, match="patient rule 'max'"):
        patient_calls(probs, patients, 0.5, "max")


def test_reliability_bins_and_ece_by_hand() -> None:
    probs = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    labels = np.array([0, 1, 0, 1, 1])
    rel = reliability(probs, labels, bins=2)
    assert rel.counts == (3, 2)
    assert rel.mean_prob == pytest.approx((0.35 / 3, 0.975))
    assert rel.frequency == pytest.approx((1 / 3, 1.0))
    expected = (3 * abs(1 / 3 - 0.35 / 3) + 2 * abs(1.0 - 0.975)) / 5
    assert rel.ece == pytest.approx(expected)
    assert brier_score(probs, labels) == pytest.approx(np.mean((probs - labels) ** 2))
    empty_bins = reliability([0.2], [0], bins=4)
    assert empty_bins.counts == (1, 0, 0, 0) and np.isnan(empty_bins.mean_prob[1])
