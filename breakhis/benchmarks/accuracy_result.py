"""What ``breakhis benchmark accuracy`` measured: one SideResult per side (the plain
reference loop, each variant of the job) and split, the data it ran on, and the
comparison of the paper's two rates (AccuracyBenchmarkResult: table, JSON, target)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

REFERENCE = "reference"
"""Name of the plain loop's side in the result."""

RATES = ("image_rate", "patient_rate")
"""The paper's two rates, compared between the sides."""

_SHOWN = ("image_rate", "patient_rate", "balanced_accuracy", "roc_auc", "seconds")


@dataclass(frozen=True)
class SideResult:
    """One side (the reference or a variant of the job) on one split's test patients."""

    image_rate: float
    """The paper's image-level recognition rate (accuracy)."""
    patient_rate: float
    """The paper's patient-level recognition rate (mean of the patient scores)."""
    balanced_accuracy: float
    roc_auc: float
    seconds: float
    """Wall time of the side on this split: training, then prediction on the test patients."""
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

    @classmethod
    def from_metrics(cls, m: dict[str, float], *, seconds: float, **sides: Any) -> SideResult:
        """The rates and counts from breakhis.metrics.classification_metrics' ``m``; the
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


@dataclass(frozen=True)
class AccuracyBenchmarkResult:
    """What ``breakhis benchmark accuracy`` measured."""

    date: str
    device: str
    config: dict
    data: DataInfo
    splits: list[str]
    """``rep:K`` of every split run, in order."""
    sides: dict[str, list[SideResult]] = field(default_factory=dict)
    """Side name (``reference``, then each variant) -> one result per split, in order."""

    @property
    def variants(self) -> list[str]:
        return [name for name in self.sides if name != REFERENCE]

    def summary(self, side: str, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation over the splits of one figure of one side
        (std NaN for a single split)."""
        return _mean_std([getattr(r, key) for r in self.sides[side]])

    def differences(self, variant: str, key: str) -> list[float]:
        """``variant - reference`` of one rate, per split."""
        return [
            getattr(v, key) - getattr(r, key)
            for v, r in zip(self.sides[variant], self.sides[REFERENCE], strict=True)
        ]

    def target_met(self, variant: str) -> bool:
        """Whether the variant's mean is at least the reference's on both rates."""
        return all(self.summary(variant, k)[0] >= self.summary(REFERENCE, k)[0] for k in RATES)

    def format_table(self) -> str:
        """Markdown for the README."""
        c, d = self.config, self.data
        lines = [
            f"Accuracy benchmark, {self.date}, {self.device}; data: {d.source} ({d.kind}, "
            f"{d.images} images of {d.patients} patients); {c['arch']} from random weights at "
            f"{c['image_size']} px, {c['epochs']} epochs, batch {c['batch_size']}, AdamW lr "
            f"{c['lr']:g}; splits {', '.join(self.splits)}; mean +- sample std over the splits",
            "",
            "| split | side | test patients / images | train / val patients | images per epoch "
            "| kept epoch "
            "| threshold | image rate | patient rate | balanced acc. | ROC-AUC | seconds |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, split in enumerate(self.splits):
            for side, results in self.sides.items():
                r = results[i]
                lines.append(
                    f"| {split} | {side} | {r.test_patients} / {r.test_images} | "
                    f"{r.train_patients} / {r.val_patients} | {r.images_per_epoch} | "
                    f"{r.kept_epoch} | {r.threshold:.3f} | "
                    + " | ".join(_fmt(getattr(r, k), k) for k in _SHOWN)
                    + " |"
                    if not r.error
                    else f"| {split} | {side} | did not run: {r.error} |"
                )
        for side in self.sides:
            cells = " | ".join(_fmt_pm(*self.summary(side, k), k) for k in _SHOWN)
            lines.append(f"| mean +- std | {side} | | | | | | {cells} |")
        for variant in self.variants:
            lines += [
                "",
                f"| split | {variant} - reference: image rate | patient rate |",
                "|---|---:|---:|",
            ]
            per_rate = {k: self.differences(variant, k) for k in RATES}
            for i, split in enumerate(self.splits):
                lines.append(
                    f"| {split} | {_fmt_pm(per_rate['image_rate'][i], math.nan, 'diff')} "
                    f"| {_fmt_pm(per_rate['patient_rate'][i], math.nan, 'diff')} |"
                )
            means = " | ".join(_fmt_pm(*_mean_std(per_rate[k]), "diff") for k in RATES)
            lines.append(f"| mean +- std | {means} |")
        lines.append("")
        for variant in self.variants:
            figures = ", ".join(
                f"{k.replace('_', ' ')} {self.summary(variant, k)[0]:.3f} vs "
                f"{self.summary(REFERENCE, k)[0]:.3f}"
                for k in RATES
            )
            verdict = "met" if self.target_met(variant) else "missed"
            failed = [s for s, r in zip(self.splits, self.sides[variant], strict=True) if r.error]
            if failed:
                figures = f"it did not run on {', '.join(failed)}"
            lines.append(
                f"Target ({variant} mean >= reference mean on both rates): **{verdict}** "
                f"({figures})."
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Measurements and derived figures, for JSON (NaN written as null)."""
        out: dict[str, Any] = {
            "date": self.date,
            "device": self.device,
            "config": self.config,
            "data": asdict(self.data),
            "splits": [
                {"split": split, "sides": {s: asdict(r[i]) for s, r in self.sides.items()}}
                for i, split in enumerate(self.splits)
            ],
            "summary": {
                side: {
                    k: dict(zip(("mean", "std"), self.summary(side, k), strict=True))
                    for k in _SHOWN
                }
                for side in self.sides
            },  # fmt: skip
            "differences": {},
            "target": {},
        }
        for variant in self.variants:
            diffs = {k: self.differences(variant, k) for k in RATES}
            out["differences"][variant] = {
                "per_split": [
                    {"split": split, **{k: diffs[k][i] for k in RATES}}
                    for i, split in enumerate(self.splits)
                ],
                **{k: dict(zip(("mean", "std"), _mean_std(diffs[k]), strict=True)) for k in RATES},
            }
            out["target"][variant] = "met" if self.target_met(variant) else "missed"
        return _no_nan(out)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


def _fmt(value: float, key: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if key == "seconds" else f"{value:.3f}"


def _fmt_pm(mean: float, std: float, key: str) -> str:
    if math.isnan(mean):
        return "n/a"
    if key == "diff":
        return f"{mean:+.3f} +- {std:.3f}" if not math.isnan(std) else f"{mean:+.3f}"
    return _fmt(mean, key) + ("" if math.isnan(std) else f" +- {_fmt(std, key)}")


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
