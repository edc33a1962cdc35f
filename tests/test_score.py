"""The batch scoring job: one row per tile, errors kept, maps stored, exactly once."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from breakhis import storage
from breakhis.data.imaging import decode_rgb
from breakhis.model.artifact import ModelCard, load_artifact, read_card, save_artifact
from breakhis.model.networks import build_model
from breakhis.score.job import (
    JobMismatchError,
    ScoreConfig,
    patient_table,
    plan_units,
    run_scoring,
)
from breakhis.score.output import CLAIM_DEAD_S, STALE_TEMP_S
from breakhis.score.predict import PredictOptions, TilePredictor
from breakhis.synth.dataset import corrupt_files, synthesize

SIZE = 32  # the model's input side
MAP = 16


def _save_model(uri: str, **card_fields) -> ModelCard:
    torch.manual_seed(0)
    card = ModelCard(
        architecture="smallcnn",
        image_size=SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        **card_fields,
    )
    return save_artifact(uri, build_model("smallcnn").eval(), card)


def _make_tiles(root: str) -> dict[str, str]:
    """36 generated tiles (64x48) under ``root``: 32 good, 3 that do not decode, and a good
    one whose name is not a BreakHis name. Returns {uri: stage} of the broken ones."""
    synthesize(root, scale=0.001, seed=0, width=64, height=48, workers=1)
    return corrupt_files(root, seed=0)


@pytest.fixture(scope="module")
def local_job(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("score")
    _make_tiles(str(root / "tiles"))
    card = _save_model(str(root / "model"))
    return {"tiles": str(root / "tiles"), "model": str(root / "model"), "model_id": card.model_id}


def _plain_probabilities(model_uri: str, uris: list[str]) -> np.ndarray:
    """The malignant probability computed by hand, outside Ray: what the job must match."""
    model, card = load_artifact(model_uri)
    images = np.stack([decode_rgb(storage.read_bytes(u), card.image_size) for u in uris])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[:, 1].numpy()


def _maps(table: pa.Table) -> np.ndarray:
    column = table.column("map").combine_chunks()
    side = math.isqrt(column.type.list_size)
    return column.flatten().to_numpy().reshape(len(column), side, side)


def _joined(output: str) -> pa.Table:
    """predictions/ with each tile's row of attributions/ (null where none), by uri."""
    fs, path = storage.resolve(f"{output}/predictions")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    fs, path = storage.resolve(f"{output}/attributions")
    if not storage.exists(f"{output}/attributions"):
        return table.sort_by("uri")
    maps = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    # pyarrow's join carries no fixed-size list: join row numbers, then take.
    index = maps.select(["tile_id"]).append_column("row", pa.array(range(maps.num_rows)))
    table = table.join(index, "tile_id", join_type="left outer")
    rows = table["row"]
    for name in ("method", "target", "map", "scale", "overlay_uri"):
        table = table.append_column(name, maps[name].take(rows))
    return table.drop_columns(["row"]).sort_by("uri")


# --------------------------------------------------------------------------- without Ray


def test_config_refuses_bad_options() -> None:
    base = {"model": "m", "input": "s3://archive/tiles", "out": "s3://bucket/scores"}
    with pytest.raises(ValueError, match="accepted: gradcam, integrated_gradients, ig"):
        ScoreConfig(**base, predict=PredictOptions(attribution="shap"))
    with pytest.raises(ValueError, match="overlap"):
        ScoreConfig(**{**base, "out": "s3://archive/tiles/scores"})
    with pytest.raises(ValueError, match="--overlays needs"):
        ScoreConfig(**base, predict=PredictOptions(attribution="none"), overlays=True)
    with pytest.raises(ValueError, match="--unit-size must be an integer >= 0"):
        ScoreConfig(**base, unit_size=-1)
    assert PredictOptions(attribution="ig").method == "integrated_gradients"
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1"):
        PredictOptions(batch_size=0)
    with pytest.raises(ValueError, match="--threshold must be in"):
        PredictOptions(threshold=1.0)


