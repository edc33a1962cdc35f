"""What ``breakhis benchmark accuracy`` measured: one SideResult per side (the reference
loop, each variant of the job), split and seed, the data it ran on, and the paired comparison
of the figures (AccuracyBenchmarkResult: table, JSON, target; paired_summary: mean, sample
std and t-interval of the paired differences)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

REFERENCE = "reference"
"""Name of the plain loop's side in the result."""

RATES = ("image_rate", "patient_rate")
"""The paper's two rates: the target compares the sides' means of these."""

COMPARED = ("image_rate", "patient_rate", "balanced_accuracy", "roc_auc")
"""The figures whose paired differences (variant - reference) are summarised."""

CONFIDENCE = 0.95
"""Coverage of the t-interval of a paired difference's mean."""

SUBTYPE_FIGURES = ("subtype_accuracy", "subtype_balanced_accuracy", "subtype_patient_accuracy")
"""A subtype model's eight-class figures, shown for the sides that have them."""

JOB = "job"
"""The job at its defaults: every other variant is also compared with it, pair by pair."""

_SHOWN = (*COMPARED, "seconds")
_TITLES = {
    "image_rate": "image rate",
    "patient_rate": "patient rate",
    "balanced_accuracy": "balanced acc.",
    "roc_auc": "ROC-AUC",
    "subtype_accuracy": "subtype accuracy",
    "subtype_balanced_accuracy": "subtype balanced acc.",
    "subtype_patient_accuracy": "subtype patient accuracy",
}


@dataclass(frozen=True)
class SideResult:
    """One side (the reference or a variant of the job) with one seed on one split's test
    patients."""

    image_rate: float
    """The paper's image-level recognition rate (accuracy)."""
    patient_rate: float
    """The paper's patient-level recognition rate (mean of the patient scores)."""
    balanced_accuracy: float
    roc_auc: float
    seconds: float
    """Wall time of the side on this split and seed: training, then prediction on the test
    patients (that of the session that ran it, when loaded from an earlier one)."""
    test_images: int
    test_patients: int
    train_patients: int
    """Patients the side trained on (the job's validation patients not included)."""
    val_patients: int
    """Patients the side validated on (the reference: none; a refit trained on them too)."""
    images_per_epoch: int
    """Training images stepped through per epoch (the job drops a last incomplete batch)."""
    kept_epoch: int
    """The epoch whose model was scored (the reference keeps its last)."""
    threshold: float
    """Probability of malignancy at which a tile is called malignant."""
    error: str = ""
    """Why the side could not run on this split (its figures are then NaN); empty when it
    ran."""
    subtype_accuracy: float | None = None
    """A subtype model's eight-class image accuracy (None for a binary side)."""
    subtype_balanced_accuracy: float | None = None
    """Its mean recall over the subtypes present among the test images."""
    subtype_patient_accuracy: float | None = None
    """Its patient-level accuracy (a patient's call: the argmax of their tiles' mean class
    probabilities; patients with two subtypes left out)."""

    @classmethod
    def from_metrics(cls, m: dict[str, float], *, seconds: float, **sides: Any) -> SideResult:
        """The rates and counts from breakhis.stats.metrics.classification_metrics' ``m``; the
        side's own facts (patients, epochs, threshold) as keywords."""
        return cls(
            image_rate=m["accuracy"],
            patient_rate=m["patient_recognition_rate"],
            balanced_accuracy=m["balanced_accuracy"],
            roc_auc=m["roc_auc"],
            seconds=seconds,
            test_images=int(m["images"]),
            test_patients=int(m["patients"]),
            **sides,
        )


@dataclass(frozen=True)
class DataInfo:
    """What the benchmark ran on."""

    source: str
    """``--data`` as resolved (the raw folder, the prepared DEST or ``generated``)."""
    kind: str
    """``raw``, ``prepared`` or ``generated``."""
    dest: str
    """The prepared DEST both sides read."""
    images: int
    patients: int
    manifest: str = ""
    """breakhis.data.prepare.manifest_hash of the prepared data (part of every run's key)."""


@dataclass(frozen=True)
class PairedSummary:
    """Mean, sample standard deviation and t-interval of paired differences."""

    n: int
    """Pairs (split, seed) summarised."""
    mean: float
    std: float
    """Sample standard deviation (n - 1); NaN for fewer than two pairs."""
    low: float
    """Lower end of the CONFIDENCE t-interval of the mean; NaN for fewer than two pairs."""
    high: float


def t_quantile(q: float, dof: int) -> float:
    """Student's t quantile at ``q`` for ``dof`` degrees of freedom (scipy, which
    scikit-learn brings). Raises ValueError for dof < 1 or q outside (0, 1)."""
    from scipy.stats import t

    if dof < 1 or not 0.0 < q < 1.0:
        raise ValueError(f"t quantile needs dof >= 1 and q in (0, 1), got dof={dof}, q={q}")
    return float(t.ppf(q, dof))


