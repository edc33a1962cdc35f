"""Turning a model's scores into decisions: temperature, threshold, patient calls, calibration.

Pure numpy/scipy, no torch or Ray, so training (which fits the temperature and
the threshold on its validation patients every epoch), scoring and evaluation
(which apply them) share one definition.

The model outputs two logits; for two classes the softmax depends only on the
margin ``m = logit_malignant - logit_benign``: ``p = sigmoid(m)``.

- **Temperature scaling** (Guo et al., 2017, "On Calibration of Modern Neural
  Networks"): ``p = sigmoid(m / T)`` with the one ``T > 0`` that minimises the
  negative log-likelihood of the validation images. It changes no ranking
  (ROC-AUC is the same), only how confident the probabilities are.
- **The decision threshold**: the probability (after temperature) at or above
  which a tile is called malignant, chosen on the validation images by
  ``THRESHOLD_RULES``: ``balanced_accuracy`` (the default: the mean of the two
  classes' recalls, i.e. Youden's J; what matters when the classes are
  imbalanced) or ``accuracy``. Among thresholds that tie, the middle of the widest
  tied interval is taken, which keeps the decision away from any one
  validation image. A model that ranks well but is shifted towards one class
  (a class-weighted loss, a short run) gets its calls back this way.
- **Patient calls** (``PATIENT_RULES``): ``mean`` calls a patient malignant when the
  mean probability of their tiles reaches the threshold; ``majority`` when at
  least half of their tiles are called malignant.
- **Calibration measures**: Brier score, expected calibration error over
  equal-width bins, and the bins themselves for a reliability diagram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THRESHOLD_RULES: tuple[str, ...] = ("balanced_accuracy", "accuracy")
"""How the decision threshold is chosen on the validation images."""
PATIENT_RULES: tuple[str, ...] = ("mean", "majority")
"""How a patient's tiles become one call: mean probability, or majority of tile calls."""
TEMPERATURE_RANGE: tuple[float, float] = (0.05, 20.0)
"""Bounds of the fitted temperature (beyond them the validation set says too little)."""
_EPS = 1e-7


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large ``|x|``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def probabilities(margins: Sequence[float] | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Malignancy probabilities ``sigmoid(margin / temperature)``.

    Raises ValueError for a temperature that is not a positive finite number.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return sigmoid(np.asarray(margins, dtype=np.float64) / temperature)


def _nll(margins: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    # -log sigmoid(z) = logaddexp(0, -z): exact for any margin.
    z = margins / temperature
    return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))


