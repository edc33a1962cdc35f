"""The report: every file written, numbers equal to the result's, and the page renders
with all its images in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breakhis import storage
from breakhis.evaluate.config import EvaluateOptions
from breakhis.evaluate.job import (
    classification_report,
    per_magnification_metrics,
    score_predictions,
)
from breakhis.evaluate.report import write_report
from breakhis.evaluate.report_html import CHROMIUM, json_ready, render_check
from breakhis.evaluate.result import EvaluationResult, Example, SplitInfo
from breakhis.model.artifact import ModelCard
from breakhis.protocol.report import write_protocol_report
from breakhis.score.attribution import overlay_png
from breakhis.stats.bootstrap import patient_bootstrap

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} not installed (Debian: apt-get install chromium); "
    "the headless-browser check of report.html cannot run",
)

EVERY_FILE = (
    "report.html",
    "metrics.json",
    "predictions.parquet",
    "confusion_matrix.png",
    "roc_curve.png",
    "training_history.png",
    "dataset_distribution.png",
    "bootstrap.png",
    "correct_predictions.png",
)


def _png(seed: int, side: int = 32) -> tuple[np.ndarray, bytes]:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return pixels, buffer.getvalue()


def _example(row: pd.Series, seed: int) -> Example:
    pixels, png = _png(seed)
    heat = np.random.default_rng(seed).random((8, 8)).astype(np.float32)
    return Example(
        tile_id=row["tile_id"],
        patient_id=row["patient_id"],
        magnification=int(row["magnification"]),
        subtype=row["subtype"],
        label=int(row["label"]),
        prob_malignant=float(row["prob_malignant"]),
        predicted_label=int(row["predicted_label"]),
        image_png=png,
        overlay_png=overlay_png(pixels, heat),
    )


def make_result(history: bool = True) -> EvaluationResult:
    """A complete EvaluationResult of 6 patients x 2 magnifications, built without Ray."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(6):
        label = p % 2
        for mag in (40, 100):
            for k in range(3):
                rows.append(
                    {
                        "tile_id": f"SOB_{'BM'[label]}_X-14-{p:04d}-{mag}-{k:03d}",
                        "patient_id": f"14-{p:04d}",
                        "magnification": mag,
                        "subtype": ("adenosis", "ductal_carcinoma")[label],
                        "label": label,
                        "prob_malignant": float(
                            np.clip(0.3 + 0.4 * label + rng.normal(0, 0.2), 0, 1)
                        ),
                    }
                )
    frame = pd.DataFrame(rows)
    frame["predicted_label"] = (frame["prob_malignant"] >= 0.5).astype(int)
    frame["correct"] = frame["predicted_label"] == frame["label"]
    frame["headline"] = True
    metrics = score_predictions(frame["label"], frame["prob_malignant"], frame["patient_id"])
    report, text = classification_report(frame["label"], frame["predicted_label"])
    card = ModelCard(
        architecture="smallcnn",
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        split="fold:0",
        manifest_hash="abc123",
        config={"class_weighted": True},
        model_id="0123456789ab",
    )
    wrong = frame[~frame["correct"]]
    right = frame[frame["correct"]].iloc[:5]
    counts = {
        "class": {"benign": 9.0, "malignant": 21.0},
        "subtype": {"adenosis": 9.0},
        "magnification": {"40": 15.0, "100": 15.0, "200": 0.0, "400": 0.0},
    }
    return EvaluationResult(
        model_uri="/runs/demo/model",
        card=card,
        data="/prepared",
        split=SplitInfo(
            split="fold:0",
            description="fold 0 of 2-fold cross-validation grouped by patient",
            manifest_hash="abc123",
            model_split="fold:0",
            model_manifest_hash="abc123",
            patients=18,
            seen_patients=12,
            train_patients=10,
            val_patients=2,
            test_patients=6,
            leakage_check="passed: none of the 6 test patients is among the 12 seen",
        ),
        options=EvaluateOptions(bootstrap=100),
        predictions=frame,
        metrics=metrics,
        per_magnification=per_magnification_metrics(frame),
        classification_report=report,
        classification_report_text=text,
        bootstrap=patient_bootstrap(
            frame["label"], frame["prob_malignant"], frame["patient_id"], replicates=100
        ),
        distribution={"train": counts, "train_balanced": counts, "test": counts},
        history_png=_png(99, 64)[1] if history else None,
        correct=tuple(_example(r, i) for i, (_, r) in enumerate(right.iterrows())),
        wrong=tuple(_example(r, 100 + i) for i, (_, r) in enumerate(wrong.iterrows())),
        seconds=1.5,
    )


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_every_report_file_is_written_and_matches_the_result(tmp_path: Path) -> None:
    result = make_result()
    assert len(result.wrong) >= 2  # the example has mistakes to show
    files = write_report(result, str(tmp_path / "report"))
    out = tmp_path / "report"
    for name in EVERY_FILE:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    wrong_files = sorted(p.name for p in (out / "wrong_predictions").glob("*.png"))
    assert wrong_files == sorted(f"{e.tile_id}.png" for e in result.wrong)
    assert set(files.files) >= {str(out / n) for n in EVERY_FILE}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["split"] == "fold:0"
    assert metrics["protocol"]["test_patients"] == 6
    assert metrics["test_images"] == 36
    assert metrics["metrics"]["patient_recognition_rate"] == pytest.approx(
        result.metrics["patient_recognition_rate"]
    )
    assert metrics["confusion_matrix"]["matrix"] == [
        [result.metrics["tn"], result.metrics["fp"]],
        [result.metrics["fn"], result.metrics["tp"]],
    ]
    assert metrics["bootstrap"]["unit"] == "patient"
    assert len(metrics["wrong_predictions"]) == len(result.wrong)
    assert set(metrics["files"]) >= set(EVERY_FILE)

    page = (out / "report.html").read_text()
    sources = _img_sources(page)
    # 6 plots (confusion, ROC, history, distribution, bootstrap, correct grid) + the wrong ones.
    assert len(sources) == 6 + len(result.wrong)
    assert all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for text in ("Patient-level recognition rate", "fold 0 of 2-fold", "leakage check"):
        assert text in page


