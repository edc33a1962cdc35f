"""Confidence intervals by resampling patients, not images.

    ci = patient_bootstrap(labels, probs, patient_ids, replicates=1000, seed=0)
    ci.intervals["patient_recognition_rate"]   # (low, high) at 95%

The images of one BreakHis patient are far from independent (one slide, one
stain, one tumour), so resampling images would pretend there are thousands of
independent observations where there are a few dozen patients, and give
intervals that are much too narrow. Each replicate here draws patients with
replacement (within each class when ``stratified``, so that every replicate
keeps the test set's benign/malignant patient counts and ROC-AUC stays
defined); a patient drawn twice counts twice, with all their images. The
interval is the percentile interval of the replicates.

A replicate is a vector of draw counts per patient, so every metric is a
weighted sum of per-patient counts and all replicates are computed at once
(a thousand replicates take milliseconds, where calling
breakhis.stats.metrics.classification_metrics a thousand times takes a minute).
``weighted_metrics`` with every weight 1 gives exactly what
``classification_metrics`` gives; the tests hold it to that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from breakhis.stats.metrics import METRIC_NAMES, as_arrays

BOOTSTRAP_METRICS: tuple[str, ...] = METRIC_NAMES
"""Metrics that get an interval (those of breakhis.stats.metrics.classification_metrics)."""
_AUC_CHUNK = 128


@dataclass(frozen=True)
class PatientTable:
    """Per-patient sums of a set of image predictions: what a replicate reweights."""

    patient_ids: np.ndarray  # (P,) str, sorted
    label: np.ndarray  # (P,) int64: the patient's label
    images: np.ndarray  # (P,) images of the patient
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    score: np.ndarray  # (P,) share of the patient's images classified correctly
    patient_correct: np.ndarray  # (P,) 1 when the mean probability calls the patient right
    loss_sum: np.ndarray  # (P,) sum of the images' binary cross-entropy
    image_patient: np.ndarray  # (N,) index into patient_ids of each image
    image_probs: np.ndarray  # (N,) probabilities
    image_labels: np.ndarray  # (N,) labels


def patient_table(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    threshold: float = 0.5,
    patient_rule: str = "mean",
) -> PatientTable:
    """Sum image predictions per patient (each patient called by ``patient_rule``, see
    breakhis.stats.calibration.PATIENT_RULES).

    Returns a PatientTable. Raises ValueError for empty or inconsistent
    inputs, labels other than 0/1, probabilities outside [0, 1], or a patient
    whose images carry both labels.
    """
    y, p, ids = as_arrays(labels, probs, patient_ids)
    names, index = np.unique(ids.astype(str), return_inverse=True)
    count = len(names)
    yhat = (p >= threshold).astype(np.int64)

    def per_patient(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=values.astype(np.float64), minlength=count)

    images = np.bincount(index, minlength=count).astype(np.float64)
    positives = per_patient(y)
    mixed = (positives > 0) & (positives < images)
    if mixed.any():
        raise ValueError(
            f"patient(s) {', '.join(names[mixed][:5])} have images labelled both benign and "
            "malignant"
        )
    eps = 1e-7  # the clipping of metrics.classification_metrics' loss
    clipped = np.clip(p, eps, 1 - eps)
    bce = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    correct = per_patient(y == yhat)
    if patient_rule == "mean":
        called = per_patient(p) / images >= threshold
    elif patient_rule == "majority":
        called = per_patient(yhat) >= images / 2
    else:
        raise ValueError(f"patient rule {patient_rule!r}; accepted: mean, majority")
    label = (positives > 0).astype(np.int64)
    return PatientTable(
        patient_ids=names,
        label=label,
        images=images,
        tp=per_patient((y == 1) & (yhat == 1)),
        fp=per_patient((y == 0) & (yhat == 1)),
        fn=per_patient((y == 1) & (yhat == 0)),
        tn=per_patient((y == 0) & (yhat == 0)),
        score=correct / images,
        patient_correct=(called.astype(np.int64) == label).astype(np.float64),
        loss_sum=per_patient(bce),
        image_patient=index,
        image_probs=p,
        image_labels=y,
    )


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _weighted_auc(table: PatientTable, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of patient ``weights`` (R, P): every image weighs as much as
    its patient was drawn; ties count one half, as in sklearn. NaN without both classes."""
    order = np.argsort(table.image_probs, kind="stable")
    probs = table.image_probs[order]
    positive = table.image_labels[order] == 1
    patient = table.image_patient[order]
    starts = np.flatnonzero(np.r_[True, probs[1:] != probs[:-1]])  # groups of tied scores
    out = np.empty(weights.shape[0])
    # Rows in chunks: the (rows, images) weight matrix of all replicates at once would take
    # gigabytes on the whole data set.
    for first in range(0, weights.shape[0], _AUC_CHUNK):
        image_weights = weights[first : first + _AUC_CHUNK, patient]  # (rows, N)
        pos = np.add.reduceat(np.where(positive, image_weights, 0.0), starts, axis=1)
        neg = np.add.reduceat(np.where(positive, 0.0, image_weights), starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        out[first : first + _AUC_CHUNK] = np.where(
            pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan
        )
    return out


def weighted_metrics(table: PatientTable, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of BOOTSTRAP_METRICS for each row of ``weights`` (R, P): how many
    times each patient counts.

    With one row of ones this is breakhis.stats.metrics.classification_metrics of the
    same predictions. Returns {metric: (R,) array}; ``roc_auc`` is NaN in rows
    with one class only. Raises ValueError when ``weights`` has the wrong shape.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[1] != len(table.patient_ids):
        raise ValueError(
            f"weights have {weights.shape[1]} columns for {len(table.patient_ids)} patients"
        )
    tp, fp = weights @ table.tp, weights @ table.fp
    fn, tn = weights @ table.fn, weights @ table.tn
    images = weights @ table.images
    patients = weights.sum(axis=1)
    accuracy = _divide(tp + tn, images)
    recall = _divide(tp, tp + fn)
    specificity = _divide(tn, tn + fp)
    both = (tp + fn > 0) & (tn + fp > 0)
    return {
        "loss": _divide(weights @ table.loss_sum, images),
        "accuracy": accuracy,
        "balanced_accuracy": np.where(both, (recall + specificity) / 2, accuracy),
        "precision": _divide(tp, tp + fp),
        "recall": recall,
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
        "roc_auc": _weighted_auc(table, weights),
        "patient_recognition_rate": _divide(weights @ table.score, patients),
        "patient_accuracy": _divide(weights @ table.patient_correct, patients),
    }


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals of the metrics over patient resamples."""

    replicates: int
    confidence: float
    stratified: bool
    seed: int
    patients: int
    intervals: dict[str, tuple[float, float]]
    """metric -> (low, high); NaN when the metric was undefined in every replicate."""
    std: dict[str, float]
    """metric -> standard deviation over the replicates (the bootstrap standard error)."""
    defined: dict[str, int]
    """metric -> replicates in which it was defined (ROC-AUC needs both classes)."""
    samples: dict[str, np.ndarray] = field(repr=False, compare=False)
    """metric -> (replicates,) values, for plots and checks."""

    def to_dict(self) -> dict:
        """A JSON-ready summary (no samples)."""
        return {
            "unit": "patient",
            "replicates": self.replicates,
            "confidence": self.confidence,
            "stratified": self.stratified,
            "seed": self.seed,
            "patients": self.patients,
            "method": "percentile",
            "intervals": {k: [lo, hi] for k, (lo, hi) in self.intervals.items()},
            "std": dict(self.std),
            "defined_replicates": dict(self.defined),
        }


def draw_patients(
    labels: np.ndarray, replicates: int, rng: np.random.Generator, *, stratified: bool = True
) -> np.ndarray:
    """Draw counts (replicates, P) of patients resampled with replacement.

    Each row sums to P; with ``stratified`` each class's patients are drawn
    among themselves, as many as the class has.
    """
    count = len(labels)
    if not stratified:
        return rng.multinomial(count, np.full(count, 1.0 / count), size=replicates).astype(float)
    weights = np.zeros((replicates, count))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        size = len(members)
        weights[:, members] = rng.multinomial(size, np.full(size, 1.0 / size), size=replicates)
    return weights


def patient_bootstrap(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    *,
    replicates: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratified: bool = True,
    threshold: float = 0.5,
    patient_rule: str = "mean",
) -> BootstrapResult:
    """Percentile confidence intervals of every metric, resampling patients.

    Returns a BootstrapResult (the same for the same inputs and ``seed``).
    Raises ValueError for ``replicates`` < 1, a ``confidence`` outside (0, 1),
    and whatever patient_table() raises for bad predictions.
    """
    if replicates < 1:
        raise ValueError(f"bootstrap replicates must be >= 1, got {replicates}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    table = patient_table(labels, probs, patient_ids, threshold, patient_rule)
    rng = np.random.default_rng(seed)
    weights = draw_patients(table.label, replicates, rng, stratified=stratified)
    samples = weighted_metrics(table, weights)
    tail = (1.0 - confidence) / 2 * 100
    intervals, std, defined = {}, {}, {}
    for name, values in samples.items():
        ok = values[~np.isnan(values)]
        defined[name] = int(ok.size)
        if ok.size == 0:
            intervals[name], std[name] = (float("nan"), float("nan")), float("nan")
            continue
        low, high = np.percentile(ok, [tail, 100 - tail])
        intervals[name] = (float(low), float(high))
        std[name] = float(ok.std(ddof=1)) if ok.size > 1 else 0.0
    return BootstrapResult(
        replicates=replicates,
        confidence=confidence,
        stratified=stratified,
        seed=seed,
        patients=len(table.patient_ids),
        intervals=intervals,
        std=std,
        defined=defined,
        samples=samples,
    )
