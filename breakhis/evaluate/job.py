"""Evaluation of one model on the held-out patients of a patient-disjoint split.

    breakhis evaluate --model s3://bucket/runs/rn50-fold0/model --data s3://bucket/prepared \\
        --fold 0 --out ./report-rn50-fold0
    ray job submit --working-dir . -- python jobs/evaluate.py --model ... (same options)

What happens, in reading order:

1. Patients. The split (``--fold K``, ``--split rep:K``, ``--split column:NAME``,
   or by default the one the model was trained on) gives the test patients of DEST's manifest. The
   model's card names the manifest (by hash) and split it was trained on; the
   patients it saw (its training and validation patients) are read from that
   manifest, DEST's own or the one at the card's training data URI. Any test
   patient among them is leakage: the job stops with LeakageError before it
   predicts anything, and so it does when it cannot tell which patients the
   model saw.
2. Predictions. The test patients' tiles go through the one inference engine
   (breakhis.score.predict): ``decode_tiles`` in CPU tasks and ``TilePredictor``
   in an actor pool, so evaluation decodes, normalises, averages test-time
   augmentations and computes Grad-CAM exactly as ``breakhis score`` does. A
   model trained at one magnification is also run on the test images of the
   other magnifications (the cross-magnification row), without attribution.
3. Metrics (breakhis.stats.metrics): image- and patient-level recognition rates,
   accuracy, balanced accuracy, precision, recall, F1, ROC-AUC, overall (the
   model's magnification, or all for a magnification-independent model) and
   per magnification; the classification report and confusion matrix; and
   percentile intervals over patient resamples (breakhis.stats.bootstrap).
4. Report (breakhis.evaluate.report): plots, ``report.html`` and ``metrics.json`` in OUT.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.data.geometry import TileGeometry
from breakhis.data.splits import LeakageError, SplitSpec, check_no_leakage
from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
from breakhis.evaluate.data import (
    ModelPatients,
    data_distribution,
    describe_split,
    model_patients,
)
from breakhis.evaluate.result import EvaluationResult, Example, PatientPanel, SplitInfo
from breakhis.model.artifact import ModelCard
from breakhis.names import CLASS_NAMES
from breakhis.raysession import ensure_ray
from breakhis.score.predict import PredictOptions, decode_tiles, predict_dataset
from breakhis.stats.bootstrap import patient_bootstrap
from breakhis.stats.calibration import brier_score, reliability
from breakhis.stats.metrics import classification_metrics

log = logging.getLogger(__name__)

_BLOCK_ROWS = 64  # tiles per source block: decode tasks run in parallel over blocks


# --------------------------------------------------------------------------- pure pieces


def score_predictions(
    labels: np.ndarray | pd.Series,
    probs: np.ndarray | pd.Series,
    patient_ids: np.ndarray | pd.Series,
    threshold: float = 0.5,
    patient_rule: str = "mean",
) -> dict[str, float]:
    """breakhis.stats.metrics.classification_metrics, plus ``image_recognition_rate`` (the
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

    if threshold != card.threshold:
        source = "given (--threshold)"
    elif not card.threshold_rule:
        source = "the model's decision rule: argmax (threshold and temperature not fitted)"
    else:
        source = f"the model's, chosen by {card.threshold_rule} on its validation patients"
    return {
        "temperature": float(card.temperature),
        "threshold": float(threshold),
        "threshold_source": source,
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


# --------------------------------------------------------------------------- predictions


def predict_tiles(
    tiles: pa.Table,
    model_uri: str,
    geometry: TileGeometry,
    options: PredictOptions,
) -> pd.DataFrame:
    """Run breakhis.score.predict's pipeline over ``tiles`` (breakhis.data.inputs.INPUT_SCHEMA rows)
    on the current Ray cluster, at ``options.predict.threshold`` (the one applied: not None).

    Returns one row per tile: uri, prob_malignant (after the model's temperature),
    prob_uncalibrated (at temperature 1), ``class_probs`` (every class's probability after
    the temperature, in the card's class order), ``map`` (a (map_size, map_size) float32
    array scaled to [-1, 1], or None without an attribution) and ``scale`` (the map's largest
    absolute raw value: raw map = map x scale; NaN without).
    Raises RuntimeError naming the tiles that failed to read or decode (a
    prepared DEST holds only decodable tiles, so a failure means DEST changed).
    """
    if tiles.num_rows == 0:
        return pd.DataFrame(
            {
                "uri": [],
                "prob_malignant": [],
                "prob_uncalibrated": [],
                "scale": [],
                "map": [],
                "class_probs": [],
            }
        )
    if options.threshold is None:
        raise ValueError("predict_tiles needs the threshold applied (the model's or the user's)")
    source = tiles.select(["uri", "tile_id", "shard"])
    source = source.append_column("unit", pa.array(np.zeros(tiles.num_rows, np.int32)))
    blocks = [source.slice(i, _BLOCK_ROWS) for i in range(0, source.num_rows, _BLOCK_ROWS)]
    ds = predict_dataset(
        blocks,
        model_uri=model_uri,
        geometry=geometry,
        threshold=options.threshold,
        options=options,
    )
    uris: list[str] = []
    probs: list[np.ndarray] = []
    raw: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    scales: list[np.ndarray] = []
    failed: list[str] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        errors = np.asarray(batch["error"], dtype=object)
        failed += [f"{u} ({e})" for u, e in zip(batch["uri"], errors, strict=True) if e]
        uris += [str(u) for u in batch["uri"]]
        probs.append(np.asarray(batch["prob"], dtype=np.float64))
        raw.append(np.asarray(batch["prob_uncalibrated"], dtype=np.float64))
        maps.append(np.asarray(batch["map"], dtype=np.float16))
        classes.append(np.asarray(batch["class_probs"], dtype=np.float64))
        scales.append(np.asarray(batch["scale"], dtype=np.float64))
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
            "scale": np.concatenate(scales),
        }
    )
    frame["map"] = list(all_maps) if options.method else [None] * len(frame)
    # Every class's probability (after the temperature), [N, K]: the subtype metrics' input.
    frame["class_probs"] = list(np.concatenate(classes)) if classes else []
    if len(frame) != tiles.num_rows or frame["uri"].nunique() != tiles.num_rows:
        raise RuntimeError(f"{len(frame)} predictions came back for {tiles.num_rows} tiles")
    return frame