def test_units_are_named_by_their_members() -> None:
    table = pa.table({"uri": [f"/t/{i:03d}.png" for i in range(10)][::-1]})
    units = plan_units(table, 4)
    assert [u.members.num_rows for u in units] == [4, 4, 2]
    assert units[0].members.column("uri").to_pylist()[0] == "/t/000.png"
    names = [u.name for u in units]
    assert names == [u.name for u in plan_units(table, 4)]
    assert names[0].startswith("unit-00000-") and names[0].endswith(".parquet")
    # One tile fewer at the start shifts every unit: none keeps its name.
    changed = plan_units(table.filter(pa.compute.not_equal(table["uri"], "/t/000.png")), 4)
    assert not {u.name for u in changed} & set(names)


def test_patient_table_calls_on_the_mean_probability() -> None:
    tiles = pa.table(
        {
            "patient_id": ["p1", "p1", "p1", "p2", "p3"],
            "label": pa.array([1, 1, 1, 0, None], pa.int8()),
            "prob_malignant": pa.array([0.9, 0.3, None, 0.2, None], pa.float32()),
            "predicted_label": pa.array([1, 0, None, 0, None], pa.int8()),
            "error": [None, None, "decode: empty file (0 bytes)", None, "read: gone"],
        }
    )
    rows = {r["patient_id"]: r for r in patient_table(tiles, 0.5).to_pylist()}
    assert rows["p1"]["tiles"] == 3 and rows["p1"]["scored"] == 2 and rows["p1"]["errors"] == 1
    assert rows["p1"]["mean_prob_malignant"] == pytest.approx(0.6)
    assert rows["p1"]["frac_predicted_malignant"] == pytest.approx(0.5)
    assert rows["p1"]["patient_call"] == "malignant" and rows["p1"]["label"] == 1
    assert rows["p2"]["patient_call"] == "benign"
    assert rows["p3"]["patient_call"] is None and rows["p3"]["mean_prob_malignant"] is None


def test_patient_table_calls_by_majority_when_asked() -> None:
    tiles = pa.table(
        {
            "patient_id": ["p1", "p1", "p1"],
            "label": pa.array([1, 1, 1], pa.int8()),
            "prob_malignant": pa.array([0.99, 0.4, 0.45], pa.float32()),
            "predicted_label": pa.array([1, 0, 0], pa.int8()),
            "error": [None, None, None],
        }
    )
    # Mean 0.61: malignant by the mean, benign by the majority of tile calls (1 of 3).
    assert patient_table(tiles, 0.5, "mean").column("patient_call").to_pylist() == ["malignant"]
    assert patient_table(tiles, 0.5, "majority").column("patient_call").to_pylist() == ["benign"]


def test_the_automatic_unit_size_holds_about_32_mb_of_decoded_tiles(local_job) -> None:
    card = read_card(local_job["model"])  # 32 px
    height, width = card.tile_geometry.eval_hw
    base = {"model": local_job["model"], "input": local_job["tiles"], "out": "/tmp/x"}
    plain = ScoreConfig(**base, predict=PredictOptions(attribution="none"))
    assert plain.unit_size_for(card) == 8192  # tiny tiles: the most
    gradcam = ScoreConfig(**base)  # 64 x 64 float32 maps too
    assert gradcam.unit_size_for(card) == 32 * 2**20 // (height * width * 3 + 4 * 64 * 64)
    big = replace(card, image_size=224)
    assert plain.unit_size_for(big) == 256  # 224 px tiles: the fewest
    assert ScoreConfig(**base, unit_size=8).unit_size_for(card) == 8
    assert plain.job_record(card)["unit_size"] == 8192


def test_predictor_applies_the_model_temperature(local_job, tmp_path) -> None:
    hot = str(tmp_path / "hot")
    _save_model(hot, temperature=4.0, threshold=0.3, threshold_rule="balanced_accuracy")
    rng = np.random.default_rng(1)
    batch = {
        "uri": np.array(["a", "b"], dtype=object),
        "tile_id": np.array(["a", "b"], dtype=object),
        "unit": np.zeros(2, np.int32),
        "image": rng.integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8),
        "error": np.array(["", ""], dtype=object),
    }
    plain = _predictor(local_job["model"], method=None)(batch)
    scaled = _predictor(hot, method=None)(batch)
    # Same weights: the raw probabilities agree; the calibrated ones are the softmax of
    # the logits divided by 4, i.e. sigmoid(margin / 4) with margin = logit(p).
    assert np.allclose(scaled["prob_uncalibrated"], plain["prob"], atol=1e-6)
    margin = np.log(plain["prob"] / (1 - plain["prob"]))
    assert np.allclose(scaled["prob"], 1 / (1 + np.exp(-margin / 4.0)), atol=1e-5)
    # Scoring takes the model's threshold unless one is given.
    config = ScoreConfig(model=hot, input=local_job["tiles"], out=str(tmp_path / "out"))
    assert config.job_record(read_card(hot))["threshold"] == 0.3
    seven = replace(config, predict=PredictOptions(threshold=0.7))
    assert seven.job_record(read_card(hot))["threshold"] == 0.7


