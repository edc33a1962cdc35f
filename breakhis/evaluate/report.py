"""The evaluation report: PNG plots, one self-contained ``report.html``, ``metrics.json``.

    files = write_report(result, "./report")     # result: breakhis.evaluate.result.EvaluationResult
    check = render_check("./report/report.html")  # breakhis.evaluate.report_html: a browser loads it

Written to OUT (local or ``s3://``):

- ``report.html``: everything below in one file, the plots embedded as base64
  PNG (no network, no other file needed: mail it, open it anywhere);
- ``metrics.json``: every number of the page (NaN written as null);
- ``predictions.parquet``: one row per test tile (probability, prediction);
- ``confusion_matrix.png``, ``roc_curve.png``, ``training_history.png`` (the
  training job's curves, when found), ``dataset_distribution.png``,
  ``bootstrap.png``, ``correct_predictions.png`` and
  ``wrong_predictions/<tile_id>.png`` (the tile beside its attribution overlay,
  one per wrong prediction), ``patients/<patient_id>.png`` (a panel per test patient:
  its call, its true label, tiles sorted by probability); for a subtype model also
  ``subtype_confusion_matrix.png`` and ``subtype_confusion_matrix_patients.png`` (8 x 8, class
  names on the axes).

Every map is drawn on one scale for the whole report (breakhis.evaluate.job.report_map_scale)
with a perceptually uniform diverging colour map (breakhis.evaluate.figures.map_colours) and a
colour bar.

The plots are drawn by breakhis.evaluate.figures, the page's pieces and the browser check are
breakhis.evaluate.report_html's; the protocol's report is breakhis.protocol.report.
"""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from breakhis import storage
from breakhis.evaluate.figures import (
    map_colours,
    plot_bootstrap,
    plot_class_confusion,
    plot_colour_bar,
    plot_confusion_matrix,
    plot_distribution,
    plot_examples,
    plot_patient_panel,
    plot_reliability,
    plot_roc,
    wrong_panel,
)
from breakhis.evaluate.report_html import (
    METRICS_JSON,
    REPORT_HTML,
    TABLE_METRICS,
    ReportFiles,
    ReportWriter,
    facts,
    fmt,
    img,
    json_bytes,
    page,
    table,
)
from breakhis.names import CLASS_NAMES

if TYPE_CHECKING:
    from breakhis.evaluate.result import EvaluationResult, Example, PatientPanel

log = logging.getLogger(__name__)

PREDICTIONS_PARQUET = "predictions.parquet"
WRONG_DIR = "wrong_predictions"
PATIENTS_DIR = "patients"
HISTORY_PNG = "training_history.png"
SUBTYPE_PNG = "subtype_confusion_matrix.png"
SUBTYPE_PATIENTS_PNG = "subtype_confusion_matrix_patients.png"


def _metric_rows(
    metrics: Mapping[str, float], intervals: Mapping[str, tuple[float, float]] | None
) -> list[list[str]]:
    rows = []
    for key, label in TABLE_METRICS:
        ci_key = "accuracy" if key == "image_recognition_rate" else key
        cells = [html.escape(label), fmt(metrics.get(key))]
        if intervals is not None:
            low, high = intervals.get(ci_key, (float("nan"), float("nan")))
            cells.append(f"[{fmt(low)}, {fmt(high)}]")
        rows.append(cells)
    return rows


def _balancing_text(config: Mapping[str, Any]) -> str:
    parts = []
    if config.get("oversample"):
        parts.append("minority-class tiles repeated round(n_major / n_minor) times per epoch")
    if config.get("class_weighted"):
        parts.append("class weights n / (2 n_c) in the loss, which make both classes weigh n / 2")
    if not parts:
        return "no balancing was used, so it equals the training set."
    return "; ".join(parts) + "."


