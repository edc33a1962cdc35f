"""What an evaluation found (EvaluationResult and its parts), apart from the job that
computes it (breakhis.evaluate.job) and the report that renders it (breakhis.evaluate.report), so
that both import it and neither imports the other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from breakhis import storage
from breakhis.evaluate.config import EvaluateOptions
from breakhis.names import CLASS_NAMES
from breakhis.stats.bootstrap import BootstrapResult
from breakhis.stats.metrics import majority_rate

if TYPE_CHECKING:  # torch: the protocol command checks its input before importing it
    from breakhis.model.artifact import ModelCard

HEADLINE_METRICS: tuple[str, ...] = (
    "image_recognition_rate",
    "patient_recognition_rate",
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
)
"""The metrics the report's tables show, in order (all from breakhis.stats.metrics)."""


@dataclass(frozen=True)
class SplitInfo:
    """Which patients were tested, and why none of them can have been seen in training."""

    split: str
    """The split of DEST's manifest, e.g. ``rep:0``."""
    description: str
    """The protocol in words (scheme, seed, test share)."""
    manifest_hash: str
    """Hash of DEST's manifest (breakhis.data.prepare.manifest_hash)."""
    model_split: str
    """The split the model was trained on."""
    model_manifest_hash: str
    """Hash of the manifest the model was trained on."""
    patients: int
    """Patients in DEST's manifest."""
    seen_patients: int
    """Patients whose images the model saw (training and validation)."""
    train_patients: int
    """Patients of the model's training side."""
    val_patients: int
    """Patients the model was validated on."""
    test_patients: int
    """Patients evaluated here."""
    leakage_check: str
    """What the leakage check compared, in words."""


@dataclass(frozen=True)
class Example:
    """One test tile shown in the report."""

    tile_id: str
    patient_id: str
    magnification: int
    subtype: str
    label: int
    prob_malignant: float
    predicted_label: int
    image_png: bytes = field(repr=False)
    """The tile as the model saw it (squared), ``thumbnail_size`` pixels a side."""
    overlay_png: bytes | None = field(repr=False)
    """The tile with the attribution map of the predicted class, or None without one."""

    @property
    def correct(self) -> bool:
        return self.label == self.predicted_label


@dataclass(frozen=True)
class PatientPanel:
    """One test patient in the report: its call, its true label and some of its tiles."""

    patient_id: str
    label: int | None
    """The true label (0 benign, 1 malignant) when the patient's names agree, else None."""
    call: int
    """The patient-level call (1 malignant) by the evaluation's patient rule."""
    mean_prob: float
    tiles: int
    """The patient's headline tiles (``examples`` shows some of them)."""
    examples: tuple[Example, ...] = field(repr=False)
    """Tiles spread over the patient's, sorted by probability, most malignant first."""


