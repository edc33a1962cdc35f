"""The scoring job at scale: a prefix listed page by page, units planned from the pages,
whole units only, and progress lines."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_score import SIZE, _save_model

from breakhis import storage
from breakhis.data.inputs import discover_inputs, list_inputs
from breakhis.score.pipeline import Progress
from breakhis.score.units import (
    UnitFormat,
    UnitTilePredictor,
    plan_units,
    read_members,
    write_plan,
)

NAMES = [
    "a-b/x.png",
    "a/b/y.png",
    "a/b.png",
    "ab.png",
    "a/SOB_B_A-14-22549AB-40-001.png",
    "b/SOB_B_A-14-22549AB-40-001.png",  # the same BreakHis name twice: ids fall back
    "b/SOB_M_DC-14-2523-400-010.jpg",
    "c/d/e/f/tile.tiff",
    "c/.hidden.png",
    "c/notes.txt",
    "z.PNG",
]


def _write(root: str) -> None:
    for name in NAMES:
        storage.write_bytes(storage.join(root, name), b"not decoded here")


def _check_pages(root: str) -> None:
    whole = discover_inputs(root).table
    for page_rows in (1, 3, 1000):
        listing = list_inputs(root, page_rows=page_rows)
        pages = list(listing.pages())
        assert max(p.num_rows for p in pages) <= page_rows
        assert listing.num_tiles == whole.num_rows == 9
        assert pa.concat_tables(pages).equals(whole)  # same rows, ids and order


def test_local_prefix_is_listed_page_by_page_like_discover_inputs(tmp_path) -> None:
    _write(str(tmp_path))
    _check_pages(str(tmp_path))


def test_s3_prefix_is_listed_page_by_page_like_discover_inputs(s3_prefix) -> None:
    _write(f"{s3_prefix}/in")
    _check_pages(f"{s3_prefix}/in")


def test_plan_streams_the_same_units_and_keeps_only_members_of_missing_ones(tmp_path) -> None:
    _write(str(tmp_path / "in"))
    whole = plan_units(discover_inputs(str(tmp_path / "in")).table, 2)
    listing = list_inputs(str(tmp_path / "in"), page_rows=3)
    done = {whole[1].name, whole[3].name}
    plan = write_plan(listing, 2, done, str(tmp_path / "plan"))
    assert plan.names == [u.name for u in whole] and plan.rows == [2, 2, 2, 2, 1]
    assert plan.pending["unit"].to_pylist() == [0, 2, 4] and plan.pending_tiles == 5
    for row in plan.pending.to_pylist():
        members = read_members(row["part"], row["group"])
        assert members.equals(whole[row["unit"]].members)


def test_a_batch_with_part_of_a_unit_is_refused(tmp_path) -> None:
    model = str(tmp_path / "model")
    card = _save_model(model)
    fmt = UnitFormat(str(tmp_path / "tiles"), "t", model, card.model_id, 1, None, 4, 0.5, False, 32)
    predictor = UnitTilePredictor(
        unit_format=fmt, batch_size=2, model_uri=model, method=None, map_size=4, tta=False,
        threshold=0.5, device="cpu", torch_threads=1, overlay_root=None, ig_steps=4,
        occlusion_window=0, lime_samples=8, lime_grid=4,
    )  # fmt: skip
    batch = {
        "uri": np.array(["a", "b"], dtype=object),
        "tile_id": np.array(["a", "b"], dtype=object),
        "unit": np.array([7, 7], np.int32),
        "name": np.array(["unit-00007-abc.parquet"] * 2, dtype=object),
        "part": np.array(["p", "p"], dtype=object),
        "group": np.array([0, 0], np.int32),
        "unit_rows": np.array([3, 3], np.int32),
        "image": np.zeros((2, SIZE, SIZE, 3), np.uint8),
        "error": np.array(["", ""], dtype=object),
    }
    with pytest.raises(RuntimeError, match="unit-00007-abc.parquet: a batch holds 2 of the"):
        predictor(batch)
    assert not (tmp_path / "tiles").exists()


def test_progress_logs_done_total_rate_and_eta(caplog) -> None:
    with (
        caplog.at_level(logging.INFO, logger="breakhis.score.pipeline"),
        Progress(1000, 0.05) as p,
    ):
        p.add(250, 3)
        import time

        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if "tiles/s" in r.getMessage()]
    assert len(lines) >= 2  # on the interval, and at the end
    assert "scored 250/1000 tiles (25.0%, 1 units, 3 errors)" in lines[-1]
    assert "ETA" in lines[-1] and "unknown" not in lines[-1]


@pytest.mark.slow
@pytest.mark.ray
def test_scale_benchmark_reports_the_loop_the_job_and_memory(tmp_path) -> None:
    import json
    import subprocess
    import sys

    # One size: every size runs the same code (a folder, the loop, two jobs in fresh
    # processes, ~30 s each here); what compares sizes is format_scale, checked without Ray
    # by test_the_scale_table_compares_the_smallest_and_the_largest_size below.
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "benchmark", "score", "--workdir", str(tmp_path),
         "--scale-tiles", "30", "--arch", "smallcnn", "--image-size", "32", "--tile-width",
         "64", "--tile-height", "42", "--batch-size", "16", "--unit-size", "16", "--cpus", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads((tmp_path / "benchmark-score-scale.json").read_text())
    assert [r["tiles"] for r in figures["runs"]] == [30]
    for run in figures["runs"]:
        assert run["loop_tiles_per_s"] > 0 and run["job_tiles_per_s"] > 0
        assert run["driver_peak_rss_mb"] > 0 and run["tree_peak_mb"] > run["driver_peak_rss_mb"]
        assert run["gradcam_ratio"] > 0 and run["prediction_files"] == 1
        assert run["files_per_million"] == pytest.approx(1e6 / run["tiles"])
    table = (tmp_path / "benchmark-score-scale.md").read_text()
    assert "job / loop" in table and "Grad-CAM job / loop" in table and "| 30 |" in table
    # The job scored its folder: one row per tile.
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "scale" / "out-30" / "predictions").num_rows == 30
    assert pq.read_table(tmp_path / "scale" / "out-30-gradcam" / "attributions").num_rows == 30


def test_the_scale_table_compares_the_smallest_and_the_largest_size() -> None:
    from breakhis.benchmarks.score import ScoreBenchmarkConfig
    from breakhis.benchmarks.score_scale import ScaleRun, format_scale

    config = ScoreBenchmarkConfig(scale_tiles=(10_000, 100_000))
    # 600 bytes of driver memory per predictions row from 10,000 to 100,000 tiles.
    small = ScaleRun(10_000, 1000.0, 0.1, 2.0, 5.0, 11.0, 20.0, 300.0, 900.0, 1, 40.0)
    grown = 300.0 + 600 * 90_000 / 2**20
    large = ScaleRun(100_000, 1000.0, 1.0, 20.0, 50.0, 100.0, 110.0, grown, 990.0, 2, 400.0)
    table = format_scale([small, large], config, 2, (0.5, 0.7))
    assert "| 10000 | 1000 | 909 | 0.91 | 0.25 | 500 | 300 | 900 | 100 |" in table
    assert "Job / loop at 100000 tiles: 1.00 (target >= 0.9)" in table
    assert f"driver peak RSS {grown / 300:.2f}x and whole tree 1.10x from 10000 to 100000" in table
    assert "driver memory per predictions row 600 bytes (target <= 1024)" in table
    assert "20 predictions files per million tiles (target <= 20)" in table
    # One size: its row, and nothing to compare it with.
    alone = format_scale([small], config, 2, (0.5, 0.7))
    assert "| 10000 |" in alone and "per predictions row" not in alone


def test_the_score_benchmark_table_shows_each_memory_scale_and_their_spread() -> None:
    from breakhis.benchmarks.score import ScoreBenchmarkConfig, ScoreBenchmarkResult, Throughput

    config = dataclasses.asdict(ScoreBenchmarkConfig(memory_tiles=8, memory_scales=(1, 2)))
    result = ScoreBenchmarkResult(
        date="2026-12-07",
        device="test CPU",
        cpus=2,
        gpus=0,
        config=config,
        load_average=(0.5, 0.7),
        throughput=[
            Throughput("plain PyTorch loop", 16, 2.0, 8.0, 10.0),
            Throughput("job, predictions only", 16, 4.0, 4.0, 9.0),
        ],
        peak_memory_mb={1: 800.0, 2: 1000.0},
    )
    assert result.memory_spread() == pytest.approx(0.25)
    assert result.ratio() == pytest.approx(0.9)
    table = result.format_table()
    assert "| 1x | 8 | 800 |" in table and "| 2x | 16 | 1000 |" in table
    assert "Spread of peak memory: 25% (target <= 20%)" in table
    assert "(steady): 0.90 (target >= 0.9)" in table


# --------------------------------------------------------------------------- the user's columns


def test_a_listing_brings_its_own_columns_csv_as_text_parquet_as_typed(tmp_path) -> None:
    _write(str(tmp_path / "in"))
    (tmp_path / "list.csv").write_text(
        "uri,case_id,note\nin/ab.png,C-7,007\nin/z.PNG,C-8,\nin/ab.png,C-9,again\n"
    )
    listing = list_inputs(str(tmp_path / "list.csv"))
    table = pa.concat_tables(listing.pages())
    assert listing.schema.names[-2:] == ["case_id", "note"]
    # Text as written ("007" stays "007"); a URI listed twice keeps its first row.
    assert table.select(["case_id", "note"]).to_pylist() == [
        {"case_id": "C-7", "note": "007"},
        {"case_id": "C-8", "note": ""},
    ]
    pq.write_table(
        pa.table({"slide": pa.array([3, None], pa.int64()), "uri": ["in/z.PNG", "in/ab.png"]}),
        tmp_path / "list.parquet",
    )
    table = discover_inputs(str(tmp_path / "list.parquet")).table
    assert table.schema.field("slide").type == pa.int64()
    assert table.column("uri").to_pylist() == sorted(table.column("uri").to_pylist())
    assert dict(zip(table["file_name"].to_pylist(), table["slide"].to_pylist(), strict=True)) == {
        "ab.png": None,
        "z.PNG": 3,
    }


@pytest.mark.parametrize("column", ["error", "prob_malignant", "tile_id", "prob_subtype_x"])
def test_a_listing_column_named_like_ours_is_refused_in_one_line(tmp_path, column) -> None:
    from breakhis.score.job import ScoreConfig, run_scoring

    _write(str(tmp_path / "in"))
    _save_model(str(tmp_path / "model"))
    (tmp_path / "list.csv").write_text(f"uri,case_id,{column}\nin/ab.png,C-7,x\n")
    config = ScoreConfig(
        model=str(tmp_path / "model"), input=str(tmp_path / "list.csv"), out=str(tmp_path / "out")
    )
    with pytest.raises(ValueError, match=f"column '{column}' clashes with a column") as err:
        run_scoring(config)
    assert "\n" not in str(err.value) and "reserved: " in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before the output is claimed


@pytest.mark.ray
@pytest.mark.slow
def test_the_listing_columns_come_through_to_the_predictions(tmp_path, ray_local) -> None:
    from test_score import _make_tiles

    from breakhis.score.job import ScoreConfig, run_scoring
    from breakhis.score.predict import PredictOptions

    _make_tiles(str(tmp_path / "tiles"))
    _save_model(str(tmp_path / "model"))
    uris = discover_inputs(str(tmp_path / "tiles")).table.column("uri").to_pylist()
    listing = pa.table(
        {
            "case_id": [f"case-{i % 5}" for i in range(len(uris))],
            "uri": uris[::-1],  # any order
            "slide_no": pa.array([i if i % 7 else None for i in range(len(uris))], pa.int32()),
            "scanned": pa.array([i * 1.5 for i in range(len(uris))], pa.float64()),
        }
    )
    pq.write_table(listing, tmp_path / "listing.parquet")
    config = ScoreConfig(
        model=str(tmp_path / "model"),
        input=str(tmp_path / "listing.parquet"),
        out=str(tmp_path / "out"),
        unit_size=8,
        predict=PredictOptions(attribution="none", batch_size=8, num_actors=1),
    )
    summary = run_scoring(config)
    assert summary.tiles == 36 and summary.attribution_files == 0
    assert not (tmp_path / "out" / "attributions").exists()  # no method, no table
    predictions = pq.read_table(tmp_path / "out" / "predictions")
    for name in ("case_id", "slide_no", "scanned"):
        assert predictions.schema.field(name).type == listing.schema.field(name).type
    got = {r["uri"]: r for r in predictions.to_pylist()}
    for row in listing.to_pylist():
        assert {k: got[row["uri"]][k] for k in row} == row  # unchanged, nulls included
    # The same listing again: nothing to do; a changed value: its unit is scored again.
    assert run_scoring(config).units_written == 0
    changed = listing.set_column(
        0, "case_id", pa.array(["other"] + listing["case_id"][1:].to_pylist())
    )
    pq.write_table(changed, tmp_path / "listing.parquet")
    again = run_scoring(config)
    assert again.units_written == 1 and again.units_skipped == 4
    by_uri = {
        r["uri"]: r["case_id"] for r in pq.read_table(tmp_path / "out" / "predictions").to_pylist()
    }
    assert by_uri[uris[-1]] == "other" and len(by_uri) == 36