def write_report(result: EvaluationResult, out: str) -> ReportFiles:
    """Write the evaluation report of ``result`` into ``out`` (local or s3://).

    Returns the ReportFiles. Raises what breakhis.storage raises when ``out``
    cannot be written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = ReportWriter(out)
    plots = _plots(result)
    if HISTORY_PNG not in plots:
        storage.delete(storage.join(out, HISTORY_PNG))  # one of an earlier report
    for name, data in plots.items():
        writer.put(name, data)
    patient_pngs = [(p, plot_patient_panel(p, result.map_scale)) for p in result.patients]
    for panel, data in patient_pngs:
        writer.put(f"{PATIENTS_DIR}/{storage.safe_name(panel.patient_id)}.png", data)
    wrong_pngs = [(e, wrong_panel(e)) for e in result.wrong]
    for example, data in wrong_pngs:
        writer.put(f"{WRONG_DIR}/{storage.safe_name(example.tile_id)}.png", data)
    for folder in (WRONG_DIR, PATIENTS_DIR):
        uri = storage.join(out, folder)
        if storage.exists(uri):  # panels of an earlier report into the same folder
            for entry in storage.walk(uri, (".png",)):
                if f"{folder}/{entry.uri.rsplit('/', 1)[-1]}" not in writer.written:
                    storage.delete(entry.uri)

    table = pa.Table.from_pandas(result.predictions, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    writer.put(PREDICTIONS_PARQUET, buffer.getvalue())

    payload = result.to_json_dict()
    payload["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    payload["files"] = sorted([*writer.written, METRICS_JSON, REPORT_HTML])
    metrics_uri = writer.put(METRICS_JSON, json_bytes(payload))
    html = _evaluation_html(result, plots, wrong_pngs, patient_pngs)
    html_uri = writer.put(REPORT_HTML, html.encode())
    log.info("report written to %s", html_uri)
    return writer.files(html_uri, metrics_uri)


def _plots(result: EvaluationResult) -> dict[str, bytes]:
    """The report's plots by file name (the training curves only when found)."""
    split, metrics = result.split, result.metrics
    headline = result.predictions[result.predictions["headline"]]
    plots: dict[str, bytes] = {
        "confusion_matrix.png": plot_confusion_matrix(
            metrics["tn"],
            metrics["fp"],
            metrics["fn"],
            metrics["tp"],
            title=f"confusion matrix, {result.evaluated_at} (images)",
        )
    }
    curves = [(result.evaluated_at, headline["label"], headline["prob_malignant"])]
    if len(result.per_magnification) > 1:
        for mag, rows in sorted(result.predictions.groupby("magnification")):
            curves.append((f"{mag}X", rows["label"], rows["prob_malignant"]))
    plots["roc_curve.png"] = plot_roc(curves, title=f"ROC curve, test patients of {split.split}")
    if result.calibration:
        plots["reliability.png"] = plot_reliability(
            result.calibration, title=f"reliability, test patients of {split.split}"
        )
    if result.history_png is not None:
        plots[HISTORY_PNG] = result.history_png
    if result.subtype is not None:
        sub = result.subtype
        plots[SUBTYPE_PNG] = plot_class_confusion(
            sub["confusion_matrix"],
            sub["class_names"],
            title=f"subtype confusion matrix, {result.evaluated_at} (images)",
        )
        plots[SUBTYPE_PATIENTS_PNG] = plot_class_confusion(
            sub["patient"]["confusion_matrix"],
            sub["class_names"],
            title=f"subtype confusion matrix, {result.evaluated_at} (patients)",
        )
    plots["dataset_distribution.png"] = plot_distribution(result.distribution)
    plots["bootstrap.png"] = plot_bootstrap(
        result.bootstrap.samples,
        ["accuracy", "patient_recognition_rate", "balanced_accuracy"],
        result.bootstrap.confidence,
    )
    plots["correct_predictions.png"] = plot_examples(
        result.correct,
        f"correct predictions ({len(result.correct)} of {int(headline['correct'].sum())})",
    )
    return plots