def test_rewriting_a_report_leaves_nothing_of_the_old_one(tmp_path: Path) -> None:
    first = make_result()
    write_report(first, str(tmp_path))
    assert len(list((tmp_path / "wrong_predictions").glob("*.png"))) == len(first.wrong) > 1
    second = replace(make_result(history=False), wrong=first.wrong[:1])
    write_report(second, str(tmp_path))
    assert not (tmp_path / "training_history.png").exists()
    assert "No training curves" in (tmp_path / "report.html").read_text()
    assert [p.name for p in (tmp_path / "wrong_predictions").glob("*.png")] == [
        f"{first.wrong[0].tile_id}.png"
    ]


def test_json_ready_writes_nan_as_null() -> None:
    value = {"a": float("nan"), "b": np.float32(0.5), 3: (np.int64(2), math.inf)}
    assert json.dumps(json_ready(value), allow_nan=False) == (
        '{"a": null, "b": 0.5, "3": [2, null]}'
    )


@needs_chromium
def test_report_renders_with_every_image_in_headless_chromium(tmp_path: Path) -> None:
    result = make_result()
    files = write_report(result, str(tmp_path))
    check = render_check(files.html)
    assert check.title == "BreakHis evaluation 0123456789ab"
    assert check.images == 6 + len(result.wrong)
    assert check.loaded == check.images and check.ok

    # The check can fail: a page with one broken image reports it.
    page = Path(files.html).read_text()
    broken = page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1)
    (tmp_path / "broken.html").write_text(broken)
    bad = render_check(str(tmp_path / "broken.html"))
    assert bad.images == check.images and bad.loaded == check.images - 1 and not bad.ok


@pytest.mark.s3
def test_report_written_to_s3(s3_prefix: str) -> None:
    files = write_report(make_result(), s3_prefix)
    assert files.html == f"{s3_prefix}/report.html"
    assert storage.exists(files.html) and storage.exists(f"{s3_prefix}/roc_curve.png")
    assert json.loads(storage.read_bytes(files.metrics_json))["protocol"]["split"] == "fold:0"


