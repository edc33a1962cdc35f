"""The evaluation report: PNG plots, one self-contained ``report.html``, ``metrics.json``.

    files = write_report(result, "./report")     # result: breakhis.evaluation_result.EvaluationResult
    check = render_check("./report/report.html")  # a real headless browser loads it

Written to OUT (local or ``s3://``):

- ``report.html``: everything below in one file, the plots embedded as base64
  PNG (no network, no other file needed: mail it, open it anywhere);
- ``metrics.json``: every number of the page (NaN written as null);
- ``predictions.parquet``: one row per test tile (probability, prediction);
- ``confusion_matrix.png``, ``roc_curve.png``, ``training_history.png`` (the
  training job's curves, when found), ``dataset_distribution.png``,
  ``bootstrap.png``, ``correct_predictions.png`` and
  ``wrong_predictions/<tile_id>.png`` (the tile beside its attribution overlay,
  one per wrong prediction).

The protocol report (``write_protocol_report``) has the same two main files
and a ``cross_magnification.png`` heatmap.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from breakhis import storage
from breakhis.names import CLASS_NAMES

if TYPE_CHECKING:
    from breakhis.evaluation_result import EvaluationResult, Example
    from breakhis.protocol import ProtocolResult

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
METRICS_JSON = "metrics.json"
PREDICTIONS_PARQUET = "predictions.parquet"
WRONG_DIR = "wrong_predictions"
HISTORY_PNG = "training_history.png"
CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium, used by render_check()."""

_TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("image_recognition_rate", "image-level recognition rate"),
    ("patient_recognition_rate", "patient-level recognition rate"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("precision", "precision (malignant)"),
    ("recall", "recall (malignant)"),
    ("f1", "F1 (malignant)"),
    ("roc_auc", "ROC-AUC"),
)


@dataclass(frozen=True)
class ReportFiles:
    """What write_report() wrote."""

    out: str
    html: str
    """URI of report.html."""
    metrics_json: str
    """URI of metrics.json."""
    files: tuple[str, ...]
    """Every file written, report.html and metrics.json included."""