_PATIENT_RULE_TEXT = {
    "mean": "malignant when the mean probability of the patient's tiles reaches the threshold",
    "majority": "malignant when at least half of the patient's tiles are called malignant",
}


def _calibration_html(result: EvaluationResult, plots: Mapping[str, bytes]) -> list[str]:
    calibration = result.calibration
    if not calibration:
        return []
    rows = [
        [label, fmt(calibration["before"][key]), fmt(calibration["after"][key])]
        for key, label in (("brier", "Brier score"), ("ece", "expected calibration error"))
    ]
    return [
        "<h2>Calibration</h2>",
        '<p class="note">Probabilities before (the softmax of the logits) and after dividing '
        f"the logits by the temperature {calibration['temperature']:.3f} fitted on the model's "
        "validation patients (temperature scaling; it changes no ranking). Lower is better for "
        "both; the expected calibration error is over 10 equal-width probability bins.</p>",
        table(["test images", "before", "after"], rows),
        img(plots["reliability.png"], "reliability diagram", "plot"),
    ]


def _esc(value: Any) -> str:
    # Every value from the card or the data is escaped: a card is a file anyone may edit.
    return html.escape(str(value))


def _trained_at(result: EvaluationResult) -> str:
    card = result.card
    return _esc(f"{card.magnification}X" if card.magnification else "all magnifications")


def _protocol_facts(result: EvaluationResult) -> str:
    """The table of what was evaluated, on which patients, and how."""
    card, split, esc = result.card, result.split, _esc
    headline = result.predictions[result.predictions["headline"]]
    return facts(
        [
            ("model", esc(result.model_uri)),
            ("architecture / input", f"{esc(card.architecture)}, {esc(card.image_size)} px"),
            (
                "trained on",
                f"{esc(card.split)} at {_trained_at(result)} (epoch {esc(card.epoch)})",
            ),
            ("data", esc(result.data)),
            ("split evaluated", f"{esc(split.split)}: {esc(split.description)}"),
            ("patients in the data", esc(split.patients)),
            (
                "model's patients",
                f"{esc(split.seen_patients)} seen ({esc(split.train_patients)} training, "
                f"{esc(split.val_patients)} validation)",
            ),
            (
                "test patients / images",
                f"{headline['patient_id'].nunique()} / {len(headline)} at {esc(result.evaluated_at)}",
            ),
            ("leakage check", f'<span class="ok">{esc(split.leakage_check)}</span>'),
            (
                "threshold",
                f"{fmt(result.options.predict.threshold, 3)} "
                f"({esc(result.calibration.get('threshold_source', 'given'))})",
            ),
            ("temperature", esc(fmt(card.temperature, 3))),
            ("patient call", esc(_PATIENT_RULE_TEXT[result.options.patient_rule])),
            (
                "test-time augmentation",
                "8 flips/rotations" if result.options.predict.tta else "off",
            ),
        ]
    )


def _metrics_html(result: EvaluationResult, plots: Mapping[str, bytes]) -> list[str]:
    """The headline metrics with their intervals, and the per-magnification table."""
    ci, esc = result.bootstrap, _esc
    headline = result.predictions[result.predictions["headline"]]
    per_mag = result.per_magnification.values()
    majority = max((headline["label"] == 0).mean(), (headline["label"] == 1).mean())
    return [
        f"<h2>Recognition rates and metrics ({esc(result.evaluated_at)})</h2>",
        '<p class="note">Image-level recognition rate = correct test images / all test images. '
        "Patient-level recognition rate = mean over patients of (correct images of the patient / "
        f"images of the patient). Intervals: {ci.confidence:.0%} percentile bootstrap over "
        f"{ci.replicates} resamples of the {ci.patients} test patients"
        f"{' (within each class)' if ci.stratified else ''}, never of images.</p>",
        table(
            ["metric", result.evaluated_at, f"{ci.confidence:.0%} CI (patient bootstrap)"],
            _metric_rows(result.metrics, ci.intervals),
        ),
        f'<p class="note">Majority-class rate of these images: {fmt(float(majority))}.</p>',
        img(plots["bootstrap.png"], "bootstrap distributions", "plot"),
        "<h2>Per magnification</h2>",
        '<p class="note">'
        + (
            f"Cross-magnification generalisation: the model was trained at {_trained_at(result)} "
            "only; the other columns are test patients' images at magnifications it never saw."
            if result.card.magnification
            else "One magnification-independent model, scored on each magnification's test images."
        )
        + "</p>",
        table(
            ["metric", *(f"{m}X" for m in result.per_magnification)],
            [[esc(label), *(fmt(v.get(key)) for v in per_mag)] for key, label in TABLE_METRICS]
            + [
                ["images", *(str(v["images"]) for v in per_mag)],
                ["patients", *(str(v["patients"]) for v in per_mag)],
            ],
        ),
    ]