def _examples(
    rows: pd.DataFrame,
    tiles: pa.Table,
    options: EvaluateOptions,
    geometry: TileGeometry,
    map_scale: float | None = None,
) -> tuple[Example, ...]:
    """Decode the tiles of ``rows`` at thumbnail size, as the model saw them (``geometry``,
    the card's), and draw their attribution maps on one scale, ``map_scale`` (raw values;
    None: each map on its own)."""
    from breakhis.score.attribution import overlay_png

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
            # The tile as the pathologist knows it: its own colours, not the normalised ones.
            geometry=replace(geometry, size=options.thumbnail_size, stain=None),
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
                    else overlay_png(
                        image,
                        np.asarray(amap, np.float32) * float(row["scale"]),
                        scale=map_scale,
                    ),
                )
            )
    return tuple(out)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, "PNG")
    return buffer.getvalue()


def report_map_scale(scales: pd.Series) -> float | None:
    """One scale for every map of a report: the 95th percentile of the tiles' largest
    absolute raw values (a few extreme maps then saturate instead of washing out all the
    others); None without maps."""
    finite = scales.to_numpy(dtype=np.float64)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    return float(np.percentile(finite, 95)) if finite.size else None


PANEL_TILES = 8
"""Tiles shown per patient in the report's per-patient panels."""


