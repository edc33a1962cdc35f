"""The protocol: run planning, concurrency, mean +- std and the cross-magnification
matrix by hand, and a real two-split run (trained concurrently) on generated data."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import small_train_config

from breakhis.data.splits import add_split_columns
from breakhis.evaluate.config import EvaluateOptions
from breakhis.protocol.job import (
    PER_MAGNIFICATION,
    ProtocolConfig,
    available_splits,
    concurrent_runs,
    plan_runs,
    run_name,
    run_protocol,
)
from breakhis.protocol.result import ProtocolRun, aggregate
from breakhis.train.config import TrainConfig


def _train(tmp_path: Path, data: str = "data", **overrides) -> TrainConfig:
    return small_train_config(data, str(tmp_path / "runs"), **{"name": "paper", **overrides})


def _run(split: int, trained: int | None, rates: dict[int, float]) -> ProtocolRun:
    per_mag = {
        m: {"patient_recognition_rate": r, "image_recognition_rate": r / 2}
        for m, r in rates.items()
    }
    headline = (
        {"patient_recognition_rate": 0.5, "image_recognition_rate": 0.25}
        if trained is None
        else per_mag[trained]
    )
    return ProtocolRun(
        name=run_name("rep", split, trained),
        split=f"rep:{split}",
        magnification=trained,
        artifact_uri="model",
        report_html=None,
        metrics=headline,
        per_magnification=per_mag,
        test_patients=3,
        test_images=9,
        trained=True,
        started=0.0,
        finished=1.0,
    )


# --------------------------------------------------------------------------- pure pieces


def test_plan_runs_names_splits_and_folders(tmp_path: Path) -> None:
    config = ProtocolConfig(train=_train(tmp_path), scheme="rep", magnifications=PER_MAGNIFICATION)
    plans = plan_runs(config, [0, 1])
    assert [p.name for p in plans] == [
        "rep0-all",
        "rep1-all",
        "rep0-40x",
        "rep1-40x",
        "rep0-100x",
        "rep1-100x",
        "rep0-200x",
        "rep1-200x",
        "rep0-400x",
        "rep1-400x",
    ]
    first = plans[2]
    assert (first.split, first.magnification) == ("rep:0", 40)
    assert first.train.run_uri == str(tmp_path / "runs" / "paper" / "rep0-40x")
    assert first.artifact_uri == str(tmp_path / "runs" / "paper" / "rep0-40x" / "model")
    assert (first.train.split, first.train.magnification) == ("rep:0", 40)
    assert config.report_dir == str(tmp_path / "runs" / "paper" / "report")


def test_concurrency_follows_the_cluster() -> None:
    one_cpu_worker = _train(Path("/tmp"), num_workers=1)
    # Each run: 1 training CPU + 1 for its data pipeline.
    assert concurrent_runs(one_cpu_worker, 10, {"CPU": 4}) == 2
    assert concurrent_runs(one_cpu_worker, 10, {"CPU": 1}) == 1  # never 0
    assert concurrent_runs(one_cpu_worker, 1, {"CPU": 64}) == 1  # never more than runs
    assert concurrent_runs(one_cpu_worker, 10, {"CPU": 4}, max_concurrent=5) == 5
    gpu = _train(Path("/tmp"), num_workers=8, use_gpu=True, cpus_per_worker=4)
    # 64 GPUs / 8 per run = 8; 512 CPUs / (32 + 1) = 15: the GPUs decide.
    assert concurrent_runs(gpu, 25, {"CPU": 512, "GPU": 64}) == 8
    assert concurrent_runs(gpu, 25, {"CPU": 100, "GPU": 64}) == 3  # here the CPUs do


def test_aggregate_mean_std_and_cross_magnification_by_hand() -> None:
    runs = [
        _run(0, None, {40: 0.8, 100: 0.7, 200: 0.6, 400: 0.5}),
        _run(1, None, {40: 0.6, 100: 0.7, 200: 0.8, 400: 0.9}),
        _run(0, 40, {40: 0.9, 100: 0.6, 200: 0.5, 400: 0.4}),
        _run(1, 40, {40: 0.7, 100: 0.8, 200: 0.5, 400: 0.6}),
        _run(0, 400, {40: 0.5, 100: 0.5, 200: 0.5, 400: 1.0}),
    ]
    summary, matrix = aggregate(runs, (None, 40, 400))
    assert summary.columns == (
        "40@40",
        "400@400",
        "all@40",
        "all@100",
        "all@200",
        "all@400",
        "all@all",
    )
    rate = "patient_recognition_rate"
    assert summary.mean["40@40"][rate] == pytest.approx(0.8)
    assert summary.std["40@40"][rate] == pytest.approx(math.sqrt(0.02))  # sample std of .9, .7
    assert summary.mean["all@400"][rate] == pytest.approx(0.7)
    assert summary.mean["all@all"][rate] == pytest.approx(0.5)
    assert summary.std["all@all"][rate] == pytest.approx(0.0)
    assert summary.count == {c: (1 if c == "400@400" else 2) for c in summary.columns}
    assert math.isnan(summary.std["400@400"][rate])  # one split: no std
    assert summary.mean["40@40"]["image_recognition_rate"] == pytest.approx(0.4)

    # Rows: trained at all, 40, 400; columns: evaluated at 40, 100, 200, 400.
    assert matrix.shape == (3, 4)
    assert matrix.trained == (None, 40, 400) and matrix.evaluated == (40, 100, 200, 400)
    assert matrix.mean[rate][1] == pytest.approx([0.8, 0.7, 0.5, 0.5])
    assert matrix.mean[rate][2] == pytest.approx([0.5, 0.5, 0.5, 1.0])
    assert matrix.std[rate][0][0] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(matrix.std[rate][2][0])


def test_available_splits() -> None:
    columns = ["tile_id", "fold", "rep0", "rep1", "rep2", "report"]
    assert available_splits(columns, 5, "fold") == [0, 1, 2, 3, 4]
    assert available_splits(columns, 5, "rep") == [0, 1, 2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scheme": "kfold"}, "--scheme 'kfold'; accepted: fold, rep"),
        ({"magnifications": (50,)}, "--magnifications 50: 50 not accepted; accepted: all, 40"),
        ({"magnifications": ()}, "at least one"),
        ({"magnifications": (40, 40)}, "repeat"),
        ({"splits": (0, 0)}, "distinct indices"),
        ({"max_concurrent": -1}, "--max-concurrent must be >= 0"),
        ({"columns": ("site",)}, "--columns site needs --scheme column"),
        ({"scheme": "column", "splits": (0,)}, "with --scheme column use --columns"),
        ({"scheme": "column", "columns": ("a", "a")}, "repeat a column"),
        ({"scheme": "column", "columns": ("a b",)}, "column name 'a b'"),
    ],
)
def test_config_errors_name_the_option(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProtocolConfig(train=_train(tmp_path), **overrides)


def test_the_protocol_sets_magnifications_itself(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="leave --magnification unset"):
        ProtocolConfig(train=_train(tmp_path, magnification=40))


def test_the_protocol_sets_splits_itself(tmp_path: Path) -> None:
    # Each run's split comes from --scheme: a --split would be silently replaced.
    for split in ("rep:1", "column:site"):
        with pytest.raises(ValueError, match=f"--split {split}: the protocol sets each run"):
            ProtocolConfig(train=_train(tmp_path, split=split))


def test_column_scheme_runs_the_user_defined_split_columns(tmp_path: Path) -> None:
    from breakhis.data.dest import PreparedDest
    from breakhis.protocol.job import _check_splits

    rows = [
        {"tile_id": f"t{p}-{i}", "patient_id": f"p{p}", "label": p % 2}
        for p in range(10)
        for i in range(2)
    ]
    manifest = add_split_columns(pa.Table.from_pylist(rows), folds=2, repetitions=1)
    sides = {"site_a": {"p0", "p1"}, "site_b": {"p2", "p3", "p4"}}
    for name, test in sides.items():
        column = ["test" if r["patient_id"] in test else "train" for r in rows]
        manifest = manifest.append_column(name, pa.array(column, pa.string()))
    columns = {"columns": {"site_a": "a.txt", "site_b": "b.txt"}, "seed": 0}
    manifest = manifest.replace_schema_metadata({"breakhis.split": json.dumps(columns)})
    dest = PreparedDest(uri=str(tmp_path / "prepared"), manifest=manifest)

    config = ProtocolConfig(train=_train(tmp_path), scheme="column")
    assert _check_splits(config, dest) == ["site_a", "site_b"]  # every one prepare added
    picked = replace(config, columns=("site_b",))
    assert _check_splits(picked, dest) == ["site_b"]
    plans = plan_runs(replace(config, magnifications=(None, 40)), ["site_a", "site_b"])
    assert [p.name for p in plans] == [
        "column-site_a-all",
        "column-site_b-all",
        "column-site_a-40x",
        "column-site_b-40x",
    ]
    assert [p.train.split for p in plans[:2]] == ["column:site_a", "column:site_b"]
    with pytest.raises(ValueError, match="no column 'site_c'; its columns: tile_id"):
        _check_splits(replace(config, columns=("site_c",)), dest)
    plain = PreparedDest(uri=dest.uri, manifest=manifest.replace_schema_metadata({}))
    with pytest.raises(ValueError, match="no user-defined split column; add one"):
        _check_splits(config, plain)


# --------------------------------------------------------------------------- a real protocol


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    """Generated tiles (~235 images, 51 patients, 48x32 px), prepared with 2 folds (the
    evaluation tests' data)."""
    return make_prepared(scale=0.03, width=48, height=32, folds=2, repetitions=2, s3=True)


@pytest.mark.ray
@pytest.mark.slow
def test_protocol_trains_splits_concurrently_and_reports(prepared: str, tmp_path: Path) -> None:
    from breakhis.protocol.job import _finished_artifact

    config = ProtocolConfig(
        train=_train(tmp_path, data=prepared),
        scheme="fold",
        magnifications=(40,),
        evaluation=EvaluateOptions(bootstrap=100, correct_examples=4, thumbnail_size=32),
    )
    result = run_protocol(config)
    assert result.concurrency == 2  # ray_local: 4 CPUs, 2 per run
    assert [r.name for r in result.runs] == ["fold0-40x", "fold1-40x"]
    first, second = result.runs
    assert first.started < second.finished and second.started < first.finished  # overlapped
    # Mean +- std over the two folds of each run's own numbers.
    rates = [r.metrics["patient_recognition_rate"] for r in result.runs]
    mean = result.summary.mean["40@40"]["patient_recognition_rate"]
    assert mean == pytest.approx(sum(rates) / 2)
    assert result.summary.std["40@40"]["patient_recognition_rate"] == pytest.approx(
        abs(rates[0] - rates[1]) / math.sqrt(2)
    )
    assert result.cross_magnification.shape == (1, 4)
    # The two folds test every patient once.
    assert sum(r.test_patients for r in result.runs) == result.patients

    report = Path(config.report_dir)
    assert (report / "report.html").is_file() and (report / "metrics.json").is_file()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["protocol"]["splits"] == ["fold:0", "fold:1"]
    for run in result.runs:
        assert Path(run.report_html).is_file()  # each run's own evaluation report
        assert Path(run.artifact_uri, "model.json").is_file()
    # A finished run is not trained again with the same options, and is with other ones.
    plan = plan_runs(config, [0])[0]
    assert _finished_artifact(plan)
    assert not _finished_artifact(replace(plan, train=replace(plan.train, epochs=2)))
