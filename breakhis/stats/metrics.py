"""Benign-vs-malignant classification metrics, image- and patient-level.

Pure numpy/scikit-learn, no torch or Ray, so training, tuning and evaluation
score predictions the same way. Malignant (label 1) is the positive class.

The patient-level recognition rate is the one of Spanhol et al. (2016), the
BreakHis paper (see shared/BREAKHIS.md):

    patient score P = correct images of P / images of P
    patient recognition rate = sum of patient scores / number of patients

It weighs every patient equally however many images they have, which is the
honest figure on a data set of 82 patients where one patient may have 10
images and another 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from breakhis.stats.calibration import patient_calls

METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "patient_recognition_rate",
    "patient_accuracy",
)
"""Keys of classification_metrics()' result, in display order."""

HIGHER_IS_BETTER: dict[str, bool] = {name: name != "loss" for name in METRIC_NAMES}
"""Whether a larger value of each metric is better (only the loss goes down)."""


def as_arrays(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked flat arrays (labels int64, probabilities float64, patient ids object or None).

    Raises ValueError for inputs of different lengths, no input, labels other than 0/1 and
    probabilities outside [0, 1].
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    if y.size == 0:
        raise ValueError("no predictions to score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (benign) or 1 (malignant), got {sorted(set(y))}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1] (got NaN or out-of-range values)")
    pids = None
    if patient_ids is not None:
        pids = np.asarray(patient_ids, dtype=object).reshape(-1)
        if pids.shape != y.shape:
            raise ValueError(f"patient_ids ({pids.size}) and labels ({y.size}) differ in length")
    return y, p, pids


def patient_scores(
    labels: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
) -> dict[str, float]:
    """Each patient's score: the share of their images classified correctly.

    Returns {patient_id: score in [0, 1]}. Raises ValueError when the inputs
    differ in length or are empty.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    yhat = np.asarray(predictions, dtype=np.int64).reshape(-1)
    pids = np.asarray(patient_ids, dtype=object).reshape(-1)
    if not (y.shape == yhat.shape == pids.shape):
        raise ValueError(
            f"labels ({y.size}), predictions ({yhat.size}) and patient_ids ({pids.size}) "
            "must have the same length"
        )
    if y.size == 0:
        raise ValueError("no predictions to score")
    names, index = np.unique(pids.astype(str), return_inverse=True)
    correct = np.bincount(index, weights=(y == yhat).astype(np.float64), minlength=len(names))
    total = np.bincount(index, minlength=len(names))
    return {str(n): float(c / t) for n, c, t in zip(names, correct, total, strict=True)}


def patient_recognition_rate(
    labels: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
) -> float:
    """The paper's patient-level recognition rate: the mean of the patient scores.

    Returns a float in [0, 1]. Raises ValueError as patient_scores() does.
    """
    scores = patient_scores(labels, predictions, patient_ids)
    return float(np.mean(list(scores.values())))


def image_recognition_rate(
    labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray
) -> float:
    """The paper's image-level recognition rate: correct images / all images (accuracy)."""
    y = np.asarray(labels).reshape(-1)
    yhat = np.asarray(predictions).reshape(-1)
    if y.shape != yhat.shape or y.size == 0:
        raise ValueError(f"need equal, non-empty labels ({y.size}) and predictions ({yhat.size})")
    return float(np.mean(y == yhat))


def patient_accuracy(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    threshold: float = 0.5,
    patient_rule: str = "mean",
) -> float:
    """Share of patients whose diagnosis is right when their images become one call by
    ``patient_rule`` (breakhis.stats.calibration.PATIENT_RULES: the mean probability, by
    default, or the majority of the images' calls).

    Returns a float in [0, 1]. Raises ValueError for inconsistent inputs or a
    patient whose images carry both labels.
    """
    y, p, pids = as_arrays(labels, probs, patient_ids)
    assert pids is not None
    names, index = np.unique(pids.astype(str), return_inverse=True)
    counts = np.bincount(index, minlength=len(names))
    positives = np.bincount(index, weights=y.astype(np.float64), minlength=len(names))
    mixed = (positives > 0) & (positives < counts)
    if mixed.any():
        raise ValueError(
            f"patient(s) {', '.join(names[mixed][:5])} have images labelled both benign and "
            "malignant"
        )
    truth = (positives > 0).astype(np.int64)
    calls = patient_calls(p, pids, threshold, patient_rule)  # sorted by patient, as names
    return float(np.mean(np.array([calls[str(n)] for n in names]) == truth))


def majority_rate(labels: Sequence[int] | np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class: the bar to beat."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size == 0:
        raise ValueError("no labels")
    return float(max(np.mean(y == 0), np.mean(y == 1)))


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray | None = None,
    threshold: float = 0.5,
    patient_rule: str = "mean",
) -> dict[str, float]:
    """Every metric of METRIC_NAMES for malignancy probabilities ``probs``.

    ``loss`` is the mean binary cross-entropy (natural log, unweighted);
    ``roc_auc`` is NaN when only one class is present; precision, recall and
    F1 treat malignant as positive and are 0 when undefined; the two patient
    metrics need ``patient_ids`` and are NaN without them. Also returns the
    confusion counts ``tn``, ``fp``, ``fn``, ``tp`` and ``images``/``patients``.

    Raises ValueError for empty or inconsistent inputs, labels other than 0/1,
    or probabilities outside [0, 1].
    """
    # sklearn (and scipy under it) takes a second to import: here, not at the top, so the
    # configs that name METRIC_NAMES keep `breakhis train --help` fast.
    from sklearn import metrics as skm

    y, p, pids = as_arrays(labels, probs, patient_ids)
    yhat = (p >= threshold).astype(np.int64)
    eps = 1e-7
    clipped = np.clip(p, eps, 1 - eps)
    loss = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))
    tn, fp, fn, tp = skm.confusion_matrix(y, yhat, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y)) == 2
    out = {
        "loss": loss,
        "accuracy": image_recognition_rate(y, yhat),
        # sklearn warns and returns a one-class score otherwise; the mean recall of the
        # classes that are present is the same number without the warning.
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, yhat))
        if both_classes
        else image_recognition_rate(y, yhat),
        "precision": float(skm.precision_score(y, yhat, zero_division=0)),
        "recall": float(skm.recall_score(y, yhat, zero_division=0)),
        "f1": float(skm.f1_score(y, yhat, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, p)) if both_classes else float("nan"),
        "patient_recognition_rate": float("nan"),
        "patient_accuracy": float("nan"),
    }
    if pids is not None:
        out["patient_recognition_rate"] = patient_recognition_rate(y, yhat, pids)
        out["patient_accuracy"] = patient_accuracy(y, p, pids, threshold, patient_rule)
    out.update(
        tn=int(tn),
        fp=int(fp),
        fn=int(fn),
        tp=int(tp),
        images=int(y.size),
        patients=int(len(set(pids.tolist()))) if pids is not None else 0,
    )
    return out