def patient_panels(
    headline: pd.DataFrame,
    tiles: pa.Table,
    options: EvaluateOptions,
    geometry: TileGeometry,
    map_scale: float | None,
) -> tuple[PatientPanel, ...]:
    """One panel per patient of ``headline``: the patient's call (by ``options``' rule
    and threshold), true label and up to PANEL_TILES tiles evenly spread over its tiles
    sorted by probability, most malignant first."""
    from breakhis.stats.calibration import patient_calls

    if headline.empty:
        return ()
    threshold, rule = options.predict.threshold, options.patient_rule
    calls = patient_calls(headline["prob_malignant"], headline["patient_id"], threshold, rule)
    panels = []
    for patient, rows in headline.groupby("patient_id", sort=True):
        rows = rows.sort_values(["prob_malignant", "tile_id"], ascending=[False, True])
        picked = np.unique(np.linspace(0, len(rows) - 1, min(PANEL_TILES, len(rows))).round())
        labels = set(rows["label"].tolist())
        panels.append(
            PatientPanel(
                patient_id=str(patient),
                label=int(labels.pop()) if len(labels) == 1 else None,
                call=calls[str(patient)],
                mean_prob=float(rows["prob_malignant"].mean()),
                tiles=len(rows),
                examples=_examples(
                    rows.iloc[picked.astype(int)], tiles, options, geometry, map_scale
                ),
            )
        )
    return tuple(panels)


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
    from breakhis.train.config import CURVES_PNG

    run_uri = model_uri.rstrip("/").rsplit("/", 1)[0]
    uri = storage.join(run_uri, CURVES_PNG)
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, OSError):
        log.info("no training curves at %s; the report shows no training history", uri)
        return None


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class _Plan:
    """What run_evaluation settles before Ray starts."""

    card: ModelCard
    options: EvaluateOptions
    """The options with the threshold applied (the model's unless one was given)."""
    dest: PreparedDest
    known: ModelPatients
    test: frozenset[str]
    info: SplitInfo
    tiles: pa.Table
    """The test tiles to predict (every magnification unless cross_magnification is off)."""
    task: str = "binary"
    """The task evaluated: ``--task``, else the model's (``subtype`` adds its metrics)."""


def _plan(config: EvaluateConfig) -> _Plan:
    """Load the model, read the manifest, select the split and check it for leakage; the
    raises of run_evaluation but the decoding errors."""
    from breakhis.model.artifact import load_artifact

    config.check_out()
    # Loaded once here so that a damaged artifact fails in one line, not in every actor.
    _, card = load_artifact(config.model)
    task = config.task or card.task
    if task == "subtype" and card.task != "subtype":
        raise ValueError(
            f"--task subtype: {config.model} is a {card.task} model (classes "
            f"{', '.join(card.class_names)}); train one with --task subtype"
        )
    options = config.options
    if options.predict.threshold is None:
        options = replace(options, predict=replace(options.predict, threshold=card.threshold))
    dest = PreparedDest.open(config.data)
    known = model_patients(card, dest)
    spec = SplitSpec.parse(config.split or card.split)
    patients = dest.split(spec)  # raises LeakageError for a leaking manifest
    try:
        check_no_leakage(model_training=known.seen, evaluation_test=patients.test)
    except LeakageError as err:
        raise LeakageError(
            f"refusing to evaluate {config.model} (trained on {card.split} of manifest "
            f"{card.manifest_hash}) on {spec} of {config.data}: {err}"
        ) from err
    info = _split_info(dest, spec, card, known, patients.test)
    log.info("%s: %s", spec, info.leakage_check)
    tiles = _test_tiles(dest, spec, patients.test, card.magnification, options)
    return _Plan(card, options, dest, known, patients.test, info, tiles, task)


def _split_info(
    dest: PreparedDest,
    spec: SplitSpec,
    card: ModelCard,
    known: ModelPatients,
    test: frozenset[str],
) -> SplitInfo:
    return SplitInfo(
        split=str(spec),
        description=describe_split(dest.manifest, spec),
        manifest_hash=dest.hash,
        model_split=card.split,
        model_manifest_hash=card.manifest_hash,
        patients=len(dest.patients),
        seen_patients=len(known.seen),
        train_patients=len(known.split.train),
        val_patients=len(known.split.val),
        test_patients=len(test),
        leakage_check=(
            f"passed: none of the {len(test)} test patients is among the "
            f"{len(known.seen)} patients the model was trained or validated on "
            f"({card.split} of manifest {card.manifest_hash})"
        ),
    )