def _predictor(model_uri: str, **overrides) -> TilePredictor:
    options = dict(
        model_uri=model_uri,
        method="gradcam",
        map_size=MAP,
        tta=False,
        threshold=0.5,
        device="cpu",
        torch_threads=1,
        overlay_root=None,
        ig_steps=4,
        occlusion_window=0,
        lime_samples=8,
        lime_grid=4,
    )
    return TilePredictor(**{**options, **overrides})


def test_overlay_names_never_leave_the_output(local_job, tmp_path) -> None:
    # Tile ids come from the input: a crafted prepared shard can hold any string.
    ids = [
        "../../../../elsewhere/PWNED",
        "/abs/PWNED",
        "..",
        "scanner1/slide7/tile_0001.jpg",
        "scanner1_slide7_tile_0001.jpg",
        "SOB_B_A-14-22549AB-40-001",
    ]
    output = tmp_path / "deep" / "er" / "out"
    overlays = output / "overlays"
    batch = {
        "uri": np.array([f"u{i}" for i in range(len(ids))], dtype=object),
        "tile_id": np.array(ids, dtype=object),
        "unit": np.zeros(len(ids), np.int32),
        "image": np.random.default_rng(2).integers(0, 255, (len(ids), SIZE, SIZE, 3), np.uint8),
        "error": np.array([""] * len(ids), dtype=object),
    }
    out = _predictor(local_job["model"], overlay_root=str(overlays))(batch)
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.parent == overlays for p in written), written
    assert len(written) == len(ids) == len(set(out["overlay"]))  # one file per tile
    assert sorted(str(p) for p in written) == sorted(out["overlay"])
    assert str(overlays / "SOB_B_A-14-22549AB-40-001.png") in out["overlay"]  # plain: kept
    # Stable: the same id gets the same name on a rerun.
    again = _predictor(local_job["model"], overlay_root=str(overlays))(batch)
    assert list(again["overlay"]) == list(out["overlay"])


def test_predictor_tta_is_invariant_to_flips_and_rotations(local_job) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    views = np.stack([image, np.rot90(image), np.flip(image, 1), np.rot90(image, 3)])
    batch = {
        "uri": np.array(["a", "b", "c", "d", "e"], dtype=object),
        "tile_id": np.array(["a", "b", "c", "d", "e"], dtype=object),
        "unit": np.zeros(5, np.int32),
        "image": np.concatenate([views, np.zeros((1, SIZE, SIZE, 3), np.uint8)]),
        "error": np.array(["", "", "", "", "decode: empty file (0 bytes)"], dtype=object),
    }
    plain = _predictor(local_job["model"])(batch)
    with_tta = _predictor(local_job["model"], tta=True)(batch)
    assert np.allclose(with_tta["prob"][:4], with_tta["prob"][0], atol=1e-6)
    assert not np.allclose(plain["prob"][:4], plain["prob"][0], atol=1e-6)
    for out in (plain, with_tta):
        assert math.isnan(out["prob"][4]) and out["target"][4] == -1
        assert out["map"].shape == (5, MAP, MAP) and out["map"].dtype == np.float32
        assert np.abs(out["map"][:4]).max() == 1.0  # each map divided by its peak
        assert (out["map"][4] == 0).all() and out["error"][4].startswith("decode")


def _head_inputs(model_uri: str, images: np.ndarray) -> np.ndarray:
    """What a SmallCNN's head takes, computed by hand: pooled features of the normalised
    tiles (the embedding ``--features`` must write)."""
    model, card = load_artifact(model_uri)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(card.mean).view(1, 3, 1, 1)) / torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.flatten(model.pool(model.features(x)), 1).numpy()