def _wrong_html(result: EvaluationResult, wrong: Sequence[tuple[Example, bytes]]) -> list[str]:
    """Every wrong prediction: the tile beside its attribution map, with a caption."""
    esc = _esc
    parts = [
        f"<h2>Wrong predictions ({len(wrong)})</h2>",
        '<p class="note">Every misclassified test tile, most confident mistakes first: the tile '
        + (
            f"and its {esc(result.options.method)} map for the predicted class "
            "(red: evidence for it)."
            if result.options.method
            else "(attribution was turned off)."
        )
        + "</p>",
    ]
    for example, data in wrong:
        caption = (
            f"{esc(example.tile_id)}<br>true {CLASS_NAMES[example.label]} "
            f"({esc(example.subtype)}), predicted {CLASS_NAMES[example.predicted_label]} "
            f"(p malignant {example.prob_malignant:.3f}), {esc(example.magnification)}X, "
            f"patient {esc(example.patient_id)}"
        )
        parts.append(f'<div class="wrong">{img(data, str(example.tile_id))}{caption}</div>')
    return parts


def _subtype_html(result: EvaluationResult, plots: Mapping[str, bytes]) -> list[str]:
    """A subtype model's eight-class section: the confusion matrices (images, patients)
    and per-class recall; nothing for a binary model."""
    if result.subtype is None:
        return []
    sub, patient, esc = result.subtype, result.subtype["patient"], _esc
    mixed = ", ".join(patient["mixed_patients"]) or "none"
    return [
        "<h2>Subtypes (8 classes)</h2>",
        '<p class="note">The model has one output per subtype, benign four then malignant '
        "four; its subtype call is the most probable class, and its benign/malignant call "
        "above is P(malignant) = the sum of the four carcinomas' probabilities against the "
        "threshold. Patient level: a patient's subtype is the most probable class of the mean "
        "of their tiles' probabilities; patients whose tiles carry two subtypes are left out "
        f"(here: {esc(mixed)}).</p>",
        table(
            ["subtype", "image recall", "test images", "patient recall", "test patients"],
            [
                [
                    esc(name),
                    fmt(sub["recall"][name]),
                    str(sum(sub["confusion_matrix"][i])),
                    fmt(patient["recall"][name]),
                    str(sum(patient["confusion_matrix"][i])),
                ]
                for i, name in enumerate(sub["class_names"])
            ]
            + [
                [
                    "accuracy",
                    fmt(sub["accuracy"]),
                    str(sub["images"]),
                    fmt(patient["accuracy"]),
                    str(patient["patients"]),
                ],
                [
                    "balanced accuracy",
                    fmt(sub["balanced_accuracy"]),
                    "",
                    fmt(patient["balanced_accuracy"]),
                    "",
                ],
            ],
        ),
        img(plots[SUBTYPE_PNG], "subtype confusion matrix (images)", "plot"),
        img(plots[SUBTYPE_PATIENTS_PNG], "subtype confusion matrix (patients)", "plot"),
    ]