@dataclass(frozen=True)
class EvaluationResult:
    """Everything ``breakhis evaluate`` computed; breakhis.evaluate.report turns it into files."""

    model_uri: str
    card: ModelCard = field(repr=False)
    data: str
    split: SplitInfo
    options: EvaluateOptions
    predictions: pd.DataFrame = field(repr=False)
    """One row per scored test tile: tile_id, patient_id, magnification, subtype, label,
    prob_malignant, predicted_label, correct, headline (counted in ``metrics``)."""
    metrics: dict[str, float]
    """Metrics of the headline images: the model's magnification, or all."""
    per_magnification: dict[int, dict[str, float]]
    """Metrics of the test images of each magnification (the cross-magnification row)."""
    classification_report: dict[str, Any]
    """sklearn's classification report of the headline images (output_dict)."""
    classification_report_text: str
    bootstrap: BootstrapResult
    distribution: dict[str, dict[str, dict[str, float]]]
    """side -> (class | subtype | magnification) -> value -> images (see data_distribution)."""
    history_png: bytes | None = field(repr=False)
    """The training curves written by the training job, when found beside the artifact."""
    correct: tuple[Example, ...] = field(repr=False)
    wrong: tuple[Example, ...] = field(repr=False)
    calibration: dict[str, Any] = field(default_factory=dict)
    """Temperature, threshold (and where it came from), and the Brier score, expected
    calibration error and reliability bins of the headline images before (temperature 1)
    and after the model's temperature (see calibration_summary)."""
    subtype: dict[str, Any] | None = None
    """A subtype model's eight-class metrics of the headline images
    (breakhis.evaluate.job.subtype_metrics: confusion matrices, per-class recall, balanced
    accuracy, at image and patient level); None for the binary task."""
    map_scale: float | None = None
    """The one scale of every map in the report (raw attribution at the colour bar's
    ends; breakhis.evaluate.job.report_map_scale); None without maps."""
    patients: tuple[PatientPanel, ...] = field(default=(), repr=False)
    """One panel per test patient (headline tiles)."""
    seconds: float = 0.0
    report_dir: str | None = None
    """Where the report was written (None when not written)."""

    @property
    def evaluated_at(self) -> str:
        """The headline images, in words: ``40X`` or ``all magnifications``."""
        mag = self.card.magnification
        return f"{mag}X" if mag else "all magnifications"

    def to_json_dict(self) -> dict[str, Any]:
        """The content of ``metrics.json`` (NaN written as null by the caller)."""
        # Over 60 lines: one dict literal, the file's schema read top to bottom.
        card = self.card
        headline = self.predictions[self.predictions["headline"]]
        return {
            "model": {
                "uri": self.model_uri,
                "model_id": card.model_id,
                "architecture": card.architecture,
                "image_size": card.image_size,
                "trained_magnification": card.magnification,
                "split": card.split,
                "manifest_hash": card.manifest_hash,
                "epoch": card.epoch,
                "created_at": card.created_at,
            },
            "data": self.data,
            "protocol": {
                "split": self.split.split,
                "description": self.split.description,
                "manifest_hash": self.split.manifest_hash,
                "patients_in_manifest": self.split.patients,
                "model_training_patients": self.split.train_patients,
                "model_validation_patients": self.split.val_patients,
                "test_patients": self.split.test_patients,
                "leakage_check": self.split.leakage_check,
                "unit_of_independence": "patient",
            },
            "options": asdict(self.options),
            "evaluated_at": self.evaluated_at,
            "test_images": int(len(headline)),
            "test_patients": int(headline["patient_id"].nunique()),
            "majority_rate": majority_rate(headline["label"]) if len(headline) else None,
            "metrics": dict(self.metrics),
            "per_magnification": {str(m): dict(v) for m, v in self.per_magnification.items()},
            "cross_magnification": {
                "trained_at": card.magnification or "all",
                "evaluated_at": {
                    str(m): {k: v[k] for k in HEADLINE_METRICS}
                    for m, v in self.per_magnification.items()
                },
            },
            "confusion_matrix": {
                "labels": list(CLASS_NAMES),
                "rows": "true class",
                "columns": "predicted class",
                "matrix": [
                    [int(self.metrics["tn"]), int(self.metrics["fp"])],
                    [int(self.metrics["fn"]), int(self.metrics["tp"])],
                ],
            },
            "classification_report": self.classification_report,
            "bootstrap": self.bootstrap.to_dict(),
            "calibration": self.calibration,
            "distribution": self.distribution,
            "wrong_predictions": [
                {
                    "tile_id": e.tile_id,
                    "patient_id": e.patient_id,
                    "magnification": e.magnification,
                    "subtype": e.subtype,
                    "label": CLASS_NAMES[e.label],
                    "predicted": CLASS_NAMES[e.predicted_label],
                    "prob_malignant": e.prob_malignant,
                }
                for e in self.wrong
            ],
            "task": "subtype" if self.subtype is not None else "binary",
            **({"subtype": self.subtype} if self.subtype is not None else {}),
            "seconds": self.seconds,
        }

    def format_table(self) -> str:
        """A plain-text summary for the terminal."""
        ci = self.bootstrap.intervals
        mag = self.card.magnification
        lines = [
            f"model {self.card.model_id} ({self.card.architecture}, trained on {self.card.split}, "
            f"{f'{mag}X only' if mag else 'all magnifications'})",
            f"split {self.split.split}: {self.split.description}",
            f"leakage check {self.split.leakage_check}",
            f"{'metric':<26}{self.evaluated_at:>18}   {self.bootstrap.confidence:.0%} CI "
            f"({self.bootstrap.replicates} patient resamples)",
        ]
        for name in HEADLINE_METRICS:
            key = "accuracy" if name == "image_recognition_rate" else name
            low, high = ci.get(key, (float("nan"), float("nan")))
            lines.append(f"{name:<26}{self.metrics[name]:>18.4f}   [{low:.4f}, {high:.4f}]")
        if len(self.per_magnification) > 1 or self.card.magnification:
            lines.append(
                "per magnification (patient rate / image rate): "
                + ", ".join(
                    f"{m}X {v['patient_recognition_rate']:.3f}/{v['image_recognition_rate']:.3f}"
                    for m, v in sorted(self.per_magnification.items())
                )
            )
        if self.calibration:
            cal = self.calibration
            lines.append(
                f"threshold {cal['threshold']:.3f} ({cal['threshold_source']}); temperature "
                f"{cal['temperature']:.3f}: expected calibration error {cal['before']['ece']:.3f} "
                f"-> {cal['after']['ece']:.3f}, Brier {cal['before']['brier']:.3f} -> "
                f"{cal['after']['brier']:.3f}; patient call by {self.options.patient_rule}"
            )
        if self.subtype is not None:
            sub, patient = self.subtype, self.subtype["patient"]
            lines.append(
                f"subtypes (8 classes, argmax): accuracy {sub['accuracy']:.4f}, balanced "
                f"accuracy {sub['balanced_accuracy']:.4f}; per patient {patient['accuracy']:.4f}"
                f" / {patient['balanced_accuracy']:.4f} over {patient['patients']} patients "
                f"({patient['patients_mixed_subtype']} with two subtypes left out)"
            )
        if self.report_dir:
            lines.append(f"report: {storage.join(self.report_dir, 'report.html')}")
        return "\n".join(lines)