def test_protocol_report(tmp_path: Path) -> None:
    from breakhis.protocol.result import ProtocolResult, ProtocolRun, aggregate

    runs = []
    for index, rate in enumerate((0.8, 0.9)):
        for trained in (None, 40):
            per_mag = {
                m: {"patient_recognition_rate": rate, "image_recognition_rate": rate - 0.05}
                for m in (40, 100)
            }
            runs.append(
                ProtocolRun(
                    name=f"rep{index}-{'all' if trained is None else '40x'}",
                    split=f"rep:{index}",
                    magnification=trained,
                    artifact_uri="/runs/x/model",
                    report_html=str(tmp_path / "runs" / f"rep{index}" / "report.html"),
                    metrics=per_mag[40],
                    per_magnification=per_mag,
                    test_patients=5,
                    test_images=40,
                    trained=True,
                    started=0.0,
                    finished=1.0,
                )
            )
    summary, matrix = aggregate(runs, (None, 40))
    result = ProtocolResult(
        name="paper",
        data="/prepared",
        root="/runs/paper",
        scheme="rep",
        config_splits=("rep:0", "rep:1"),
        magnifications=(None, 40),
        patients=20,
        protocol_description="2 random splits of the patients, 70% train / 30% test",
        train_config={"arch": "smallcnn"},
        runs=tuple(runs),
        summary=summary,
        cross_magnification=matrix,
        concurrency=2,
        seconds=3.0,
    )
    files = write_protocol_report(result, str(tmp_path / "report"))
    page = Path(files.html).read_text()
    assert "85.0 ± 7.1" in page  # patient rate: mean of 80 and 90, sample std 7.07
    assert page.count('href="../runs/rep0/report.html"') == 2
    metrics = json.loads(Path(files.metrics_json).read_text())
    assert metrics["cross_magnification"]["rows_trained_at"] == ["all", 40]
    assert metrics["summary"]["40@40"]["splits"] == 2
    assert len(_img_sources(page)) == 2
    if Path(CHROMIUM).exists():
        check = render_check(files.html)
        assert check.ok and check.images == 2


def test_every_card_value_is_escaped_in_the_page(tmp_path: Path) -> None:
    # The card is validated when read (tests/test_artifact.py); the page escapes its values
    # anyway, so one that got past (a card built in code) cannot inject markup.
    result = make_result()
    card = replace(result.card)
    for name in ("epoch", "image_size", "magnification", "temperature", "split"):
        object.__setattr__(card, name, f"<b id='{name}'>x</b>")
    write_report(replace(result, card=card), str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert "<b id=" not in page
    for name in ("epoch", "image_size", "magnification", "temperature", "split"):
        assert f"&lt;b id=&#x27;{name}&#x27;&gt;x&lt;/b&gt;" in page, name


def test_the_report_shows_one_map_scale_with_its_colour_bar_and_a_panel_per_patient(
    tmp_path: Path,
) -> None:
    from breakhis.evaluate.figures import plot_patient_panel
    from breakhis.evaluate.job import report_map_scale
    from breakhis.evaluate.result import PatientPanel
    from breakhis.stats.calibration import patient_calls

    assert report_map_scale(pd.Series([np.nan, 0.0, 1.0, 2.0, 3.0])) == pytest.approx(2.9)
    assert report_map_scale(pd.Series([np.nan])) is None
    base = make_result()
    frame = base.predictions
    calls = patient_calls(frame["prob_malignant"], frame["patient_id"], 0.5)
    panels = []
    for patient, rows in frame.groupby("patient_id"):
        rows = rows.sort_values("prob_malignant", ascending=False).iloc[:4]
        panels.append(
            PatientPanel(
                patient_id=patient,
                label=int(rows["label"].iloc[0]),
                call=calls[patient],
                mean_prob=float(rows["prob_malignant"].mean()),
                tiles=6,
                examples=tuple(_example(r, i) for i, (_, r) in enumerate(rows.iterrows())),
            )
        )
    result = replace(base, map_scale=0.8, patients=tuple(panels))
    png = plot_patient_panel(panels[0], 0.8)
    assert png.startswith(b"\x89PNG")
    write_report(result, str(tmp_path))
    files = sorted(p.name for p in (tmp_path / "patients").glob("*.png"))
    assert files == sorted(f"{p.patient_id}.png" for p in panels) and len(files) == 6
    page = (tmp_path / "report.html").read_text()
    # The 6 plots, the colour bar, a panel per patient and the wrong ones.
    assert len(_img_sources(page)) == 6 + 1 + 6 + len(result.wrong)
    assert "one scale: raw gradcam values from -0.8 to +0.8" in page
    wrong = sum(p.call != p.label for p in panels)
    assert f"Patients (6, {wrong} called wrong)" in page
    # Written again without panels: the old panels go.
    write_report(base, str(tmp_path))
    assert not list((tmp_path / "patients").glob("*.png"))