def _patients_html(
    result: EvaluationResult, panels: Sequence[tuple[PatientPanel, bytes]]
) -> list[str]:
    """A panel per test patient: the call, the true label, tiles sorted by probability."""
    if not panels:
        return []
    wrong = sum(p.label is not None and p.call != p.label for p, _ in panels)
    parts = [
        f"<h2>Patients ({len(panels)}, {wrong} called wrong)</h2>",
        '<p class="note">Each test patient\'s call (by the '
        + _esc(result.options.patient_rule)
        + " rule) and true label, with up to "
        + str(max(len(p.examples) for p, _ in panels))
        + " of its tiles spread over its tiles sorted by probability of malignancy, most "
        "malignant first; a tile called wrong has its caption in red."
        + (" Maps on the report's one scale (colour bar above)." if result.map_scale else "")
        + "</p>",
    ]
    parts += [img(data, f"patient {panel.patient_id}", "plot") for panel, data in panels]
    return parts


def _scale_html(result: EvaluationResult) -> list[str]:
    """The colour bar of every map in the report (one scale), when there are maps."""
    if result.map_scale is None or not result.options.method:
        return []
    bar = plot_colour_bar(result.map_scale, result.options.method)
    return [
        "<h2>Map colours</h2>",
        f'<p class="note">Every map below shares one scale: raw {_esc(result.options.method)} '
        f"values from -{result.map_scale:.3g} to +{result.map_scale:.3g} (the 95th "
        "percentile of the tiles' largest values; beyond it colours saturate), on a "
        f"perceptually uniform diverging colour map ({map_colours()}); no colour: no "
        "evidence.</p>",
        img(bar, "colour bar of the maps", "plot"),
    ]


def _evaluation_html(
    result: EvaluationResult,
    plots: Mapping[str, bytes],
    wrong: Sequence[tuple[Example, bytes]],
    patients: Sequence[tuple[PatientPanel, bytes]] = (),
) -> str:
    card, esc = result.card, _esc
    parts = [
        f"<h1>BreakHis evaluation: {esc(card.architecture)} model {esc(card.model_id)}</h1>",
        '<p class="note">Benign vs malignant; malignant is the positive class. Every number '
        "comes from patients the model never saw in training or validation.</p>",
        "<h2>Protocol</h2>",
        _protocol_facts(result),
        *_metrics_html(result, plots),
        "<h2>Classification report</h2>",
        f"<pre>{esc(result.classification_report_text)}</pre>",
        "<h2>Confusion matrix</h2>",
        img(plots["confusion_matrix.png"], "confusion matrix", "plot"),
        *_subtype_html(result, plots),
        "<h2>ROC curve</h2>",
        img(plots["roc_curve.png"], "ROC curve", "plot"),
        *_calibration_html(result, plots),
        "<h2>Training history</h2>",
        img(plots[HISTORY_PNG], "training history", "plot")
        if HISTORY_PNG in plots
        else '<p class="note">No training curves beside the artifact (RUN/curves.png).</p>',
        "<h2>Data distribution</h2>",
        '<p class="note">Images per class, subtype and magnification of each side of the split'
        + (f", at {_trained_at(result)}" if card.magnification else "")
        + ". “train balanced” is the training set as the loss weighs it: "
        + _balancing_text(card.config)
        + "</p>",
        img(plots["dataset_distribution.png"], "dataset distribution", "plot"),
        *_scale_html(result),
        *_patients_html(result, patients),
        "<h2>Correct predictions</h2>",
        img(plots["correct_predictions.png"], "correct predictions", "plot"),
        *_wrong_html(result, wrong),
        f'<p class="note">Generated {datetime.now(UTC).isoformat(timespec="seconds")} in '
        f"{result.seconds:.1f} s. Numbers also in metrics.json beside this file.</p>",
    ]
    return page(f"BreakHis evaluation {card.model_id}", "\n".join(parts))