@pytest.mark.parametrize("method", [None, "gradcam", "integrated_gradients"])
def test_the_embedding_is_the_head_input_of_the_pass_that_gave_the_probabilities(
    local_job, method
) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    batch = {
        "uri": np.array(list("abcd"), dtype=object),
        "tile_id": np.array(list("abcd"), dtype=object),
        "unit": np.zeros(4, np.int32),
        "image": images,
        "error": np.array(["", "", "decode: empty file (0 bytes)", ""], dtype=object),
    }
    out = _predictor(local_job["model"], method=method, features=True)(batch)
    expected = _head_inputs(local_job["model"], images[[0, 1, 3]])
    assert out["embedding"].shape == (4, 128) and out["embedding"].dtype == np.float32
    assert np.allclose(out["embedding"][[0, 1, 3]], expected, atol=1e-5)
    assert np.isnan(out["embedding"][2]).all()  # an error row has none
    # The attribution's own forward passes (integrated gradients: many) are not captured,
    # and the probabilities are those without --features.
    plain = _predictor(local_job["model"], method=method)(batch)
    assert "embedding" not in plain
    assert np.allclose(out["prob"], plain["prob"], equal_nan=True)
    if method is None:  # with TTA: the mean over the eight views, as the probabilities
        tta = _predictor(local_job["model"], method=None, tta=True, features=True)(batch)
        views = [np.rot90(images[[0, 1, 3]], k, axes=(1, 2)) for k in range(4)]
        views += [np.flip(v, axis=2) for v in views]
        mean = np.mean([_head_inputs(local_job["model"], v.copy()) for v in views], axis=0)
        assert np.allclose(tta["embedding"][[0, 1, 3]], mean, atol=1e-5)


def test_a_rerun_adding_features_is_refused_naming_it(local_job, tmp_path) -> None:
    config = ScoreConfig(model=local_job["model"], input=local_job["tiles"], out=str(tmp_path))
    card = read_card(local_job["model"])
    assert "features" not in config.job_record(card)  # records of earlier jobs unchanged
    assert replace(config, features=True).job_record(card)["features"] is True
    (tmp_path / "_job.json").write_text(json.dumps(config.job_record(card)))
    with pytest.raises(JobMismatchError, match="features"):
        run_scoring(replace(config, features=True))
    with pytest.raises(ValueError, match="--feature-file-mb must be an integer >= 1"):
        replace(config, feature_file_mb=0)


