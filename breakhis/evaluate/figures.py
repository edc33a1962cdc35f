"""The reports' plots as PNG bytes, drawn with matplotlib's Agg backend (no display
needed): confusion matrix, ROC curves, reliability diagram, data distribution,
bootstrap distributions, example grids, a wrong prediction beside its attribution
overlay, and the protocol's cross-magnification heatmap."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from breakhis.evaluate.report_html import fmt
from breakhis.names import CLASS_NAMES
from breakhis.score.colours import DIVERGING_MAPS, map_colours  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from breakhis.evaluate.result import Example, PatientPanel


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_confusion_matrix(tn: int, fp: int, fn: int, tp: int, title: str = "") -> bytes:
    """The 2x2 confusion matrix (rows: true class) with counts and row shares. PNG bytes."""
    plt = pyplot()
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
    return figure_png(fig)


def plot_class_confusion(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str = ""
) -> bytes:
    """A K x K confusion matrix (rows: true class, columns: predicted) with the class names
    on both axes, counts and row shares in the cells. PNG bytes."""
    plt = pyplot()
    counts = np.asarray(matrix, dtype=float)
    k = len(class_names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 * k + 3, 0.85 * k + 2.2), constrained_layout=True)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.6 else "black",
                fontsize=8,
            )
    labels = [name.replace("_", " ") for name in class_names]
    ax.set_xticks(range(k), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted subtype")
    ax.set_ylabel("true subtype")
    ax.set_title(title or "subtype confusion matrix", fontsize=10)
    return figure_png(fig)


def plot_roc(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str = "ROC curve"
) -> bytes:
    """ROC curves, one per ``(name, labels, probabilities)``; a curve needs both classes
    (others are listed as undefined in the legend). PNG bytes."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
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
    return figure_png(fig)


def plot_reliability(calibration: Mapping[str, Any], title: str = "reliability diagram") -> bytes:
    """Reliability diagram of a calibration summary (breakhis.evaluate.job.calibration_summary):
    observed share of malignant images against the mean predicted probability of each
    bin, before and after temperature scaling, with the bins' image counts below. PNG bytes."""
    plt = pyplot()
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
    return figure_png(fig)


def plot_distribution(distribution: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bytes:
    """Grouped bars of images per class, subtype and magnification for each side
    (train, train_balanced, validation, test). PNG bytes."""
    plt = pyplot()
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
    return figure_png(fig)


def plot_bootstrap(
    samples: Mapping[str, np.ndarray], names: Sequence[str], confidence: float
) -> bytes:
    """Histograms of the bootstrap replicates of ``names``, with the percentile
    interval marked. PNG bytes."""
    plt = pyplot()
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
    return figure_png(fig)


def plot_examples(examples: Sequence[Example], title: str, columns: int = 8) -> bytes:
    """A grid of tiles with their true class, predicted probability, magnification
    and patient. PNG bytes (a note when there is none)."""
    from PIL import Image

    plt = pyplot()
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
    return figure_png(fig)


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
    plt = pyplot()
    values = np.array(matrix, dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.6 * len(columns) + 2, 0.9 * len(rows) + 1.6), constrained_layout=True
    )
    ax.imshow(np.nan_to_num(values, nan=0.0), cmap="viridis", vmin=0.5, vmax=1.0)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = fmt(float(values[i, j]))
            if errors is not None and math.isfinite(errors[i][j]):
                text += f"\n±{errors[i][j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(columns)), [f"evaluated {c}" for c in columns], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"trained {r}" for r in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    return figure_png(fig)


def plot_colour_bar(scale: float, method: str) -> bytes:
    """The colour bar of every map in a report: ``map_colours()`` from -``scale`` to
    +``scale`` (raw attribution values of ``method``; beyond them colours saturate). PNG."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.9), constrained_layout=True)
    mappable = plt.cm.ScalarMappable(Normalize(-scale, scale), colormaps[map_colours()])
    bar = fig.colorbar(mappable, cax=ax, orientation="horizontal", extend="both")
    bar.set_label(
        f"{method} attribution (raw), one scale for every map: against the called class "
        "<- 0 -> for it",
        fontsize=8,
    )
    bar.ax.tick_params(labelsize=7)
    return figure_png(fig)


def plot_patient_panel(panel: PatientPanel, scale: float | None) -> bytes:
    """One patient: its tiles (their maps over them when there are maps) sorted by
    probability, most malignant first, under a title with the patient's call, mean
    probability and true label; a colour bar on the report's one ``scale``. PNG bytes."""
    from PIL import Image

    plt = pyplot()
    count = max(1, len(panel.examples))
    fig, axes = plt.subplots(
        1, count, figsize=(1.5 * count + 1.2, 2.3), squeeze=False, constrained_layout=True
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, example in zip(axes.ravel(), panel.examples, strict=False):
        png = example.overlay_png or example.image_png
        ax.imshow(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        ax.set_title(
            f"p={example.prob_malignant:.2f}\n{CLASS_NAMES[example.predicted_label]}",
            fontsize=7,
            color="black" if example.correct else "#c44e52",
        )
    truth = "unknown" if panel.label is None else CLASS_NAMES[panel.label]
    verdict = (
        "" if panel.label is None else (" (right)" if panel.call == panel.label else " (WRONG)")
    )
    fig.suptitle(
        f"patient {panel.patient_id}: called {CLASS_NAMES[panel.call]}{verdict}, true {truth}; "
        f"mean p {panel.mean_prob:.2f} over {panel.tiles} tiles, {len(panel.examples)} shown",
        fontsize=8,
    )
    if scale is not None and any(e.overlay_png for e in panel.examples):
        from matplotlib import colormaps
        from matplotlib.colors import Normalize

        mappable = plt.cm.ScalarMappable(Normalize(-scale, scale), colormaps[map_colours()])
        bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, extend="both")
        bar.ax.tick_params(labelsize=6)
    return figure_png(fig)
