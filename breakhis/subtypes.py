"""The two tasks a model can learn (``--task binary|subtype``) and the eight-subtype metrics.

- ``binary``: two classes, benign and malignant (breakhis.names.CLASS_NAMES).
- ``subtype``: the eight BreakHis tumour types, benign four then malignant four
  (SUBTYPE_CLASS_NAMES: adenosis, fibroadenoma, phyllodes_tumor, tubular_adenoma,
  ductal_carcinoma, lobular_carcinoma, mucinous_carcinoma, papillary_carcinoma). A tile's
  class is the TYPE of its file name.

A subtype model answers the binary question too: P(malignant) is the sum of its four
malignant class probabilities (softmax of the logits over the model's temperature), so the
binary metrics, the decision threshold and the patient calls of a subtype model are those
of the binary pipeline, computed from that sum. Its binary margin (the logit of
P(malignant) at temperature 1) is ``logsumexp(malignant logits) - logsumexp(benign logits)``.

Patient-level subtype metrics call a patient's subtype the argmax of the mean class
probabilities of their tiles. A patient whose tiles carry two subtypes (slide 14-13412 of
BreakHis is filed both as ductal and as lobular carcinoma) has no single true subtype: such
patients are left out of the patient-level subtype confusion matrix and counted in
``patients_mixed_subtype`` (their tiles keep their own subtype in every image-level
metric, and their binary label is the same for every tile, so the binary metrics count
them as usual).

Pure numpy (scikit-learn imported where used), no torch or Ray: configs import TASKS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from breakhis.names import CLASS_NAMES, SUBTYPES, BreakHisNameError, parse_name

TASKS: tuple[str, ...] = ("binary", "subtype")
"""Accepted values of ``--task``."""
SUBTYPE_CODES: tuple[str, ...] = tuple(
    sorted(SUBTYPES, key=lambda code: (SUBTYPES[code][1], list(SUBTYPES).index(code)))
)
"""File-name codes of the eight classes, benign four then malignant four: A F PT TA DC LC MC PC."""
SUBTYPE_CLASS_NAMES: tuple[str, ...] = tuple(SUBTYPES[code][0] for code in SUBTYPE_CODES)
"""The subtype model's class names (output index order)."""
SUBTYPE_INDEX: dict[str, int] = {name: i for i, name in enumerate(SUBTYPE_CLASS_NAMES)}
"""Subtype name (the folder name of the official archive) -> class index."""
SUBTYPE_METRIC_NAMES: tuple[str, ...] = (
    "subtype_loss",
    "subtype_accuracy",
    "subtype_balanced_accuracy",
)
"""The per-epoch validation metrics of a subtype model, beside the binary ones (derived)."""
SUBTYPE_HIGHER_IS_BETTER: dict[str, bool] = {
    name: name != "subtype_loss" for name in SUBTYPE_METRIC_NAMES
}


def class_names(task: str) -> tuple[str, ...]:
    """The class names of a model of ``task``. Raises ValueError for an unknown task."""
    if task == "binary":
        return CLASS_NAMES
    if task == "subtype":
        return SUBTYPE_CLASS_NAMES
    raise ValueError(f"--task {task!r} unknown; accepted: {', '.join(TASKS)}")


def task_of(names: Sequence[str]) -> str:
    """The task of a model with these class names. Raises ValueError naming them when they
    are neither task's."""
    names = tuple(names)
    for task in TASKS:
        if names == class_names(task):
            return task
    raise ValueError(
        f"class_names {list(names)}: expected {list(CLASS_NAMES)} (binary) or "
        f"{list(SUBTYPE_CLASS_NAMES)} (subtype)"
    )


def malignant_indices(names: Sequence[str]) -> list[int]:
    """Output indices whose classes are malignant: ``malignant`` of a binary model, the four
    carcinomas of a subtype model."""
    if task_of(names) == "binary":
        return [list(names).index("malignant")]
    return [i for i, name in enumerate(names) if SUBTYPES[SUBTYPE_CODES[i]][1] == 1]


def subtype_index_of_tile(tile_id: str) -> int:
    """The class index (SUBTYPE_CLASS_NAMES) of a tile from its id (its file name without
    ``.png``); -1 when the id is not a BreakHis name."""
    try:
        return SUBTYPE_INDEX[parse_name(f"{tile_id}.png").subtype]
    except BreakHisNameError:
        return -1


