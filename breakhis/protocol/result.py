"""What the protocol found: one ProtocolRun per trained and evaluated model, the
paper's mean ± std over splits (Summary), the cross-magnification matrix, and
ProtocolResult, which ``breakhis protocol`` returns and breakhis.protocol.report renders."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from breakhis import storage
from breakhis.evaluate.result import HEADLINE_METRICS


@dataclass(frozen=True)
class ProtocolRun:
    """What one run of the protocol produced."""

    name: str
    split: str
    magnification: int | None
    """The magnification the model was trained at (None: all)."""
    artifact_uri: str
    report_html: str | None
    metrics: dict[str, float]
    """Headline metrics: at the trained magnification, or all images."""
    per_magnification: dict[int, dict[str, float]]
    """Metrics on each magnification's test images."""
    test_patients: int
    test_images: int
    trained: bool
    """False when a finished artifact with the same options was reused."""
    started: float
    finished: float
    subtype: dict[str, Any] | None = None
    """A subtype model's eight-class metrics of its headline images
    (breakhis.evaluate.job.subtype_metrics); None for the binary task."""


@dataclass(frozen=True)
class Summary:
    """The paper's table: mean and std over splits, one column per (trained, evaluated)."""

    columns: tuple[str, ...]
    """``all@40`` .. ``all@400``, ``all@all`` (the magnification-independent model on each
    magnification and on all), ``40@40`` .. (a model per magnification on its own)."""
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    """Sample standard deviation (ddof 1) over splits; NaN with one split."""
    count: dict[str, int]
    """Splits per column."""


@dataclass(frozen=True)
class CrossMagnification:
    """Models trained at each magnification (rows) evaluated at each magnification (columns)."""

    trained: tuple[int | None, ...]
    evaluated: tuple[int, ...]
    mean: dict[str, list[list[float]]]
    """metric -> rows x columns, mean over splits (NaN where no run)."""
    std: dict[str, list[list[float]]]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.trained), len(self.evaluated)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    data = np.asarray([v for v in values if v is not None], dtype=float)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return float("nan"), float("nan")
    return float(data.mean()), float(data.std(ddof=1)) if data.size > 1 else float("nan")


def aggregate(
    runs: Sequence[ProtocolRun], magnifications: Sequence[int | None]
) -> tuple[Summary, CrossMagnification]:
    """The mean +- std table and the cross-magnification matrix of finished runs.

    Metrics averaged are HEADLINE_METRICS; a metric undefined in a split (NaN)
    is left out of that cell's mean. Returns (Summary, CrossMagnification).
    """
    cells: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        if run.magnification is None:
            for mag, values in run.per_magnification.items():
                cells.setdefault(f"all@{mag}", []).append(values)
            cells.setdefault("all@all", []).append(run.metrics)
        else:
            own = run.per_magnification.get(run.magnification)
            if own is not None:
                cells.setdefault(f"{run.magnification}@{run.magnification}", []).append(own)

    def order(column: str) -> tuple[int, ...]:
        # Per-magnification models first, by magnification; "all" after the numbers.
        return tuple(10**6 if part == "all" else int(part) for part in column.split("@"))

    columns = tuple(sorted(cells, key=order))
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for column in columns:
        mean[column], std[column] = {}, {}
        for metric in HEADLINE_METRICS:
            mean[column][metric], std[column][metric] = _mean_std(
                [values.get(metric, float("nan")) for values in cells[column]]
            )
    summary = Summary(
        columns=columns, mean=mean, std=std, count={c: len(cells[c]) for c in columns}
    )

    evaluated = tuple(sorted({m for run in runs for m in run.per_magnification}))
    trained = tuple(magnifications)
    matrix_mean: dict[str, list[list[float]]] = {}
    matrix_std: dict[str, list[list[float]]] = {}
    for metric in HEADLINE_METRICS:
        matrix_mean[metric], matrix_std[metric] = [], []
        for row in trained:
            means, stds = [], []
            for col in evaluated:
                values = [
                    run.per_magnification[col].get(metric, float("nan"))
                    for run in runs
                    if run.magnification == row and col in run.per_magnification
                ]
                m, s = _mean_std(values)
                means.append(m)
                stds.append(s)
            matrix_mean[metric].append(means)
            matrix_std[metric].append(stds)
    return summary, CrossMagnification(trained, evaluated, matrix_mean, matrix_std)


SUBTYPE_SUMMARY_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "patient_accuracy",
    "patient_balanced_accuracy",
)
"""The eight-class metrics the protocol averages over splits (image level, then patient)."""


