"""The protocol's report (``breakhis protocol``): ``report.html`` with the paper's table
(mean +- std over splits), the cross-magnification heatmaps and one row per run linking
to its own evaluation report, and ``metrics.json``."""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from breakhis import storage
from breakhis.evaluate.figures import plot_class_confusion, plot_matrix
from breakhis.evaluate.report_html import (
    METRICS_JSON,
    REPORT_HTML,
    TABLE_METRICS,
    ReportFiles,
    ReportWriter,
    facts,
    img,
    json_bytes,
    page,
    pct,
    table,
)

if TYPE_CHECKING:
    from breakhis.protocol.result import ProtocolResult

log = logging.getLogger(__name__)

_RUN_COLUMNS = (
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
)


def write_protocol_report(result: ProtocolResult, out: str) -> ReportFiles:
    """Write the protocol's summary (mean +- std over splits, cross-magnification
    matrix, one row per run) into ``out``. Returns the ReportFiles; raises what
    breakhis.storage raises when ``out`` cannot be written."""
    writer = ReportWriter(out)
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
    subtype_plots = {
        f"subtype_confusion_matrix_{trained}.png": plot_class_confusion(
            sub["confusion_matrix"],
            sub["class_names"],
            title=f"subtype confusion matrix, {_trained_name(None if trained == 'all' else int(trained))}"
            f" model(s), summed over {sub['runs']} run(s) (images)",
        )
        for trained, sub in (result.subtype or {}).items()
    }
    for name, data in {**plots, **subtype_plots}.items():
        writer.put(name, data)
    payload = result.to_json_dict()
    payload["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    metrics_uri = writer.put(METRICS_JSON, json_bytes(payload))
    html_uri = writer.put(REPORT_HTML, _protocol_html(result, plots, out, subtype_plots).encode())
    log.info("protocol report written to %s", html_uri)
    return writer.files(html_uri, metrics_uri)


def _trained_name(trained: int | None) -> str:
    return "all" if trained is None else f"{trained}X"


def _relative(target: str, base: str) -> str:
    """A link from the folder ``base`` to ``target`` (relative when both are local)."""
    if storage.is_s3(target) or storage.is_s3(base):
        return target
    return os.path.relpath(storage.resolve(target)[1], storage.resolve(base)[1])


def _summary_rows(result: ProtocolResult) -> list[list[str]]:
    """The paper's table: per metric, mean ± std (in %) of each summary column."""
    summary = result.summary
    rows = []
    for key, label in TABLE_METRICS:
        cells = [html.escape(label)]
        for column in summary.columns:
            mean = summary.mean[column].get(key, float("nan"))
            std = summary.std[column].get(key, float("nan"))
            cells.append(f"{pct(mean)} ± {pct(std)}")
        rows.append(cells)
    rows.append(["splits", *(str(summary.count[c]) for c in summary.columns)])
    return rows


def _run_rows(result: ProtocolResult, out: str) -> list[list[str]]:
    """One row per run, linking to its evaluation report."""
    esc = html.escape
    rows = []
    for run in result.runs:
        link = _relative(run.report_html, out) if run.report_html else ""
        rows.append(
            [
                esc(run.name),
                esc(run.split),
                esc(_trained_name(run.magnification)),
                esc(str(run.test_patients)),
                esc(str(run.test_images)),
                pct(run.metrics.get("patient_recognition_rate")),
                pct(run.metrics.get("image_recognition_rate")),
                pct(run.metrics.get("balanced_accuracy")),
                pct(run.metrics.get("roc_auc")),
                f'<a href="{esc(link)}">report</a>' if link else "",
            ]
        )
    return rows


def _subtype_html(result: ProtocolResult, plots: Mapping[str, bytes]) -> list[str]:
    """The eight-subtype section of a --task subtype protocol (nothing for binary)."""
    if not result.subtype:
        return []
    parts = [
        "<h2>Subtypes (8 classes), mean ± std over splits</h2>",
        '<p class="note">The subtype call is the most probable of the eight classes; a '
        "patient's is the most probable class of their tiles' mean probabilities, patients "
        "whose tiles carry two subtypes left out. The tables above are the benign/malignant "
        "call of the same models (P(malignant) = the sum of the four carcinomas).</p>",
    ]
    for trained, sub in result.subtype.items():
        rows = [
            [html.escape(name.replace("_", " ")), f"{pct(v['mean'])} ± {pct(v['std'])}"]
            for name, v in sub["metrics"].items()
        ] + [
            [f"recall {html.escape(name)}", f"{pct(v['mean'])} ± {pct(v['std'])}"]
            for name, v in sub["recall"].items()
        ]
        name = _trained_name(None if trained == "all" else int(trained))
        parts += [
            f"<h3>{html.escape(name)} model(s), {sub['runs']} run(s)</h3>",
            table(["metric (%)", "mean ± std"], rows),
            img(plots[f"subtype_confusion_matrix_{trained}.png"], "subtype confusion", "plot"),
        ]
    return parts


def _protocol_html(
    result: ProtocolResult,
    plots: Mapping[str, bytes],
    out: str,
    subtype_plots: Mapping[str, bytes] | None = None,
) -> str:
    esc = html.escape
    parts = [
        f"<h1>BreakHis protocol: {esc(result.name)}</h1>",
        f'<p class="note">{esc(result.protocol_description)}</p>',
        facts(
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
        table(
            ["metric", *(_summary_column(c) for c in result.summary.columns)], _summary_rows(result)
        ),
        "<h2>Cross-magnification generalisation</h2>",
        '<p class="note">Rows: the magnification a model was trained at; columns: the '
        "magnification of the test images. Off-diagonal cells of per-magnification models "
        "are images at magnifications the model never saw.</p>",
        *(img(data, name, "plot") for name, data in plots.items()),
        *_subtype_html(result, subtype_plots or {}),
        "<h2>Runs</h2>",
        table(list(_RUN_COLUMNS), _run_rows(result, out)),
        f'<p class="note">Generated {datetime.now(UTC).isoformat(timespec="seconds")} in '
        f"{result.seconds:.0f} s. Numbers also in metrics.json beside this file.</p>",
    ]
    return page(f"BreakHis protocol {result.name}", "\n".join(parts))


def _summary_column(column: str) -> str:
    trained, _, evaluated = column.partition("@")
    if trained == "all":
        return "all magnifications" if evaluated == "all" else f"{evaluated}X (one model)"
    return f"{trained}X model"