def _test_tiles(
    dest: PreparedDest,
    spec: SplitSpec,
    test: frozenset[str],
    trained_at: int | None,
    options: EvaluateOptions,
) -> pa.Table:
    """The prepared tiles of the test patients; FileNotFoundError when DEST has no shards,
    ValueError when the test patients have no image at the model's magnification."""
    from breakhis.data.inputs import prepared_rows

    listing = prepared_rows(dest)
    tiles = listing.filter(
        pc.is_in(listing.column("patient_id"), pa.array(sorted(test), pa.string()))
    )
    if trained_at and not options.cross_magnification:
        tiles = tiles.filter(pc.equal(tiles.column("magnification"), trained_at))
    if _at_magnification(tiles, trained_at).num_rows == 0:
        raise ValueError(
            f"split {spec} of {dest.uri}: the test patients have no image"
            + (f" at {trained_at}X" if trained_at else "")
        )
    return tiles


def _at_magnification(tiles: pa.Table, magnification: int | None) -> pa.Table:
    if not magnification:
        return tiles
    return tiles.filter(pc.equal(tiles.column("magnification"), magnification))


def _prediction_frame(
    tiles: pa.Table,
    scored: pd.DataFrame,
    threshold: float,
    trained_at: int | None,
    task: str = "binary",
) -> pd.DataFrame:
    """One row per test tile: its facts, its probabilities, the call at ``threshold``,
    whether it is right, and whether it counts in the headline (the model's
    magnification, or all); with ``task`` subtype also the eight class probabilities, the
    true and the predicted subtype (_with_subtype_columns)."""
    facts = tiles.select(
        ["uri", "tile_id", "patient_id", "magnification", "subtype", "label"]
    ).to_pandas()
    frame = facts.merge(scored, on="uri", how="inner", validate="one_to_one")
    frame["label"] = frame["label"].astype(np.int64)
    frame["magnification"] = frame["magnification"].astype(np.int64)
    frame["predicted_label"] = (frame["prob_malignant"] >= threshold).astype(np.int64)
    frame["correct"] = frame["predicted_label"] == frame["label"]
    frame["headline"] = (frame["magnification"] == trained_at) if trained_at else True
    probs = frame.pop("class_probs")
    if task == "subtype":
        frame = _with_subtype_columns(frame, np.stack(probs.to_list()))
    return frame.sort_values("tile_id", ignore_index=True)


def _with_subtype_columns(frame: pd.DataFrame, class_probs: np.ndarray) -> pd.DataFrame:
    """``frame`` with a subtype model's columns: ``prob_<subtype>`` for each of the eight
    classes, ``subtype_class`` (the true class index, from the tile's name) and
    ``predicted_subtype`` (the argmax). Raises ValueError naming a tile whose name has no
    BreakHis subtype."""
    from breakhis.subtypes import SUBTYPE_CLASS_NAMES, subtype_indices

    truth = subtype_indices(frame["tile_id"].to_numpy())
    if (truth < 0).any():
        bad = frame["tile_id"].iloc[int(np.flatnonzero(truth < 0)[0])]
        raise ValueError(f"--task subtype: tile {bad!r} has no BreakHis subtype in its name")
    columns = {f"prob_{name}": class_probs[:, i] for i, name in enumerate(SUBTYPE_CLASS_NAMES)}
    names = np.asarray(SUBTYPE_CLASS_NAMES, dtype=object)
    columns["subtype_class"] = truth
    columns["predicted_subtype"] = names[class_probs.argmax(axis=1)]
    return frame.assign(**columns)