def fit_temperature(
    margins: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> float:
    """The temperature that minimises the validation negative log-likelihood.

    Returns 1.0 when the labels hold one class only or every margin is 0 (nothing
    to fit). Bounded to TEMPERATURE_RANGE. Raises ValueError for inputs of
    different lengths or no input.
    """
    from scipy.optimize import minimize_scalar

    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if m.shape != y.shape or m.size == 0:
        raise ValueError(f"need equal, non-empty margins ({m.size}) and labels ({y.size})")
    if len(np.unique(y)) < 2 or not np.any(m):
        return 1.0
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(
        lambda log_t: _nll(m, y, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(found.x))


def subtype_margins(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The logit of P(malignant) of a subtype model's [N, 8] ``logits`` at ``temperature``:
    logsumexp of the malignant four over T minus that of the benign four, so that its
    sigmoid is the sum of the malignant classes' softmax(logits / T) (breakhis.subtypes)."""
    from scipy.special import logsumexp

    from breakhis.subtypes import SUBTYPE_CLASS_NAMES, malignant_indices

    z = np.asarray(logits, dtype=np.float64) / temperature
    malignant = malignant_indices(SUBTYPE_CLASS_NAMES)
    benign = [i for i in range(z.shape[1]) if i not in malignant]
    return logsumexp(z[:, malignant], axis=1) - logsumexp(z[:, benign], axis=1)


def subtype_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(malignant) of a subtype model's [N, 8] ``logits`` at ``temperature``: the sum of
    the malignant four of softmax(logits / T)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return sigmoid(subtype_margins(logits, temperature))


def fit_subtype_temperature(logits: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The temperature dividing a subtype model's eight logits that minimises the validation
    negative log-likelihood of the benign/malignant ``labels`` under P(malignant) (the
    binary decision is what the threshold rule then chooses on). Returns 1.0 when the labels
    hold one class only; bounded to TEMPERATURE_RANGE. Raises ValueError for inputs of
    different lengths or no input."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.size or y.size == 0:
        raise ValueError(f"need [N, K] logits for N labels, got {z.shape} and {y.size}")
    if len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        m = subtype_margins(z, float(np.exp(log_t)))
        return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -m, m))))

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def choose_threshold(
    probs: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    rule: str = "balanced_accuracy",
) -> float:
    """The decision threshold that maximises ``rule`` on these (validation) images.

    Candidate thresholds lie between consecutive distinct probabilities; among
    equally good ones the middle of the widest tied run is returned. Returns
    0.5 when the labels hold one class only. The result lies in (0, 1).
    Raises ValueError for an unknown rule or inconsistent inputs.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r}; accepted: {', '.join(THRESHOLD_RULES)}")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty probabilities ({p.size}) and labels ({y.size})")
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        return 0.5
    values = np.unique(p)
    # Cut points: below every value, between neighbours, above every value.
    cuts = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [1.0]])
    # Tiles called malignant at cut c: p >= c. Count them per class with searchsorted.
    pos_sorted = np.sort(p[y == 1])
    neg_sorted = np.sort(p[y == 0])
    tp = positives - np.searchsorted(pos_sorted, cuts, side="left")
    tn = np.searchsorted(neg_sorted, cuts, side="left")
    if rule == "balanced_accuracy":
        score = 0.5 * (tp / positives + tn / negatives)
    else:
        score = (tp + tn) / (positives + negatives)
    best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-12))
    # Runs of consecutive best cut indices; the interval a run spans is from the value
    # below its first cut to the value above its last.
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    edges = np.concatenate([[0.0], values, [1.0]])

    def span(run: np.ndarray) -> tuple[float, float]:
        return float(edges[run[0]]), float(edges[run[-1] + 1])

    low, high = max((span(r) for r in runs), key=lambda s: s[1] - s[0])
    return float(np.clip((low + high) / 2, _EPS, 1 - _EPS))


def patient_calls(
    probs: Sequence[float] | np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    threshold: float,
    rule: str = "mean",
) -> dict[str, int]:
    """One call per patient (1 malignant, 0 benign) from their tiles' probabilities.

    ``mean``: mean probability >= threshold; ``majority``: at least half of the
    tiles called malignant (probability >= threshold). Returns {patient_id: call}.
    Raises ValueError for an unknown rule or inconsistent inputs.
    """
    if rule not in PATIENT_RULES:
        raise ValueError(f"patient rule {rule!r}; accepted: {', '.join(PATIENT_RULES)}")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    pids = np.asarray(patient_ids, dtype=object).reshape(-1).astype(str)
    if p.shape != pids.shape or p.size == 0:
        raise ValueError(
            f"need equal, non-empty probabilities ({p.size}) and patients ({pids.size})"
        )
    names, index = np.unique(pids, return_inverse=True)
    counts = np.bincount(index, minlength=len(names))
    if rule == "mean":
        score = np.bincount(index, weights=p, minlength=len(names)) / counts
        called = score >= threshold
    else:
        malignant = np.bincount(
            index, weights=(p >= threshold).astype(np.float64), minlength=len(names)
        )
        called = malignant >= counts / 2
    return {str(n): int(c) for n, c in zip(names, called, strict=True)}


def brier_score(probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mean squared difference between probability and label (0 is perfect)."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty probabilities ({p.size}) and labels ({y.size})")
    return float(np.mean((p - y) ** 2))


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of predicted malignancy probability, for a reliability diagram."""

    edges: tuple[float, ...]
    """Bin edges, 0 to 1."""
    counts: tuple[int, ...]
    """Images per bin."""
    mean_prob: tuple[float, ...]
    """Mean predicted probability in each bin (NaN for an empty bin)."""
    frequency: tuple[float, ...]
    """Share of malignant images in each bin (NaN for an empty bin)."""

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |frequency - mean_prob|."""
        n = np.asarray(self.counts, dtype=np.float64)
        if n.sum() == 0:
            return float("nan")
        gap = np.abs(np.asarray(self.frequency) - np.asarray(self.mean_prob))
        return float(np.sum(np.where(n > 0, gap, 0.0) * n) / n.sum())


def reliability(
    probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, bins: int = 10
) -> ReliabilityBins:
    """Bin the predictions by probability into ``bins`` equal-width bins (the last one
    closed at 1). Raises ValueError for inconsistent inputs or fewer than one bin."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty probabilities ({p.size}) and labels ({y.size})")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=p, minlength=bins) / counts
        frequency = np.bincount(which, weights=y, minlength=bins) / counts
    return ReliabilityBins(
        edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
        mean_prob=tuple(float(v) for v in mean_prob),
        frequency=tuple(float(v) for v in frequency),
    )


def expected_calibration_error(
    probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, bins: int = 10
) -> float:
    """ECE over ``bins`` equal-width bins (see ReliabilityBins.ece)."""
    return reliability(probs, labels, bins).ece
