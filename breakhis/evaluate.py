"""Evaluation of one model on the held-out patients of a patient-disjoint split.

    breakhis evaluate --model s3://bucket/runs/rn50-fold0/model --data s3://bucket/prepared \\
        --fold 0 --out ./report-rn50-fold0
    ray job submit --working-dir . -- python jobs/evaluate.py --model ... (same options)

What happens, in reading order:

1. Patients. The split (``--fold K``, ``--split rep:K``, or by default the one
   the model was trained on) gives the test patients of DEST's manifest. The
   model's card names the manifest (by hash) and split it was trained on; the
   patients it saw (its training and validation patients) are read from that
   manifest, DEST's own or the one at the card's training data URI. Any test
   patient among them is leakage: the job stops with LeakageError before it
   predicts anything, and so it does when it cannot tell which patients the
   model saw.
2. Predictions. The test patients' tiles go through the scoring job's own
   pieces (breakhis.score): ``decode_tiles`` in CPU tasks and ``TilePredictor``
   in an actor pool, so evaluation decodes, normalises, averages test-time
   augmentations and computes Grad-CAM exactly as ``breakhis score`` does. A
   model trained at one magnification is also run on the test images of the
   other magnifications (the cross-magnification row), without attribution.
3. Metrics (breakhis.metrics): image- and patient-level recognition rates,
   accuracy, balanced accuracy, precision, recall, F1, ROC-AUC, overall (the
   model's magnification, or all for a magnification-independent model) and
   per magnification; the classification report and confusion matrix; and
   percentile intervals over patient resamples (breakhis.bootstrap).
4. Report (breakhis.report): plots, ``report.html`` and ``metrics.json`` in OUT.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from breakhis import storage
from breakhis.artifact import ModelCard
from breakhis.bootstrap import BootstrapResult, patient_bootstrap
from breakhis.calibration import PATIENT_RULES, brier_score, reliability
from breakhis.metrics import classification_metrics, majority_rate
from breakhis.names import CLASS_NAMES, MAGNIFICATIONS
from breakhis.predict import PredictOptions, decode_tiles, predict_dataset
from breakhis.raysession import ensure_ray
from breakhis.splits import (
    LeakageError,
    SplitPatients,
    SplitSpec,
    check_no_leakage,
    select_split,
)

log = logging.getLogger(__name__)

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
"""The metrics the report's tables show, in order (all from breakhis.metrics)."""
_BLOCK_ROWS = 64  # tiles per source block: decode tasks run in parallel over blocks