def _result(config: EvaluateConfig, plan: _Plan, frame: pd.DataFrame) -> EvaluationResult:
    """The metrics, intervals, distribution and examples of the scored ``frame``."""
    card, options = plan.card, plan.options
    threshold, rule = options.predict.threshold, options.patient_rule
    headline = frame[frame["headline"]]
    labels, probs = headline["label"], headline["prob_malignant"]
    report_dict, report_text = classification_report(labels, headline["predicted_label"])
    sides = {"test": plan.test}
    if plan.known.source == config.data:
        sides = {"train": plan.known.split.train, "validation": plan.known.split.val, **sides}
    correct_rows, wrong_rows = choose_examples(headline, options.correct_examples, options.seed)
    map_scale = report_map_scale(headline["scale"]) if options.predict.method else None
    geometry = card.tile_geometry
    return EvaluationResult(
        model_uri=config.model,
        card=card,
        data=config.data,
        split=plan.info,
        options=options,
        predictions=frame.drop(columns=["map", "scale"]),
        metrics=score_predictions(labels, probs, headline["patient_id"], threshold, rule),
        per_magnification=per_magnification_metrics(frame, threshold, rule),
        calibration=calibration_summary(
            labels, probs, headline["prob_uncalibrated"], card, threshold
        ),
        classification_report=report_dict,
        classification_report_text=report_text,
        bootstrap=patient_bootstrap(
            labels.to_numpy(),
            probs.to_numpy(),
            headline["patient_id"].to_numpy(),
            replicates=options.bootstrap,
            confidence=options.confidence,
            seed=options.seed,
            threshold=threshold,
            patient_rule=rule,
        ),
        distribution=data_distribution(
            plan.dest.manifest,
            sides,
            magnification=card.magnification,
            oversample=bool(card.config.get("oversample")),
            class_weighted=bool(card.config.get("class_weighted")),
            task=card.task,
        ),
        history_png=_history_png(config.model),
        correct=_examples(correct_rows, plan.tiles, options, geometry, map_scale),
        wrong=_examples(wrong_rows, plan.tiles, options, geometry, map_scale),
        map_scale=map_scale,
        patients=patient_panels(headline, plan.tiles, options, geometry, map_scale),
        subtype=subtype_metrics(headline) if plan.task == "subtype" else None,
    )


def subtype_metrics(rows: pd.DataFrame) -> dict[str, Any]:
    """breakhis.subtypes.subtype_report of prediction rows (_with_subtype_columns'), plus
    the report per magnification (image-level confusion matrix and recall)."""
    from breakhis.subtypes import SUBTYPE_CLASS_NAMES, subtype_report

    def report(part: pd.DataFrame) -> dict[str, Any]:
        probs = part[[f"prob_{name}" for name in SUBTYPE_CLASS_NAMES]].to_numpy(np.float64)
        return subtype_report(part["subtype_class"], probs, part["patient_id"])

    out = report(rows)
    out["per_magnification"] = {
        str(int(mag)): {k: v for k, v in report(part).items() if k != "patient"}
        for mag, part in sorted(rows.groupby("magnification"), key=lambda kv: kv[0])
    }
    return out


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
    started = time.perf_counter()
    plan = _plan(config)
    ensure_ray()
    trained_at = plan.card.magnification
    log.info(
        "predicting %d test tiles of %d patients (%d at the model's magnification)",
        plan.tiles.num_rows,
        len(plan.test),
        _at_magnification(plan.tiles, trained_at).num_rows,
    )
    # One pipeline for every magnification: a second one (without attribution for the
    # cross-magnification tiles) would pay the actors' start-up again for little gain.
    threshold = plan.options.predict.threshold
    scored = predict_tiles(plan.tiles, config.model, plan.card.tile_geometry, plan.options.predict)
    frame = _prediction_frame(plan.tiles, scored, threshold, trained_at, plan.task)
    result = replace(_result(config, plan, frame), seconds=time.perf_counter() - started)
    if config.out:
        from breakhis.evaluate.report import write_report

        write_report(result, config.out)
        result = replace(result, report_dir=config.out)
    return result