def aggregate_subtypes(runs: Sequence[ProtocolRun]) -> dict[str, Any]:
    """The eight-subtype summary of subtype runs, per trained magnification (``all``, ``40``
    ..): mean and std over splits of SUBTYPE_SUMMARY_METRICS and of each class's recall,
    and the image- and patient-level confusion matrices summed over the runs (each run's
    counts are its own test patients'). Runs without subtype metrics are left out."""
    out: dict[str, Any] = {}
    for trained in sorted({r.magnification or 0 for r in runs if r.subtype is not None}):
        group = [r.subtype for r in runs if r.subtype and (r.magnification or 0) == trained]
        names = group[0]["class_names"]
        values = {
            "accuracy": [g["accuracy"] for g in group],
            "balanced_accuracy": [g["balanced_accuracy"] for g in group],
            "patient_accuracy": [g["patient"]["accuracy"] for g in group],
            "patient_balanced_accuracy": [g["patient"]["balanced_accuracy"] for g in group],
        }
        summary = {
            k: dict(zip(("mean", "std"), _mean_std(v), strict=True)) for k, v in values.items()
        }
        recall = {
            name: dict(
                zip(("mean", "std"), _mean_std([g["recall"][name] for g in group]), strict=True)
            )
            for name in names
        }
        out[str(trained or "all")] = {
            "class_names": names,
            "runs": len(group),
            "metrics": summary,
            "recall": recall,
            "confusion_matrix": np.sum([g["confusion_matrix"] for g in group], axis=0).tolist(),
            "patient_confusion_matrix": np.sum(
                [g["patient"]["confusion_matrix"] for g in group], axis=0
            ).tolist(),
            "patients_mixed_subtype": sorted(
                {p for g in group for p in g["patient"]["mixed_patients"]}
            ),
        }
    return out


@dataclass(frozen=True)
class ProtocolResult:
    """What ``breakhis protocol`` produced."""

    name: str
    data: str
    root: str
    scheme: str
    config_splits: tuple[str, ...]
    magnifications: tuple[int | None, ...]
    patients: int
    protocol_description: str
    train_config: dict[str, Any]
    runs: tuple[ProtocolRun, ...]
    summary: Summary
    cross_magnification: CrossMagnification
    concurrency: int
    seconds: float
    report_dir: str | None = None
    subtype: dict[str, Any] | None = None
    """With --task subtype: aggregate_subtypes of the runs; None for the binary task."""

    def to_json_dict(self) -> dict[str, Any]:
        """The content of the protocol's ``metrics.json``."""
        matrix = self.cross_magnification
        return {
            "name": self.name,
            "data": self.data,
            "root": self.root,
            "protocol": {
                "scheme": self.scheme,
                "description": self.protocol_description,
                "splits": list(self.config_splits),
                "patients_in_manifest": self.patients,
                "std": "sample standard deviation over splits (ddof 1)",
            },
            "magnifications": ["all" if m is None else m for m in self.magnifications],
            "train_config": self.train_config,
            "concurrency": self.concurrency,
            "summary": {
                column: {
                    "mean": self.summary.mean[column],
                    "std": self.summary.std[column],
                    "splits": self.summary.count[column],
                }
                for column in self.summary.columns
            },
            "cross_magnification": {
                "rows_trained_at": ["all" if m is None else m for m in matrix.trained],
                "columns_evaluated_at": list(matrix.evaluated),
                "mean": matrix.mean,
                "std": matrix.std,
            },
            "runs": [
                {
                    "name": run.name,
                    "split": run.split,
                    "trained_at": "all" if run.magnification is None else run.magnification,
                    "artifact": run.artifact_uri,
                    "report": run.report_html,
                    "test_patients": run.test_patients,
                    "test_images": run.test_images,
                    "metrics": {k: run.metrics.get(k) for k in HEADLINE_METRICS},
                    "per_magnification": {
                        str(m): {k: v.get(k) for k in HEADLINE_METRICS}
                        for m, v in run.per_magnification.items()
                    },
                    "trained": run.trained,
                    "seconds": run.finished - run.started,
                    **({"subtype": run.subtype} if run.subtype is not None else {}),
                }
                for run in self.runs
            ],
            **({"subtype": self.subtype} if self.subtype is not None else {}),
            "seconds": self.seconds,
        }

    def format_table(self) -> str:
        """The mean +- std table (percent) for the terminal."""
        columns = self.summary.columns
        lines = [
            f"protocol {self.name}: {len(self.runs)} run(s) over {len(self.config_splits)} "
            f"split(s) ({self.scheme}), {self.concurrency} at a time, {self.seconds:.0f} s",
            f"{'trained@evaluated':<26}" + "".join(f"{c:>14}" for c in columns),
        ]
        for metric in ("patient_recognition_rate", "image_recognition_rate", "balanced_accuracy"):
            cells = "".join(
                f"{_pct(self.summary.mean[c][metric]):>7}±{_pct(self.summary.std[c][metric]):<6}"
                for c in columns
            )
            lines.append(f"{metric:<26}{cells}")
        for trained, sub in (self.subtype or {}).items():
            metrics = sub["metrics"]
            lines.append(
                f"subtypes, {trained} model(s): balanced accuracy "
                f"{_pct(metrics['balanced_accuracy']['mean'])}±"
                f"{_pct(metrics['balanced_accuracy']['std'])} (images), "
                f"{_pct(metrics['patient_balanced_accuracy']['mean'])}±"
                f"{_pct(metrics['patient_balanced_accuracy']['std'])} (patients)"
            )
        if self.report_dir:
            lines.append(f"report: {storage.join(self.report_dir, 'report.html')}")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}"