def test_rerun_with_other_options_is_refused_before_any_work(local_job, tmp_path) -> None:
    config = ScoreConfig(model=local_job["model"], input=local_job["tiles"], out=str(tmp_path))
    lime = replace(config, predict=PredictOptions(attribution="lime"))
    other = lime.job_record(read_card(local_job["model"]))
    (tmp_path / "_job.json").write_text(json.dumps(other))
    with pytest.raises(JobMismatchError, match="attribution: 'lime' there, 'gradcam' now"):
        run_scoring(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_job.json"]


# --------------------------------------------------------------------------- on Ray


@pytest.mark.ray
@pytest.mark.slow
def test_s3_job_one_row_per_tile_errors_maps_and_readers(s3_prefix, ray_local) -> None:
    tiles, model, output = f"{s3_prefix}/in", f"{s3_prefix}/model", f"{s3_prefix}/scores"
    bad = _make_tiles(tiles)
    card = _save_model(model)
    original = (
        f"{tiles}/BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/"
        "SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png"
    )
    copy = f"{tiles}/copies/same-tile.png"  # the same bytes at another URI
    storage.write_bytes(copy, storage.read_bytes(original))
    inputs = [e.uri for e in storage.walk(tiles)]
    config = ScoreConfig(
        model=model,
        input=tiles,
        out=output,
        unit_size=8,
        predict=PredictOptions(map_size=MAP, batch_size=8, num_actors=1),
        overlays=True,
    )
    summary = run_scoring(config)
    assert (summary.tiles, summary.errors, summary.scored) == (37, 3, 34)
    assert summary.units == summary.units_written == 5 and summary.patients == 7
    assert (summary.prediction_files, summary.attribution_files) == (1, 1)

    table = _joined(output)
    assert table.column("uri").to_pylist() == sorted(inputs)  # one row each: no gap, no dup
    assert table.schema.field("map").type == pa.list_(pa.float32(), MAP * MAP)
    rows = {r["uri"]: r for r in table.drop_columns(["map"]).to_pylist()}
    broken = {u for u, stage in bad.items() if stage == "decode"}
    for uri, row in rows.items():
        if uri in broken:
            assert row["error"].startswith("decode: ")
            assert row["prob_malignant"] is None and row["predicted_label"] is None
            assert row["method"] is None and row["overlay_uri"] is None
        else:
            assert row["error"] is None
            assert 0.0 <= row["prob_malignant"] <= 1.0
            assert row["prob_benign"] == pytest.approx(1.0 - row["prob_malignant"], abs=1e-6)
            assert row["predicted_label"] == int(row["prob_malignant"] >= 0.5)
            assert row["threshold"] == 0.5 and row["target"] == row["predicted_label"]
            assert row["method"] == "gradcam" and row["model_id"] == card.model_id
            png = Image.open(io.BytesIO(storage.read_bytes(row["overlay_uri"])))
            assert png.size == (SIZE, SIZE)  # what the model saw
    unparsed = next(u for u, stage in bad.items() if stage == "parse")
    assert rows[unparsed]["error"] is None and rows[unparsed]["patient_id"] is None

    scored = table.filter(pa.compute.is_null(table["error"]))
    maps = _maps(scored)
    assert maps.shape == (34, MAP, MAP)
    assert (maps.reshape(34, -1).std(axis=1) > 0).all(), "a map is constant"
    assert np.allclose(np.abs(maps).reshape(34, -1).max(axis=1), 1.0)
    failed = table.filter(pa.compute.is_valid(table["error"]))
    assert failed.num_rows == 3 and failed["map"].null_count == 3  # no map for an error

    # Scoring the same tile twice gives the same prediction and map.
    twin = scored.filter(pa.compute.is_in(scored["uri"], pa.array([original, copy])))
    assert twin.num_rows == 2
    assert twin["prob_malignant"][0].as_py() == pytest.approx(
        twin["prob_malignant"][1].as_py(), abs=1e-6
    )
    assert np.allclose(_maps(twin)[0], _maps(twin)[1], atol=2e-3)

    fs, path = storage.resolve(f"{output}/predictions")
    frame = pd.read_parquet(path, filesystem=fs).sort_values("uri").reset_index(drop=True)
    assert len(frame) == 37 and frame["uri"].is_unique
    fs, path = storage.resolve(f"{output}/attributions")
    frame = frame.merge(pd.read_parquet(path, filesystem=fs), on="tile_id", how="left")
    first = frame.index[frame["uri"] == original][0]
    assert np.array_equal(frame.at[first, "map"].reshape(MAP, MAP), _maps(twin)[0])
    assert frame.loc[frame["uri"].isin(broken), "method"].isna().all()

    fs, path = storage.resolve(f"{output}/patients.parquet")
    patients = pd.read_parquet(path, filesystem=fs)
    assert patients["tiles"].sum() == sum(r["patient_id"] is not None for r in rows.values())
    assert set(patients["patient_call"]) <= {"benign", "malignant"}
    assert storage.exists(f"{output}/_SUCCESS")

    again = run_scoring(config)
    assert (again.units_written, again.units_skipped, again.tiles) == (0, 5, 37)
    with pytest.raises(JobMismatchError, match="tta: False there, True now"):
        run_scoring(replace(config, predict=replace(config.predict, tta=True)))


_KILLABLE_JOB = textwrap.dedent(
    """
    import sys, ray
    from breakhis.score.predict import PredictOptions
    from breakhis.score.job import ScoreConfig, run_scoring

    ray.init(address=sys.argv[2], log_to_driver=False)
    options = eval(sys.argv[1])
    predict = PredictOptions(**options.pop("predict"))
    run_scoring(ScoreConfig(**options, predict=predict))
    """
)


def _units_settled(folder, seconds: float = 4.0) -> set[str]:
    """The unit files once their number has not changed for ``seconds``."""
    names, since = set(), time.monotonic()
    while time.monotonic() - since < seconds:
        now = {p.name for p in folder.glob("unit-*.parquet")}
        if now != names:
            names, since = now, time.monotonic()
        time.sleep(0.2)
    return names


@pytest.mark.ray
@pytest.mark.slow
def test_killed_job_resumes_with_no_duplicate_and_no_gap(local_job, tmp_path, ray_local) -> None:
    """A job on a prepared DEST (LIME maps) killed part-way, then run again to the end."""
    import ray

    from breakhis.data.dest import read_manifest
    from breakhis.data.prepare import PrepareConfig, prepare

    dest = str(tmp_path / "prepared")
    prepare(
        PrepareConfig(
            src=local_job["tiles"],
            dest=dest,
            folds=2,
            repetitions=1,
            shard_mb=0.02,
            row_group_rows=4,
        )
    )
    output = tmp_path / "scores"
    options = dict(
        model=local_job["model"],
        input=dest,
        out=str(output),
        unit_size=2,
        predict=dict(
            batch_size=2, num_actors=1, map_size=8, attribution="lime", lime_samples=16, lime_grid=4
        ),
    )
    log = tmp_path / "job.log"
    tiles_dir = output / "_units"  # the journal: one file per unit, until compaction
    # A second driver on the session's cluster, killed by its PID once 3 units are written;
    # Ray then ends its actors (the workers write the units: some may land meanwhile).
    address = ray.get_runtime_context().gcs_address
    with log.open("w") as out:
        job = subprocess.Popen(
            [sys.executable, "-c", _KILLABLE_JOB, repr(options), address],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while len(list(tiles_dir.glob("unit-*.parquet"))) < 3 and time.monotonic() < deadline:
            assert job.poll() is None, f"the job ended early: {log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        job.kill()
        job.wait()
    before = {name: (tiles_dir / name).stat() for name in _units_settled(tiles_dir)}
    assert 3 <= len(before) < 16, f"{len(before)} units: {log.read_text()[-3000:]}"
    assert not (output / "_SUCCESS").exists()
    # What a writer killed between write and rename leaves: a temp file named by its job's
    # token. A stale one is deleted by the rerun; a fresh one may be a live job's: kept.
    stale, fresh = tiles_dir / ".unit-00015-x.parquet.dead.tmp", tiles_dir / ".unit-1.tmp"
    for temp in (stale, fresh):
        temp.write_bytes(b"PAR1 half a file")
    past = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (past, past))
    assert pq.read_table(tiles_dir).num_rows == 2 * len(before)  # readers skip temp files

    predict = PredictOptions(**options.pop("predict"))
    config = ScoreConfig(**options, predict=predict)
    # The killed job's claim is fresh: as far as a rerun can tell, that job still runs.
    with pytest.raises(JobMismatchError, match="is being claimed by another scoring job"):
        run_scoring(config)
    (killed,) = (output / "_claims").iterdir()
    past = time.time() - CLAIM_DEAD_S - 5  # as if the rerun came CLAIM_DEAD_S later
    os.utime(killed, (past, past))
    summary = run_scoring(config)
    # Finished units are kept, not scored again.
    assert (summary.units, summary.units_skipped) == (16, len(before))
    assert summary.units_written == 16 - len(before)
    # Compacted: one file a table, the journal's unit files gone (a fresh temp file kept).
    assert (summary.prediction_files, summary.attribution_files) == (1, 1)
    assert sorted(p.name for p in tiles_dir.iterdir()) == [fresh.name]
    assert not stale.exists() and fresh.exists()
    # The rerun's plan and claim are gone, and so are the killed job's (its claim was dead).
    assert not (output / "_plan").exists() and not (output / "_claims").exists()

    table = _joined(str(output))
    manifest = read_manifest(dest).sort_by("uri")
    assert table.num_rows == manifest.num_rows == 32  # prepare left out the 4 broken files
    assert table.column("uri").to_pylist() == manifest.column("uri").to_pylist()
    assert table.column("tile_id").to_pylist() == manifest.column("tile_id").to_pylist()
    assert table["error"].null_count == 32 and (output / "_SUCCESS").exists()
    # The pipeline's probabilities are a plain torch loop's over the same files.
    expected = _plain_probabilities(local_job["model"], table.column("uri").to_pylist())
    assert np.allclose(table.column("prob_malignant").to_numpy(), expected, atol=1e-5)
    maps = _maps(table)
    assert maps.shape == (32, 8, 8)
    assert (maps.reshape(32, -1).std(axis=1) > 0).all(), "a map is constant"
    assert set(table.column("method").to_pylist()) == {"lime"}