@dataclass(frozen=True)
class EvaluateOptions:
    """How to evaluate (shared by ``breakhis evaluate`` and ``breakhis protocol``)."""

    predict: PredictOptions = field(default_factory=PredictOptions)
    """How the model runs over the test tiles (breakhis.predict); its attribution is the map
    shown over the wrong predictions."""
    patient_rule: str = "mean"
    """How a patient's tiles become one call (patient_accuracy): ``mean`` (mean probability
    >= threshold) or ``majority`` (at least half of the tiles called malignant). The
    paper's patient recognition rate is reported whatever the rule."""
    cross_magnification: bool = True
    """Also run a model trained at one magnification on the other magnifications."""
    bootstrap: int = 1000
    """Patient resamples for the confidence intervals."""
    confidence: float = 0.95
    """Level of the bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap and of the choice of correct examples shown."""
    correct_examples: int = 16
    """Correct predictions shown in the report's grid (half per class when possible)."""
    thumbnail_size: int = 160
    """Side in pixels of the tiles shown in the report."""

    def __post_init__(self) -> None:
        if self.patient_rule not in PATIENT_RULES:
            raise ValueError(
                f"--patient-rule {self.patient_rule!r}; accepted: {', '.join(PATIENT_RULES)}"
            )
        if self.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.correct_examples < 0:
            raise ValueError(f"--correct-examples must be >= 0, got {self.correct_examples}")
        if not 16 <= self.thumbnail_size <= 1024:
            raise ValueError(f"--thumbnail-size must be in 16..1024, got {self.thumbnail_size}")

    @property
    def method(self) -> str | None:
        """The canonical attribution method, or None for ``none``."""
        return self.predict.method


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``breakhis evaluate``."""

    model: str
    """Model artifact directory (local or s3://), as written by the training job."""
    data: str
    """Prepared data root (``breakhis prepare`` DEST)."""
    out: str | None
    """Report folder (local or s3://); None computes the result without writing files."""
    split: str | None = None
    """``fold:K`` or ``rep:K`` of DEST's manifest; None: the split the model was trained on."""
    options: EvaluateOptions = field(default_factory=EvaluateOptions)
    """How to evaluate."""

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.split is not None:
            SplitSpec.parse(self.split)


@dataclass(frozen=True)
class SplitInfo:
    """Which patients were tested, and why none of them can have been seen in training."""

    split: str
    """The split of DEST's manifest, e.g. ``rep:0``."""
    description: str
    """The protocol in words (scheme, seed, test share)."""
    manifest_hash: str
    """Hash of DEST's manifest (breakhis.prepare.manifest_hash)."""
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
class EvaluationResult:
    """Everything ``breakhis evaluate`` computed; breakhis.report turns it into files."""

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
        if self.report_dir:
            lines.append(f"report: {storage.join(self.report_dir, 'report.html')}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- pure pieces


def score_predictions(
    labels: np.ndarray | pd.Series,
    probs: np.ndarray | pd.Series,
    patient_ids: np.ndarray | pd.Series,
    threshold: float = 0.5,
    patient_rule: str = "mean",
) -> dict[str, float]:
    """breakhis.metrics.classification_metrics, plus ``image_recognition_rate`` (the
    paper's name for accuracy). Raises what classification_metrics raises."""
    out = classification_metrics(
        np.asarray(labels), np.asarray(probs), np.asarray(patient_ids), threshold, patient_rule
    )
    out["image_recognition_rate"] = out["accuracy"]
    return out


def calibration_summary(
    labels: np.ndarray | pd.Series,
    probs: np.ndarray | pd.Series,
    uncalibrated: np.ndarray | pd.Series,
    card: ModelCard,
    threshold: float,
    bins: int = 10,
) -> dict[str, Any]:
    """How well the probabilities match observed frequencies, before (temperature 1) and
    after the model's temperature: Brier score, expected calibration error over ``bins``
    equal-width bins, and the bins. Also says which temperature and threshold were used
    and where the threshold came from. Raises ValueError for inconsistent inputs."""
    y = np.asarray(labels, dtype=np.int64)

    def measures(p: np.ndarray) -> dict[str, Any]:
        rel = reliability(p, y, bins)
        return {"brier": brier_score(p, y), "ece": rel.ece, "reliability": asdict(rel)}

    given = threshold != card.threshold or not card.threshold_rule
    return {
        "temperature": float(card.temperature),
        "threshold": float(threshold),
        "threshold_source": "given (--threshold)"
        if given
        else f"the model's, chosen by {card.threshold_rule} on its validation patients",
        "before": measures(np.asarray(uncalibrated, dtype=np.float64)),
        "after": measures(np.asarray(probs, dtype=np.float64)),
    }


def per_magnification_metrics(
    predictions: pd.DataFrame, threshold: float = 0.5, patient_rule: str = "mean"
) -> dict[int, dict[str, float]]:
    """score_predictions() of the rows of each magnification (columns magnification,
    label, prob_malignant, patient_id). Returns {magnification: metrics}, sorted."""
    out = {}
    for mag, rows in sorted(predictions.groupby("magnification"), key=lambda kv: kv[0]):
        out[int(mag)] = score_predictions(
            rows["label"], rows["prob_malignant"], rows["patient_id"], threshold, patient_rule
        )
    return out


def classification_report(
    labels: np.ndarray | pd.Series, predicted: np.ndarray | pd.Series
) -> tuple[dict[str, Any], str]:
    """sklearn's classification report (benign, malignant): as a dict and as text."""
    from sklearn.metrics import classification_report as report

    kwargs = dict(labels=[0, 1], target_names=list(CLASS_NAMES), zero_division=0)
    y, yhat = np.asarray(labels), np.asarray(predicted)
    return report(y, yhat, output_dict=True, **kwargs), report(y, yhat, digits=4, **kwargs)


def _split_params(manifest: pa.Table) -> dict[str, Any]:
    raw = (manifest.schema.metadata or {}).get(b"breakhis.split")
    return json.loads(raw) if raw else {}


def describe_scheme(manifest: pa.Table, scheme: str) -> str:
    """A split scheme of a manifest in words, from the parameters prepare stored."""
    params = _split_params(manifest)
    seed = params.get("seed", "?")
    if scheme == "rep":
        share = float(params.get("test_fraction", 0.3))
        return (
            f"{params.get('repetitions', '?')} random splits of the patients, "
            f"{1 - share:.0%} train / {share:.0%} test, stratified by class (seed {seed}); "
            "no patient on both sides of a split (the protocol of Spanhol et al. 2016)"
        )
    return (
        f"{params.get('folds', '?')}-fold cross-validation grouped by patient, stratified by "
        f"class (seed {seed}); no patient on both sides of a split"
    )


def describe_split(manifest: pa.Table, spec: SplitSpec) -> str:
    """One split of a manifest in words, e.g. "repetition 0 of 5 random splits ..."."""
    what = "repetition" if spec.scheme == "rep" else "fold"
    return f"{what} {spec.index} of {describe_scheme(manifest, spec.scheme)}"


def _counts(rows: pa.Table) -> dict[str, dict[str, float]]:
    labels = rows.column("label").to_pylist()
    return {
        "class": {c: float(labels.count(i)) for i, c in enumerate(CLASS_NAMES)},
        "subtype": {
            k: float(v) for k, v in sorted(Counter(rows.column("subtype").to_pylist()).items())
        },
        "magnification": {
            str(m): float(rows.column("magnification").to_pylist().count(m)) for m in MAGNIFICATIONS
        },
    }


def data_distribution(
    manifest: pa.Table,
    sides: dict[str, frozenset[str]],
    *,
    magnification: int | None,
    oversample: bool = False,
    class_weighted: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """Images per class, subtype and magnification of each named side (patients).

    Only images of ``magnification`` count (all when None). When ``sides`` has
    ``train``, ``train_balanced`` follows it: the training images as the loss
    weighs them, with the training job's own balancing (breakhis.ingest): each
    image counts its class's oversampling copies times its class weight
    n / (2 n_c), so with class weights both classes weigh n / 2. Returns
    {side: {"class"|"subtype"|"magnification": {value: images}}}.
    """
    from breakhis.ingest import class_weights, oversample_factor

    if magnification is not None:
        manifest = manifest.filter(pc.equal(manifest.column("magnification"), magnification))

    def rows_of(patients: frozenset[str]) -> pa.Table:
        return manifest.filter(pc.is_in(manifest.column("patient_id"), pa.array(sorted(patients))))

    out = {side: _counts(rows_of(patients)) for side, patients in sides.items()}
    if "train" not in sides:
        return out
    train = rows_of(sides["train"])
    counts = (int(out["train"]["class"]["benign"]), int(out["train"]["class"]["malignant"]))
    copies = oversample_factor(counts) if oversample else (1, 1)
    seen = (counts[0] * copies[0], counts[1] * copies[1])
    weights = class_weights(seen) if class_weighted else (1.0, 1.0)
    per_image = [copies[c] * weights[c] for c in (0, 1)]
    balanced: dict[str, dict[str, float]] = {
        "class": {name: counts[c] * per_image[c] for c, name in enumerate(CLASS_NAMES)},
        "subtype": {},
        "magnification": {str(m): 0.0 for m in MAGNIFICATIONS},
    }
    for label, subtype, mag in zip(
        train.column("label").to_pylist(),
        train.column("subtype").to_pylist(),
        train.column("magnification").to_pylist(),
        strict=True,
    ):
        balanced["subtype"][subtype] = balanced["subtype"].get(subtype, 0.0) + per_image[label]
        balanced["magnification"][str(mag)] += per_image[label]
    balanced["subtype"] = dict(sorted(balanced["subtype"].items()))
    return {"train": out.pop("train"), "train_balanced": balanced, **out}


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class ModelPatients:
    """The patients a model saw, read from the manifest it was trained on."""

    seen: frozenset[str]
    split: SplitPatients  # train/val/test of the model's split in that manifest
    source: str  # the data root of that manifest


def model_patients(card: ModelCard, manifest: pa.Table, data: str) -> ModelPatients:
    """The patients whose images the model saw (its split's training and validation side).

    Reads them from ``manifest`` (DEST's) when the card's manifest hash is
    its hash, else from the manifest at the card's training data URI. Raises
    LeakageError when the card records no split or manifest, or when neither
    manifest is the one the model was trained on (which patients it saw cannot
    be known, so no test set can be shown to be unseen).
    """
    from breakhis.prepare import manifest_hash, read_manifest

    if not card.split or not card.manifest_hash:
        raise LeakageError(
            f"the model card records no training split/manifest hash (split {card.split!r}, "
            f"manifest_hash {card.manifest_hash!r}); evaluation cannot tell which patients the "
            "model saw. Evaluate only models written by `breakhis train`"
        )
    source, source_manifest = data, manifest
    if manifest_hash(manifest) != card.manifest_hash:
        trained_on = str(card.config.get("data") or "")
        candidate = None
        if trained_on and trained_on.rstrip("/") != data.rstrip("/"):
            try:
                candidate = read_manifest(trained_on)
            except (FileNotFoundError, OSError) as err:
                log.warning("cannot read the model's training manifest: %s", err)
        if candidate is None or manifest_hash(candidate) != card.manifest_hash:
            changed = candidate is not None or trained_on.rstrip("/") == data.rstrip("/")
            raise LeakageError(
                f"the model was trained on manifest {card.manifest_hash} (data "
                f"{trained_on or 'unknown'}), not on {data}'s manifest "
                f"{manifest_hash(manifest)}, and that manifest "
                f"{'has changed since' if changed else 'cannot be read'}; evaluation cannot "
                "prove the test patients are unseen. Evaluate on the data the model was "
                "trained on, as prepared then"
            )
        source, source_manifest = trained_on, candidate
    spec = SplitSpec.parse(
        card.split,
        val_fraction=float(card.config.get("val_fraction", 0.0) or 0.0),
        seed=int(card.config.get("seed", 0) or 0),
    )
    sides = select_split(source_manifest, spec)
    seen = frozenset(source_manifest.column("patient_id").to_pylist()) - sides.test
    return ModelPatients(seen=seen, split=sides, source=source)


# --------------------------------------------------------------------------- predictions


def predict_tiles(
    tiles: pa.Table,
    model_uri: str,
    image_size: int,
    options: PredictOptions,
) -> pd.DataFrame:
    """Run breakhis.predict's pipeline over ``tiles`` (breakhis.inputs.INPUT_SCHEMA rows)
    on the current Ray cluster, at ``options.predict.threshold`` (the one applied: not None).

    Returns one row per tile: uri, prob_malignant (after the model's temperature),
    prob_uncalibrated (at temperature 1), and ``map`` (a (map_size,
    map_size) float32 array scaled to [-1, 1], or None without an attribution).
    Raises RuntimeError naming the tiles that failed to read or decode (a
    prepared DEST holds only decodable tiles, so a failure means DEST changed).
    """
    if tiles.num_rows == 0:
        return pd.DataFrame({"uri": [], "prob_malignant": [], "prob_uncalibrated": [], "map": []})
    if options.threshold is None:
        raise ValueError("predict_tiles needs the threshold applied (the model's or the user's)")
    source = tiles.select(["uri", "tile_id", "shard"])
    source = source.append_column("unit", pa.array(np.zeros(tiles.num_rows, np.int32)))
    blocks = [source.slice(i, _BLOCK_ROWS) for i in range(0, source.num_rows, _BLOCK_ROWS)]
    ds = predict_dataset(
        blocks,
        model_uri=model_uri,
        image_size=image_size,
        threshold=options.threshold,
        options=options,
    )
    uris: list[str] = []
    probs: list[np.ndarray] = []
    raw: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    failed: list[str] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        errors = np.asarray(batch["error"], dtype=object)
        failed += [f"{u} ({e})" for u, e in zip(batch["uri"], errors, strict=True) if e]
        uris += [str(u) for u in batch["uri"]]
        probs.append(np.asarray(batch["prob"], dtype=np.float64))
        raw.append(np.asarray(batch["prob_uncalibrated"], dtype=np.float64))
        maps.append(np.asarray(batch["map"], dtype=np.float16))
    if failed:
        raise RuntimeError(
            f"{len(failed)} test tile(s) could not be read or decoded, e.g. {failed[:3]}; "
            "re-run `breakhis prepare` for this DEST"
        )
    all_maps = np.concatenate(maps) if maps else np.zeros((0, options.map_size, options.map_size))
    frame = pd.DataFrame(
        {
            "uri": uris,
            "prob_malignant": np.concatenate(probs),
            "prob_uncalibrated": np.concatenate(raw),
        }
    )
    frame["map"] = list(all_maps) if options.method else [None] * len(frame)
    if len(frame) != tiles.num_rows or frame["uri"].nunique() != tiles.num_rows:
        raise RuntimeError(f"{len(frame)} predictions came back for {tiles.num_rows} tiles")
    return frame


def _examples(rows: pd.DataFrame, tiles: pa.Table, options: EvaluateOptions) -> tuple[Example, ...]:
    """Decode the tiles of ``rows`` at thumbnail size and draw their attribution maps."""
    from breakhis.attribution import overlay_png

    if rows.empty:
        return ()
    shard_of = dict(
        zip(tiles.column("uri").to_pylist(), tiles.column("shard").to_pylist(), strict=True)
    )
    out = []
    for start in range(0, len(rows), 64):
        part = rows.iloc[start : start + 64]
        decoded = decode_tiles(
            {
                "uri": part["uri"].to_numpy(dtype=object),
                "tile_id": part["tile_id"].to_numpy(dtype=object),
                "unit": np.zeros(len(part), np.int32),
                "shard": np.asarray([shard_of[u] for u in part["uri"]], dtype=object),
            },
            image_size=options.thumbnail_size,
        )
        for (_, row), image, error in zip(
            part.iterrows(), decoded["image"], decoded["error"], strict=True
        ):
            if error:
                raise RuntimeError(f"{row['uri']}: cannot decode it for the report ({error})")
            amap = row["map"]
            out.append(
                Example(
                    tile_id=str(row["tile_id"]),
                    patient_id=str(row["patient_id"]),
                    magnification=int(row["magnification"]),
                    subtype=str(row["subtype"]),
                    label=int(row["label"]),
                    prob_malignant=float(row["prob_malignant"]),
                    predicted_label=int(row["predicted_label"]),
                    image_png=_png(image),
                    overlay_png=None
                    if amap is None
                    else overlay_png(image, np.asarray(amap, np.float32)),
                )
            )
    return tuple(out)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, "PNG")
    return buffer.getvalue()


def choose_examples(
    headline: pd.DataFrame, count: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(correct, wrong)`` rows to show: up to ``count`` correct predictions, half of
    each true class when possible, drawn with ``seed``; and every wrong prediction,
    the most confident mistakes first."""
    rng = np.random.default_rng(seed)
    right = headline[headline["correct"]]
    picked = []
    per_class = {c: right[right["label"] == c] for c in (0, 1)}
    quota = {0: count // 2, 1: count - count // 2}
    # A class short of its quota gives the rest to the other.
    for c in (0, 1):
        short = quota[c] - len(per_class[c])
        if short > 0:
            quota[c] -= short
            quota[1 - c] += short
    for c in (0, 1):
        rows = per_class[c]
        take = min(quota[c], len(rows))
        if take:
            picked.append(rows.iloc[np.sort(rng.choice(len(rows), take, replace=False))])
    correct = pd.concat(picked) if picked else right.iloc[:0]
    wrong = headline[~headline["correct"]].copy()
    wrong["confidence"] = np.abs(wrong["prob_malignant"] - 0.5)
    wrong = wrong.sort_values(["confidence", "tile_id"], ascending=[False, True])
    return correct, wrong.drop(columns="confidence")


def _history_png(model_uri: str) -> bytes | None:
    """The training job's curves.png beside the artifact (RUN/model -> RUN/curves.png)."""
    from breakhis.train_config import CURVES_PNG

    run_uri = model_uri.rstrip("/").rsplit("/", 1)[0]
    uri = storage.join(run_uri, CURVES_PNG)
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, OSError):
        log.info("no training curves at %s; the report shows no training history", uri)
        return None


# --------------------------------------------------------------------------- the job


def run_evaluation(config: EvaluateConfig) -> EvaluationResult:
    """Evaluate the model on the test patients of the split, on the current Ray cluster
    (started locally if none), and write the report when ``config.out`` is set.

    Returns the EvaluationResult. Raises FileNotFoundError for a missing model
    or data, ValueError for a bad split or an input that is not a prepared
    DEST, a damaged model or an ``out`` that is a file, LeakageError (before any
    prediction) when a test patient is one the model saw or that cannot be ruled out,
    and RuntimeError when tiles fail to decode. Everything but the decoding is checked
    before Ray starts.
    """

    from breakhis.artifact import load_artifact
    from breakhis.inputs import discover_inputs
    from breakhis.prepare import manifest_hash, read_manifest

    started = time.perf_counter()
    if config.out and storage.is_file(config.out):
        raise ValueError(f"--out {config.out} is a file; give a folder for the report")
    # Loaded once here so that a damaged artifact fails in one line, not in every actor.
    _, card = load_artifact(config.model)
    # The threshold as applied: the model's own (chosen on its validation patients) unless
    # one was given.
    options = config.options
    if options.predict.threshold is None:
        options = replace(options, predict=replace(options.predict, threshold=card.threshold))
    manifest = read_manifest(config.data)
    known = model_patients(card, manifest, config.data)
    spec = SplitSpec.parse(config.split or card.split)
    patients = select_split(manifest, spec)  # raises LeakageError for a leaking manifest
    try:
        check_no_leakage(model_training=known.seen, evaluation_test=patients.test)
    except LeakageError as err:
        raise LeakageError(
            f"refusing to evaluate {config.model} (trained on {card.split} of manifest "
            f"{card.manifest_hash}) on {spec} of {config.data}: {err}"
        ) from err
    info = SplitInfo(
        split=str(spec),
        description=describe_split(manifest, spec),
        manifest_hash=manifest_hash(manifest),
        model_split=card.split,
        model_manifest_hash=card.manifest_hash,
        patients=len(set(manifest.column("patient_id").to_pylist())),
        seen_patients=len(known.seen),
        train_patients=len(known.split.train),
        val_patients=len(known.split.val),
        test_patients=len(patients.test),
        leakage_check=(
            f"passed: none of the {len(patients.test)} test patients is among the "
            f"{len(known.seen)} patients the model was trained or validated on "
            f"({card.split} of manifest {card.manifest_hash})"
        ),
    )
    log.info("%s: %s", spec, info.leakage_check)

    inputs = discover_inputs(config.data)
    if inputs.kind != "prepared":
        raise ValueError(f"--data {config.data}: not a prepared DEST (manifest.parquet + shards/)")
    tiles = inputs.table.filter(
        pc.is_in(inputs.table.column("patient_id"), pa.array(sorted(patients.test)))
    )
    trained_at = card.magnification
    if trained_at and not options.cross_magnification:
        tiles = tiles.filter(pc.equal(tiles.column("magnification"), trained_at))
    at_trained = (
        tiles
        if not trained_at
        else tiles.filter(pc.equal(tiles.column("magnification"), trained_at))
    )
    if at_trained.num_rows == 0:
        raise ValueError(
            f"split {spec} of {config.data}: the test patients have no image"
            + (f" at {trained_at}X" if trained_at else "")
        )
    ensure_ray()
    log.info(
        "predicting %d test tiles of %d patients (%d at the model's magnification)",
        tiles.num_rows,
        len(patients.test),
        at_trained.num_rows,
    )
    # One pipeline for every magnification: a second one (without attribution for the
    # cross-magnification tiles) would pay the actors' start-up again for little gain.
    scored = predict_tiles(tiles, config.model, card.image_size, options.predict)
    facts = tiles.select(
        ["uri", "tile_id", "patient_id", "magnification", "subtype", "label"]
    ).to_pandas()
    frame = facts.merge(scored, on="uri", how="inner", validate="one_to_one")
    frame["label"] = frame["label"].astype(np.int64)
    frame["magnification"] = frame["magnification"].astype(np.int64)
    frame["predicted_label"] = (frame["prob_malignant"] >= options.predict.threshold).astype(
        np.int64
    )
    frame["correct"] = frame["predicted_label"] == frame["label"]
    frame["headline"] = (frame["magnification"] == trained_at) if trained_at else True
    frame = frame.sort_values("tile_id", ignore_index=True)

    headline = frame[frame["headline"]]
    metrics = score_predictions(
        headline["label"],
        headline["prob_malignant"],
        headline["patient_id"],
        options.predict.threshold,
        options.patient_rule,
    )
    report_dict, report_text = classification_report(headline["label"], headline["predicted_label"])
    ci = patient_bootstrap(
        headline["label"].to_numpy(),
        headline["prob_malignant"].to_numpy(),
        headline["patient_id"].to_numpy(),
        replicates=options.bootstrap,
        confidence=options.confidence,
        seed=options.seed,
        threshold=options.predict.threshold,
        patient_rule=options.patient_rule,
    )
    sides = {"test": patients.test}
    if known.source == config.data:
        sides = {"train": known.split.train, "validation": known.split.val, **sides}
    correct_rows, wrong_rows = choose_examples(headline, options.correct_examples, options.seed)
    result = EvaluationResult(
        model_uri=config.model,
        card=card,
        data=config.data,
        split=info,
        options=options,
        predictions=frame.drop(columns=["map"]),
        metrics=metrics,
        per_magnification=per_magnification_metrics(
            frame, options.predict.threshold, options.patient_rule
        ),
        calibration=calibration_summary(
            headline["label"],
            headline["prob_malignant"],
            headline["prob_uncalibrated"],
            card,
            options.predict.threshold,
        ),
        classification_report=report_dict,
        classification_report_text=report_text,
        bootstrap=ci,
        distribution=data_distribution(
            manifest,
            sides,
            magnification=trained_at,
            oversample=bool(card.config.get("oversample")),
            class_weighted=bool(card.config.get("class_weighted")),
        ),
        history_png=_history_png(config.model),
        correct=_examples(correct_rows, tiles, options),
        wrong=_examples(wrong_rows, tiles, options),
    )
    result = replace(result, seconds=time.perf_counter() - started)
    if config.out:
        from breakhis.report import write_report

        write_report(result, config.out)
        result = replace(result, report_dir=config.out)
    return result