def paired_summary(values: list[float], confidence: float = CONFIDENCE) -> PairedSummary:
    """The PairedSummary of ``values`` (one difference per pair): mean +- t_{(1+c)/2, n-1}
    * std / sqrt(n). Every figure is NaN when a value is (a side that did not run)."""
    n = len(values)
    if n == 0 or any(math.isnan(v) for v in values):
        return PairedSummary(n, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n < 2:
        return PairedSummary(n, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(values)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return PairedSummary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class AccuracyBenchmarkResult:
    """What ``breakhis benchmark accuracy`` measured."""

    date: str
    device: str
    config: dict
    data: DataInfo
    pairs: list[tuple[int, int]]
    """(K of rep:K, seed) of every run pair, in order."""
    sides: dict[str, list[SideResult]] = field(default_factory=dict)
    """Side name (``reference``, then each variant) -> one result per pair, in order."""
    runs: dict[str, Any] = field(default_factory=dict)
    """Where the runs' files are (``folder``), how many were ``computed`` in this session and
    how many ``resumed`` from an earlier one."""

    @property
    def variants(self) -> list[str]:
        return [name for name in self.sides if name != REFERENCE]

    def summary(self, side: str, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation over the pairs of one figure of one side
        (std NaN for a single pair)."""
        s = paired_summary([_figure(r, key) for r in self.sides[side]])
        return s.mean, s.std

    def differences(self, variant: str, key: str, base: str = REFERENCE) -> list[float]:
        """``variant - base`` of one figure, per pair."""
        return [
            getattr(v, key) - getattr(r, key)
            for v, r in zip(self.sides[variant], self.sides[base], strict=True)
        ]

    def paired(self, variant: str, key: str, base: str = REFERENCE) -> PairedSummary:
        """The PairedSummary of ``variant - base`` of one figure over the pairs."""
        return paired_summary(self.differences(variant, key, base))

    def against_job(self) -> list[str]:
        """The variants also compared with the job at its defaults (when it ran too)."""
        return [v for v in self.variants if v != JOB] if JOB in self.sides else []

    def subtype_sides(self) -> list[str]:
        """The sides with eight-class figures (subtype models)."""
        return [
            side
            for side, results in self.sides.items()
            if any(r.subtype_accuracy is not None for r in results)
        ]

    def target_met(self, variant: str) -> bool:
        """Whether the variant's mean is at least the reference's on both rates."""
        return all(self.summary(variant, k)[0] >= self.summary(REFERENCE, k)[0] for k in RATES)

    def format_table(self) -> str:
        """Markdown for the README: every run, each side's mean +- std, each variant's paired
        differences, and the target."""
        c, d = self.config, self.data
        seeds = sorted({seed for _, seed in self.pairs})
        lines = [
            f"Accuracy benchmark, {self.date}, {self.device}; data: {d.source} ({d.kind}, "
            f"{d.images} images of {d.patients} patients); reference: the {c['reference']} "
            f"loop; {c['arch']} from random weights at {c['image_size']} px, {c['epochs']} "
            f"epochs, batch {c['batch_size']}, AdamW lr {c['lr']:g}; {len(self.pairs)} pairs "
            f"(splits {', '.join(f'rep:{k}' for k in sorted({k for k, _ in self.pairs}))} x "
            f"seeds {', '.join(map(str, seeds))}); mean +- sample std over the pairs; runs "
            f"computed {self.runs.get('computed', 0)}, resumed {self.runs.get('resumed', 0)}",
            "",
            *self._runs_table(),
        ]
        for variant in self.variants:
            lines += ["", *self._differences_table(variant)]
        for variant in self.against_job():
            lines += ["", *self._differences_table(variant, JOB)]
        if self.subtype_sides():
            lines += ["", *self._subtype_table()]
        lines += ["", *(self._verdict(v) for v in self.variants)]
        return "\n".join(lines)

    def _subtype_table(self) -> list[str]:
        lines = [
            "| eight subtypes: split | seed | side | "
            + " | ".join(_TITLES[k] for k in SUBTYPE_FIGURES)
            + " |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for side in self.subtype_sides():
            for (k, seed), r in zip(self.pairs, self.sides[side], strict=True):
                cells = " | ".join(_fmt(_figure(r, key), key) for key in SUBTYPE_FIGURES)
                lines.append(f"| rep:{k} | {seed} | {side} | {cells} |")
            cells = " | ".join(_fmt_pm(*self.summary(side, key), key) for key in SUBTYPE_FIGURES)
            lines.append(f"| mean +- std | | {side} | {cells} |")
        return lines

    def _runs_table(self) -> list[str]:
        titles = " | ".join([*(_TITLES[k] for k in COMPARED), "seconds"])
        lines = [
            "| split | seed | side | test patients / images | train / val patients "
            f"| images per epoch | kept epoch | threshold | {titles} |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, (k, seed) in enumerate(self.pairs):
            for side, results in self.sides.items():
                r = results[i]
                lines.append(
                    f"| rep:{k} | {seed} | {side} | {r.test_patients} / {r.test_images} | "
                    f"{r.train_patients} / {r.val_patients} | {r.images_per_epoch} | "
                    f"{r.kept_epoch} | {r.threshold:.3f} | "
                    + " | ".join(_fmt(getattr(r, key), key) for key in _SHOWN)
                    + " |"
                    if not r.error
                    else f"| rep:{k} | {seed} | {side} | did not run: {r.error} |"
                )
        for side in self.sides:
            cells = " | ".join(_fmt_pm(*self.summary(side, key), key) for key in _SHOWN)
            lines.append(f"| mean +- std | | {side} | | | | | | {cells} |")
        return lines

    def _differences_table(self, variant: str, base: str = REFERENCE) -> list[str]:
        diffs = {key: self.differences(variant, key, base) for key in COMPARED}
        paired = {key: self.paired(variant, key, base) for key in COMPARED}
        lines = [
            f"| {variant} - {base}: split | seed | "
            + " | ".join(_TITLES[key] for key in COMPARED)
            + " |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for i, (k, seed) in enumerate(self.pairs):
            cells = " | ".join(_fmt_diff(diffs[key][i]) for key in COMPARED)
            lines.append(f"| rep:{k} | {seed} | {cells} |")
        means = " | ".join(_fmt_pm(paired[key].mean, paired[key].std, "diff") for key in COMPARED)
        intervals = " | ".join(_fmt_interval(paired[key]) for key in COMPARED)
        lines.append(f"| mean +- std | | {means} |")
        lines.append(f"| {CONFIDENCE:.0%} t-interval | | {intervals} |")
        return lines

    def _verdict(self, variant: str) -> str:
        figures = "; ".join(
            f"{_TITLES[k]} {self.summary(variant, k)[0]:.3f} vs "
            f"{self.summary(REFERENCE, k)[0]:.3f}, difference and {CONFIDENCE:.0%} interval "
            f"{_fmt_interval(self.paired(variant, k))}"
            for k in RATES
        )
        failed = [
            f"rep:{k} seed {seed}"
            for (k, seed), r in zip(self.pairs, self.sides[variant], strict=True)
            if r.error
        ]
        if failed:
            figures = f"it did not run on {', '.join(failed)}"
        verdict = "met" if self.target_met(variant) else "missed"
        return (
            f"Target ({variant} mean >= reference mean on both rates): **{verdict}** ({figures})."
        )

    def to_dict(self) -> dict:
        """Measurements and derived figures, for JSON (NaN written as null)."""
        out: dict[str, Any] = {
            "date": self.date,
            "device": self.device,
            "config": self.config,
            "data": asdict(self.data),
            "runs": self.runs,
            "pairs": [
                {
                    "split": f"rep:{k}",
                    "seed": seed,
                    "sides": {s: asdict(r[i]) for s, r in self.sides.items()},
                }
                for i, (k, seed) in enumerate(self.pairs)
            ],
            "summary": {
                side: {
                    k: dict(zip(("mean", "std"), self.summary(side, k), strict=True))
                    for k in _SHOWN
                }
                for side in self.sides
            },  # fmt: skip
            "confidence": CONFIDENCE,
            "differences": {},
            "target": {},
        }
        for variant in self.variants:
            diffs = {k: self.differences(variant, k) for k in COMPARED}
            out["differences"][variant] = {
                "per_pair": [
                    {"split": f"rep:{k}", "seed": seed, **{m: diffs[m][i] for m in COMPARED}}
                    for i, (k, seed) in enumerate(self.pairs)
                ],
                **{m: asdict(self.paired(variant, m)) for m in COMPARED},
            }
            out["target"][variant] = "met" if self.target_met(variant) else "missed"
        if self.against_job():
            out["differences_from_job"] = {
                variant: {m: asdict(self.paired(variant, m, JOB)) for m in COMPARED}
                for variant in self.against_job()
            }
        for side in self.subtype_sides():
            out["summary"][side].update(
                {k: dict(zip(("mean", "std"), self.summary(side, k), strict=True))
                 for k in SUBTYPE_FIGURES}
            )  # fmt: skip
        return _no_nan(out)


def _figure(result: SideResult, key: str) -> float:
    """One figure of a side; NaN where it has none (a binary side's subtype figures)."""
    value = getattr(result, key)
    return math.nan if value is None else value


def _fmt(value: float, key: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if key == "seconds" else f"{value:.3f}"


def _fmt_diff(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def _fmt_pm(mean: float, std: float, key: str) -> str:
    if math.isnan(mean):
        return "n/a"
    if key == "diff":
        return _fmt_diff(mean) + ("" if math.isnan(std) else f" +- {std:.3f}")
    return _fmt(mean, key) + ("" if math.isnan(std) else f" +- {_fmt(std, key)}")


def _fmt_interval(s: PairedSummary) -> str:
    if math.isnan(s.low):
        return _fmt_diff(s.mean)
    return f"{s.mean:+.3f} [{s.low:+.3f}, {s.high:+.3f}]"


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