# --------------------------------------------------------------------------- helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf as None, numpy scalars and arrays as Python values,
    tuples as lists and keys as strings, so json.dumps(allow_nan=False) accepts it."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_bytes(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(json_ready(payload), indent=2, allow_nan=False, sort_keys=False).encode()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _img(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of labelled facts; values are HTML already."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1150px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.92em}.ok{color:#116611;font-weight:600}
.plot{max-width:100%;height:auto;display:block;margin:.5em 0}
.wrong{display:inline-block;margin:.4em;vertical-align:top;font-size:.8em;max-width:340px}
.wrong img{display:block}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
.facts th{text-align:left;white-space:nowrap;vertical-align:top}.facts td{text-align:left}
"""

# The page marks itself once every image has decoded, so a headless browser (and a test)
# can tell a page whose images load from one that merely parses.
_IMAGES_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded));
});
</script>
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n{_IMAGES_SCRIPT}</body></html>\n"
    )


# --------------------------------------------------------------------------- plots


def plot_confusion_matrix(tn: int, fp: int, fn: int, tp: int, title: str = "") -> bytes:
    """The 2x2 confusion matrix (rows: true class) with counts and row shares. PNG bytes."""
    plt = _pyplot()
    matrix = np.array([[tn, fp], [fn, tp]], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.6, 4), constrained_layout=True)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}\n{share[i, j]:.1%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.6 else "black",
                fontsize=12,
            )
    ax.set_xticks([0, 1], [f"predicted\n{c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true\n{c}" for c in CLASS_NAMES])
    ax.set_title(title or "confusion matrix (images)")
    return _figure_png(fig)


def plot_roc(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str = "ROC curve"
) -> bytes:
    """ROC curves, one per ``(name, labels, probabilities)``; a curve needs both classes
    (others are listed as undefined in the legend). PNG bytes."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6), constrained_layout=True)
    for index, (name, labels, probs) in enumerate(curves):
        labels, probs = np.asarray(labels), np.asarray(probs)
        if len(np.unique(labels)) < 2:
            ax.plot([], [], label=f"{name}: undefined (one class)")
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        auc = roc_auc_score(labels, probs)
        ax.plot(fpr, tpr, lw=2.5 if index == 0 else 1.2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
    ax.set_xlabel("false positive rate (benign called malignant)")
    ax.set_ylabel("true positive rate (malignant found)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _figure_png(fig)


def plot_reliability(calibration: Mapping[str, Any], title: str = "reliability diagram") -> bytes:
    """Reliability diagram of a calibration summary (breakhis.evaluate.calibration_summary):
    observed share of malignant images against the mean predicted probability of each
    bin, before and after temperature scaling, with the bins' image counts below. PNG bytes."""
    plt = _pyplot()
    fig, (ax, counts_ax) = plt.subplots(
        2, 1, figsize=(5.2, 5.6), height_ratios=(3, 1), sharex=True, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfectly calibrated")
    edges = np.asarray(calibration["after"]["reliability"]["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = (edges[1] - edges[0]) * 0.4
    for offset, (key, label) in zip(
        (-width / 2, width / 2),
        (
            ("before", "before (temperature 1)"),
            ("after", f"after (T = {calibration['temperature']:.2f})"),
        ),
        strict=True,
    ):
        rel = calibration[key]["reliability"]
        mean_prob, frequency = np.asarray(rel["mean_prob"]), np.asarray(rel["frequency"])
        full = ~np.isnan(mean_prob)
        ax.plot(
            mean_prob[full],
            frequency[full],
            marker="o",
            label=f"{label}: ECE {calibration[key]['ece']:.3f}, Brier {calibration[key]['brier']:.3f}",
        )
        counts_ax.bar(centres + offset, rel["counts"], width=width, label=key)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("observed share malignant")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    counts_ax.set_xlabel("predicted probability of malignancy")
    counts_ax.set_ylabel("images")
    counts_ax.set_yscale("symlog")
    return _figure_png(fig)


def plot_distribution(distribution: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bytes:
    """Grouped bars of images per class, subtype and magnification for each side
    (train, train_balanced, validation, test). PNG bytes."""
    plt = _pyplot()
    sides = list(distribution)
    fig, axes = plt.subplots(
        1, 3, figsize=(14, 4.4), constrained_layout=True, gridspec_kw={"width_ratios": [1, 3, 1.4]}
    )
    for ax, facet in zip(axes, ("class", "subtype", "magnification"), strict=True):
        keys = sorted({k for side in sides for k in distribution[side].get(facet, {})})
        if facet == "class":
            keys = [c for c in CLASS_NAMES if c in keys]
        elif facet == "magnification":
            keys = sorted(keys, key=int)
        width = 0.8 / max(1, len(sides))
        for i, side in enumerate(sides):
            values = [distribution[side].get(facet, {}).get(k, 0.0) for k in keys]
            xs = np.arange(len(keys)) + (i - (len(sides) - 1) / 2) * width
            ax.bar(
                xs,
                values,
                width,
                label=side.replace("_", " "),
                hatch="//" * (side == "train_balanced"),
            )
        labels = [f"{k}X" if facet == "magnification" else k.replace("_", "\n") for k in keys]
        ax.set_xticks(np.arange(len(keys)), labels, fontsize=8)
        ax.set_title(f"images per {facet}")
    axes[0].set_ylabel("images")
    axes[-1].legend(fontsize=8)
    return _figure_png(fig)


def plot_bootstrap(
    samples: Mapping[str, np.ndarray], names: Sequence[str], confidence: float
) -> bytes:
    """Histograms of the bootstrap replicates of ``names``, with the percentile
    interval marked. PNG bytes."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(names), figsize=(4.2 * len(names), 3.4), constrained_layout=True, squeeze=False
    )
    tail = (1 - confidence) / 2 * 100
    for ax, name in zip(axes[0], names, strict=True):
        values = np.asarray(samples[name])
        values = values[~np.isnan(values)]
        if values.size:
            ax.hist(values, bins=30, color="#4c72b0")
            for q in np.percentile(values, [tail, 100 - tail]):
                ax.axvline(q, color="#c44e52", ls="--")
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.set_xlabel("value over patient resamples")
    return _figure_png(fig)


def plot_examples(examples: Sequence[Example], title: str, columns: int = 8) -> bytes:
    """A grid of tiles with their true class, predicted probability, magnification
    and patient. PNG bytes (a note when there is none)."""
    from PIL import Image

    plt = _pyplot()
    count = max(1, len(examples))
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.9 * cols, 2.25 * rows + 0.4), squeeze=False, constrained_layout=True
    )
    for ax in axes.ravel():
        ax.axis("off")
    if not examples:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center")
    for ax, example in zip(axes.ravel(), examples, strict=False):
        ax.imshow(np.asarray(Image.open(io.BytesIO(example.image_png)).convert("RGB")))
        ax.set_title(
            f"{CLASS_NAMES[example.label]} p={example.prob_malignant:.2f}\n"
            f"{example.magnification}X {example.patient_id}",
            fontsize=7,
        )
    fig.suptitle(title, fontsize=10)
    return _figure_png(fig)


def wrong_panel(example: Example) -> bytes:
    """The tile beside its attribution overlay (or alone without one), as PNG bytes."""
    from PIL import Image

    tile = Image.open(io.BytesIO(example.image_png)).convert("RGB")
    if example.overlay_png is None:
        return example.image_png
    overlay = Image.open(io.BytesIO(example.overlay_png)).convert("RGB").resize(tile.size)
    gap = 4
    canvas = Image.new("RGB", (tile.width * 2 + gap, tile.height), "white")
    canvas.paste(tile, (0, 0))
    canvas.paste(overlay, (tile.width + gap, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def plot_matrix(
    matrix: Sequence[Sequence[float]],
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    errors: Sequence[Sequence[float]] | None = None,
) -> bytes:
    """A heatmap of ``matrix`` (rows: trained at, columns: evaluated at) with the
    values (and +- errors) written in the cells. PNG bytes."""
    plt = _pyplot()
    values = np.array(matrix, dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.6 * len(columns) + 2, 0.9 * len(rows) + 1.6), constrained_layout=True
    )
    ax.imshow(np.nan_to_num(values, nan=0.0), cmap="viridis", vmin=0.5, vmax=1.0)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = _fmt(float(values[i, j]))
            if errors is not None and math.isfinite(errors[i][j]):
                text += f"\n±{errors[i][j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(columns)), [f"evaluated {c}" for c in columns], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"trained {r}" for r in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    return _figure_png(fig)


# --------------------------------------------------------------------------- evaluation report


def _metric_rows(
    metrics: Mapping[str, float], intervals: Mapping[str, tuple[float, float]] | None
) -> list[list[str]]:
    rows = []
    for key, label in _TABLE_METRICS:
        ci_key = "accuracy" if key == "image_recognition_rate" else key
        cells = [html.escape(label), _fmt(metrics.get(key))]
        if intervals is not None:
            low, high = intervals.get(ci_key, (float("nan"), float("nan")))
            cells.append(f"[{_fmt(low)}, {_fmt(high)}]")
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

    written: dict[str, str] = {}  # name relative to out -> URI

    def put(name: str, data: bytes) -> str:
        uri = storage.join(out, name)
        storage.write_bytes(uri, data)
        written[name] = uri
        return uri

    storage.make_dirs(out)
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
    else:
        storage.delete(storage.join(out, HISTORY_PNG))  # one of an earlier report
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
    for name, data in plots.items():
        put(name, data)
    wrong_pngs = [(e, wrong_panel(e)) for e in result.wrong]
    for example, data in wrong_pngs:
        put(f"{WRONG_DIR}/{storage.safe_name(example.tile_id)}.png", data)
    wrong_dir = storage.join(out, WRONG_DIR)
    if storage.exists(wrong_dir):  # panels of an earlier report into the same folder
        for entry in storage.walk(wrong_dir, (".png",)):
            if f"{WRONG_DIR}/{entry.uri.rsplit('/', 1)[-1]}" not in written:
                storage.delete(entry.uri)

    table = pa.Table.from_pandas(result.predictions, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put(PREDICTIONS_PARQUET, buffer.getvalue())

    payload = result.to_json_dict()
    payload["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    payload["files"] = sorted([*written, METRICS_JSON, REPORT_HTML])
    metrics_uri = put(METRICS_JSON, _json_bytes(payload))
    html_uri = put(REPORT_HTML, _evaluation_html(result, plots, wrong_pngs).encode())
    log.info("report written to %s", html_uri)
    return ReportFiles(
        out=out, html=html_uri, metrics_json=metrics_uri, files=tuple(written.values())
    )


_PATIENT_RULE_TEXT = {
    "mean": "malignant when the mean probability of the patient's tiles reaches the threshold",
    "majority": "malignant when at least half of the patient's tiles are called malignant",
}


def _calibration_html(result: EvaluationResult, plots: Mapping[str, bytes]) -> list[str]:
    calibration = result.calibration
    if not calibration:
        return []
    rows = [
        [label, _fmt(calibration["before"][key]), _fmt(calibration["after"][key])]
        for key, label in (("brier", "Brier score"), ("ece", "expected calibration error"))
    ]
    return [
        "<h2>Calibration</h2>",
        '<p class="note">Probabilities before (the softmax of the logits) and after dividing '
        f"the logits by the temperature {calibration['temperature']:.3f} fitted on the model's "
        "validation patients (temperature scaling; it changes no ranking). Lower is better for "
        "both; the expected calibration error is over 10 equal-width probability bins.</p>",
        _table(["test images", "before", "after"], rows),
        _img(plots["reliability.png"], "reliability diagram", "plot"),
    ]


def _evaluation_html(
    result: EvaluationResult, plots: Mapping[str, bytes], wrong: Sequence[tuple[Example, bytes]]
) -> str:
    card, split, ci = result.card, result.split, result.bootstrap
    headline = result.predictions[result.predictions["headline"]]

    # Every value from the card or the data is escaped: a card is a file anyone may edit.
    def esc(value: Any) -> str:
        return html.escape(str(value))

    trained_at = esc(f"{card.magnification}X" if card.magnification else "all magnifications")
    parts = [
        f"<h1>BreakHis evaluation: {esc(card.architecture)} model {esc(card.model_id)}</h1>",
        '<p class="note">Benign vs malignant; malignant is the positive class. Every number '
        "comes from patients the model never saw in training or validation.</p>",
        "<h2>Protocol</h2>",
        _facts(
            [
                ("model", esc(result.model_uri)),
                ("architecture / input", f"{esc(card.architecture)}, {esc(card.image_size)} px"),
                ("trained on", f"{esc(card.split)} at {trained_at} (epoch {esc(card.epoch)})"),
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
                    f"{_fmt(result.options.predict.threshold, 3)} "
                    f"({esc(result.calibration.get('threshold_source', 'given'))})",
                ),
                ("temperature", esc(_fmt(card.temperature, 3))),
                ("patient call", esc(_PATIENT_RULE_TEXT[result.options.patient_rule])),
                (
                    "test-time augmentation",
                    "8 flips/rotations" if result.options.predict.tta else "off",
                ),
            ]
        ),
        f"<h2>Recognition rates and metrics ({esc(result.evaluated_at)})</h2>",
        '<p class="note">Image-level recognition rate = correct test images / all test images. '
        "Patient-level recognition rate = mean over patients of (correct images of the patient / "
        f"images of the patient). Intervals: {ci.confidence:.0%} percentile bootstrap over "
        f"{ci.replicates} resamples of the {ci.patients} test patients"
        f"{' (within each class)' if ci.stratified else ''}, never of images.</p>",
        _table(
            ["metric", result.evaluated_at, f"{ci.confidence:.0%} CI (patient bootstrap)"],
            _metric_rows(result.metrics, ci.intervals),
        ),
        f'<p class="note">Majority-class rate of these images: '
        f"{_fmt(float(max((headline['label'] == 0).mean(), (headline['label'] == 1).mean())))}."
        "</p>",
        _img(plots["bootstrap.png"], "bootstrap distributions", "plot"),
        "<h2>Per magnification</h2>",
        '<p class="note">'
        + (
            f"Cross-magnification generalisation: the model was trained at {trained_at} only; "
            "the other columns are test patients' images at magnifications it never saw."
            if card.magnification
            else "One magnification-independent model, scored on each magnification's test images."
        )
        + "</p>",
        _table(
            ["metric", *(f"{m}X" for m in result.per_magnification)],
            [
                [esc(label), *(_fmt(v.get(key)) for v in result.per_magnification.values())]
                for key, label in _TABLE_METRICS
            ]
            + [
                ["images", *(str(v["images"]) for v in result.per_magnification.values())],
                ["patients", *(str(v["patients"]) for v in result.per_magnification.values())],
            ],
        ),
        "<h2>Classification report</h2>",
        f"<pre>{esc(result.classification_report_text)}</pre>",
        "<h2>Confusion matrix</h2>",
        _img(plots["confusion_matrix.png"], "confusion matrix", "plot"),
        "<h2>ROC curve</h2>",
        _img(plots["roc_curve.png"], "ROC curve", "plot"),
        *_calibration_html(result, plots),
        "<h2>Training history</h2>",
        _img(plots[HISTORY_PNG], "training history", "plot")
        if HISTORY_PNG in plots
        else '<p class="note">No training curves beside the artifact (RUN/curves.png).</p>',
        "<h2>Data distribution</h2>",
        '<p class="note">Images per class, subtype and magnification of each side of the split'
        + (f", at {trained_at}" if card.magnification else "")
        + ". “train balanced” is the training set as the loss weighs it: "
        + _balancing_text(card.config)
        + "</p>",
        _img(plots["dataset_distribution.png"], "dataset distribution", "plot"),
        "<h2>Correct predictions</h2>",
        _img(plots["correct_predictions.png"], "correct predictions", "plot"),
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
        parts.append(f'<div class="wrong">{_img(data, str(example.tile_id))}{caption}</div>')
    parts.append(
        f'<p class="note">Generated {datetime.now(UTC).isoformat(timespec="seconds")} in '
        f"{result.seconds:.1f} s. Numbers also in metrics.json beside this file.</p>"
    )
    return _page(f"BreakHis evaluation {card.model_id}", "\n".join(parts))


# --------------------------------------------------------------------------- protocol report


def write_protocol_report(result: ProtocolResult, out: str) -> ReportFiles:
    """Write the protocol's summary (mean +- std over splits, cross-magnification
    matrix, one row per run) into ``out``. Returns the ReportFiles."""
    written: list[str] = []

    def put(name: str, data: bytes) -> str:
        uri = storage.join(out, name)
        storage.write_bytes(uri, data)
        written.append(uri)
        return uri

    storage.make_dirs(out)
    matrix = result.cross_magnification
    plots: dict[str, bytes] = {}
    for level in ("patient_recognition_rate", "image_recognition_rate"):
        plots[f"cross_magnification_{level}.png"] = plot_matrix(
            matrix.mean[level],
            [_trained_name(t) for t in matrix.trained],
            [f"{m}X" for m in matrix.evaluated],
            f"{level.replace('_', ' ')}: mean over {len(result.config_splits)} splits",
            errors=matrix.std[level],
        )
    for name, data in plots.items():
        put(name, data)
    payload = result.to_json_dict()
    payload["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    metrics_uri = put(METRICS_JSON, _json_bytes(payload))
    html_uri = put(REPORT_HTML, _protocol_html(result, plots, out).encode())
    log.info("protocol report written to %s", html_uri)
    return ReportFiles(out=out, html=html_uri, metrics_json=metrics_uri, files=tuple(written))


def _trained_name(trained: int | None) -> str:
    return "all" if trained is None else f"{trained}X"


def _relative(target: str, base: str) -> str:
    """A link from the folder ``base`` to ``target`` (relative when both are local)."""
    if storage.is_s3(target) or storage.is_s3(base):
        return target
    return os.path.relpath(storage.resolve(target)[1], storage.resolve(base)[1])


def _protocol_html(result: ProtocolResult, plots: Mapping[str, bytes], out: str) -> str:
    esc = html.escape
    summary = result.summary
    header = ["metric", *(_summary_column(c) for c in summary.columns)]
    rows = []
    for key, label in _TABLE_METRICS:
        cells = [esc(label)]
        for column in summary.columns:
            mean = summary.mean[column].get(key, float("nan"))
            std = summary.std[column].get(key, float("nan"))
            cells.append(f"{_pct(mean)} ± {_pct(std)}")
        rows.append(cells)
    rows.append(["splits", *(str(summary.count[c]) for c in summary.columns)])
    run_rows = []
    for run in result.runs:
        link = _relative(run.report_html, out) if run.report_html else ""
        run_rows.append(
            [
                esc(run.name),
                esc(run.split),
                esc(_trained_name(run.magnification)),
                esc(str(run.test_patients)),
                esc(str(run.test_images)),
                _pct(run.metrics.get("patient_recognition_rate")),
                _pct(run.metrics.get("image_recognition_rate")),
                _pct(run.metrics.get("balanced_accuracy")),
                _pct(run.metrics.get("roc_auc")),
                f'<a href="{esc(link)}">report</a>' if link else "",
            ]
        )
    parts = [
        f"<h1>BreakHis protocol: {esc(result.name)}</h1>",
        f'<p class="note">{esc(result.protocol_description)}</p>',
        _facts(
            [
                ("data", esc(result.data)),
                ("patients in the data", esc(str(result.patients))),
                ("splits", ", ".join(esc(s) for s in result.config_splits)),
                (
                    "models per split",
                    ", ".join(esc(_trained_name(m)) for m in result.magnifications),
                ),
                ("architecture", esc(str(result.train_config.get("arch")))),
                ("runs at a time", str(result.concurrency)),
                ("leakage", '<span class="ok">every run passed the patient leakage check</span>'),
            ]
        ),
        "<h2>Recognition rates (%), mean ± std over splits</h2>",
        '<p class="note">As in the paper\'s tables: one model per split (and per magnification '
        "when trained per magnification), evaluated on that split's test patients; the standard "
        "deviation is the sample standard deviation over splits.</p>",
        _table(header, rows),
        "<h2>Cross-magnification generalisation</h2>",
        '<p class="note">Rows: the magnification a model was trained at; columns: the '
        "magnification of the test images. Off-diagonal cells of per-magnification models "
        "are images at magnifications the model never saw.</p>",
        *(_img(data, name, "plot") for name, data in plots.items()),
        "<h2>Runs</h2>",
        _table(
            [
                "run",
                "split",
                "trained at",
                "test patients",
                "test images",
                "patient rate",
                "image rate",
                "balanced acc.",
                "ROC-AUC",
                "",
            ],
            run_rows,
        ),
        f'<p class="note">Generated {datetime.now(UTC).isoformat(timespec="seconds")} in '
        f"{result.seconds:.0f} s. Numbers also in metrics.json beside this file.</p>",
    ]
    return _page(f"BreakHis protocol {result.name}", "\n".join(parts))


def _summary_column(column: str) -> str:
    trained, _, evaluated = column.partition("@")
    if trained == "all":
        return "all magnifications" if evaluated == "all" else f"{evaluated}X (one model)"
    return f"{trained}X model"


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}"


# --------------------------------------------------------------------------- browser check


@dataclass(frozen=True)
class RenderCheck:
    """What a headless browser saw of a report page."""

    title: str
    images: int
    """<img> elements in the rendered page."""
    loaded: int
    """Images that decoded (naturalWidth > 0)."""

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.loaded == self.images


def render_check(path: str, *, chromium: str = CHROMIUM, timeout_s: float = 120.0) -> RenderCheck:
    """Open the local report page ``path`` in headless chromium and count its loaded images.

    Returns a RenderCheck. Raises FileNotFoundError when ``chromium`` or the page
    is missing, and RuntimeError when the browser fails or the page never ran
    its image check (it did not render).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such report page")
    if shutil.which(chromium) is None:
        raise FileNotFoundError(
            f"{chromium}: no chromium to render the report (Debian: apt-get install chromium)"
        )
    profile = tempfile.mkdtemp(prefix="breakhis-chromium-")
    try:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            "file://" + os.path.abspath(path),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = done.stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    if done.returncode != 0 or total is None or loaded is None:
        raise RuntimeError(
            f"chromium did not render {path} (exit {done.returncode}): "
            f"{(done.stderr or dom)[-800:]}"
        )
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    return RenderCheck(
        title=html.unescape(title.group(1)) if title else "",
        images=int(total.group(1)),
        loaded=int(loaded.group(1)),
    )