def subtype_indices(tile_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """subtype_index_of_tile of each id, as int64."""
    return np.asarray([subtype_index_of_tile(str(t)) for t in tile_ids], dtype=np.int64)


def binary_labels(classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Benign (0) / malignant (1) of subtype class indices."""
    malignant = np.asarray(malignant_indices(SUBTYPE_CLASS_NAMES))
    return np.isin(np.asarray(classes, dtype=np.int64), malignant).astype(np.int64)


def class_weights(counts: Sequence[int]) -> tuple[float, ...]:
    """Loss weights n / (K n_c) for per-class image counts (the binary recipe's, over K
    classes); 1.0 for a class with no image."""
    total = sum(counts)
    return tuple(total / (len(counts) * n) if n else 1.0 for n in counts)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def malignant_probability(class_probs: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """P(malignant) of [N, K] class probabilities: the sum over the malignant classes."""
    return np.asarray(class_probs, dtype=np.float64)[:, malignant_indices(names)].sum(axis=1)


def confusion(truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """The k x k confusion matrix (rows: true class, columns: predicted), int64."""
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def _recalls(matrix: np.ndarray) -> list[float | None]:
    rows = matrix.sum(axis=1)
    return [float(matrix[i, i] / rows[i]) if rows[i] else None for i in range(len(rows))]


def _balanced(recalls: Sequence[float | None]) -> float:
    present = [r for r in recalls if r is not None]
    return float(np.mean(present)) if present else float("nan")


def epoch_metrics(classes: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """SUBTYPE_METRIC_NAMES of validation predictions: the unweighted 8-class cross-entropy,
    accuracy, and balanced accuracy (mean recall over the classes present)."""
    y = np.asarray(classes, dtype=np.int64)
    z = np.asarray(logits, dtype=np.float64)
    if y.size == 0:
        return dict.fromkeys(SUBTYPE_METRIC_NAMES, float("nan"))
    shifted = z - z.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    predicted = z.argmax(axis=1)
    matrix = confusion(y, predicted, z.shape[1])
    return {
        "subtype_loss": float(-log_probs[np.arange(y.size), y].mean()),
        "subtype_accuracy": float(np.mean(predicted == y)),
        "subtype_balanced_accuracy": _balanced(_recalls(matrix)),
    }


def subtype_report(
    classes: Sequence[int] | np.ndarray,
    class_probs: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    names: Sequence[str] = SUBTYPE_CLASS_NAMES,
) -> dict[str, Any]:
    """The subtype metrics of test predictions (JSON-ready).

    ``classes``: true class index per tile; ``class_probs``: [N, K] probabilities;
    ``patient_ids`` per tile. Image level: ``confusion_matrix`` (K x K, rows true, columns
    predicted by argmax), ``recall`` per class (null for a class without test images),
    ``accuracy`` and ``balanced_accuracy`` (mean recall over the classes present). Patient
    level, a patient's call being the argmax of their tiles' mean class probabilities:
    the same over the patients with one subtype; patients with two subtypes are left out
    and counted (``patients_mixed_subtype``, named in ``mixed_patients``).

    Raises ValueError for inputs of different lengths, no input or a class index outside
    0..K-1.
    """
    y = np.asarray(classes, dtype=np.int64).reshape(-1)
    p = np.asarray(class_probs, dtype=np.float64)
    pids = np.asarray(patient_ids, dtype=object).reshape(-1).astype(str)
    k = len(names)
    if p.ndim != 2 or p.shape != (y.size, k) or pids.shape != y.shape:
        raise ValueError(
            f"subtype metrics need {y.size} x {k} probabilities and {y.size} patient ids, got "
            f"{p.shape} and {pids.size}"
        )
    if y.size == 0:
        raise ValueError("no predictions to score")
    if (y < 0).any() or (y >= k).any():
        raise ValueError(f"class indices must lie in 0..{k - 1}, got {sorted(set(y.tolist()))}")
    image = confusion(y, p.argmax(axis=1), k)
    recalls = _recalls(image)
    patients, index = np.unique(pids, return_inverse=True)
    mean_probs = np.zeros((len(patients), k))
    np.add.at(mean_probs, index, p)
    mean_probs /= np.bincount(index, minlength=len(patients))[:, None]
    truths = [sorted(set(y[index == i].tolist())) for i in range(len(patients))]
    single = [i for i, t in enumerate(truths) if len(t) == 1]
    mixed = [str(patients[i]) for i, t in enumerate(truths) if len(t) > 1]
    patient = confusion(
        np.asarray([truths[i][0] for i in single], np.int64),
        mean_probs[single].argmax(axis=1) if single else np.zeros(0, np.int64),
        k,
    )
    patient_recalls = _recalls(patient)
    scored = int(patient.sum())
    return {
        "class_names": list(names),
        "rows": "true class",
        "columns": "predicted class (argmax)",
        "images": int(y.size),
        "confusion_matrix": image.tolist(),
        "recall": dict(zip(names, recalls, strict=True)),
        "accuracy": float(np.trace(image) / y.size),
        "balanced_accuracy": _balanced(recalls),
        "patient": {
            "rule": "argmax of the mean class probabilities of the patient's tiles; patients "
            "whose tiles carry two subtypes are left out",
            "patients": scored,
            "patients_mixed_subtype": len(mixed),
            "mixed_patients": mixed,
            "confusion_matrix": patient.tolist(),
            "recall": dict(zip(names, patient_recalls, strict=True)),
            "accuracy": float(np.trace(patient) / scored) if scored else float("nan"),
            "balanced_accuracy": _balanced(patient_recalls),
        },
    }
