"""The scoring job (and prepare) under faults: transient storage errors are retried and never
stored as results, one poison tile neither blocks nor hangs a job, an artifact replaced
mid-job does not mix models. Faults are injected at the storage layer and in the workers by
breakhis.faults (test-only hooks, set through the environment of the process or Ray job)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from test_score import _make_tiles, _plain_probabilities, _save_model

from breakhis import faults, storage
from breakhis.data.geometry import TileGeometry
from breakhis.data.inputs import discover_inputs
from breakhis.data.tile_decode import decode_tiles
from breakhis.model.artifact import ModelCard, read_card, save_artifact
from breakhis.model.networks import build_model
from breakhis.score.predict import PredictOptions

SIZE = 32


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    return {
        "uri": np.asarray(uris, dtype=object),
        "tile_id": np.asarray(uris, dtype=object),
        "unit": np.zeros(len(uris), np.int32),
        "shard": np.asarray([None] * len(uris), dtype=object),
    }


def _inject(monkeypatch, rules: dict) -> None:
    monkeypatch.setenv(faults.READ_FAULTS_ENV, json.dumps(rules))
    faults._raised.clear()
    monkeypatch.setattr(storage, "READ_BACKOFF_S", 0.01)


@pytest.fixture(scope="module")
def s3_tiles(s3_server) -> list[str]:
    """Three good tiles on the S3 server."""
    import uuid

    root = f"s3://test/{uuid.uuid4().hex}/tiles"
    broken = _make_tiles(root)
    uris = discover_inputs(root).table.column("uri").to_pylist()
    return [u for u in uris if u not in broken][:3]


# --------------------------------------------------------------------------- without Ray


def test_storage_tells_transient_from_permanent_errors() -> None:
    transient = [
        "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Please reduce your "
        "request rate.",
        "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.",
        "AWS Error THROTTLING during HeadObject operation: Rate exceeded",
        "AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an internal error",
        "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was "
        "reached",
    ]
    permanent = [
        "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
        "AWS Error UNKNOWN (HTTP status 400) during GetObject operation: Bad Request",
    ]
    assert all(storage.is_transient(OSError(f"When reading x: {t}")) for t in transient)
    assert not any(storage.is_transient(OSError(f"When reading x: {p}")) for p in permanent)
    assert storage.is_transient(storage.S3UnreachableError("no answer"))
    assert not storage.is_transient(FileNotFoundError("s3://b/k: no such file"))
    assert not storage.is_transient(ValueError("decode: not a PNG"))


def test_tile_reads_retry_transient_errors_and_never_store_them(s3_tiles, monkeypatch) -> None:
    good, flaky, other = s3_tiles
    # Throttled twice, then answered: the tile decodes, no error row.
    _inject(monkeypatch, {flaky: ["slowdown", 2]})
    out = decode_tiles(_batch([good, flaky]), geometry=TileGeometry(size=SIZE))
    assert list(out["error"]) == ["", ""] and out["image"][1].any()
    # Throttled, or no answer, on every attempt: the task fails (to be retried or rerun)
    # instead of returning a `read:` error row that no rerun would ever retry.
    for kind in ("slowdown", "unreachable"):
        _inject(monkeypatch, {flaky: kind})
        with pytest.raises(storage.TransientStorageError, match="after 4 attempts"):
            decode_tiles(_batch([good, flaky]), geometry=TileGeometry(size=SIZE))
    # Permanent: refused (403) or missing (a real NoSuchKey): error rows, the rest scored.
    _inject(monkeypatch, {other: "denied"})
    missing = f"{good.rsplit('/', 1)[0]}/gone.png"
    out = decode_tiles(_batch([good, other, missing]), geometry=TileGeometry(size=SIZE))
    assert out["error"][0] == ""
    assert out["error"][1].startswith("read: ") and "ACCESS_DENIED" in out["error"][1]
    assert out["error"][2] == f"read: {missing}: no such file"


def test_a_tile_over_the_size_cap_is_an_error_row_and_not_read(tmp_path, monkeypatch) -> None:
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    _make_tiles(str(tmp_path / "tiles"))
    source = sorted((tmp_path / "tiles").rglob("SOB_*-001.png"))[0]
    shutil.copy(source, small)
    big.write_bytes(b"\0" * (3 * 2**20 // 2))  # 1.5 MiB
    out = decode_tiles(
        _batch([str(small), str(big)]), geometry=TileGeometry(size=SIZE), max_tile_bytes=2**20
    )
    assert out["error"][0] == ""
    assert out["error"][1] == (f"read: {big}: 1.5 MiB, over the cap of 1.0 MiB (--max-tile-mb)")
    with pytest.raises(ValueError, match="--max-tile-mb must be an integer >= 1"):
        PredictOptions(max_tile_mb=0)
    assert PredictOptions().max_tile_bytes == 64 * 2**20


def test_prepare_fails_its_task_on_transient_errors_instead_of_rejecting(
    tmp_path, monkeypatch
) -> None:
    from breakhis.data.catalog import scan_catalog
    from breakhis.data.prepare import plan_shards, write_shard

    _make_tiles(str(tmp_path / "raw"))
    plan = plan_shards(scan_catalog(str(tmp_path / "raw")).table, shard_mb=1000)[0]
    victim = plan.rows[0]["uri"]
    _inject(monkeypatch, {victim: "slowdown"})
    with pytest.raises(storage.TransientStorageError, match=victim):
        write_shard(plan, str(tmp_path / "a" / "shards"), 16)
    assert not (tmp_path / "a" / "shards").exists()  # nothing written, nothing rejected
    _inject(monkeypatch, {victim: "denied"})  # permanent: a reject, as before
    result = write_shard(plan, str(tmp_path / "b" / "shards"), 16)
    assert [(r.uri, r.stage) for r in result.rejects if r.uri == victim] == [(victim, "read")]


def test_actors_score_with_the_artifact_they_are_given_and_refuse_another(tmp_path) -> None:
    from breakhis.model.artifact import read_artifact
    from breakhis.score.predict import predictor_kwargs
    from breakhis.score.units import UnitFormat, UnitTilePredictor

    checked = _save_model(str(tmp_path / "a"))
    torch.manual_seed(1)
    card = ModelCard(architecture="smallcnn", image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
    other = save_artifact(str(tmp_path / "b"), build_model("smallcnn").eval(), card)
    kwargs = predictor_kwargs(
        str(tmp_path / "b"), 0.5, "cpu", PredictOptions(attribution="none", torch_threads=1)
    )
    pinned = {**kwargs, "artifact": read_artifact(str(tmp_path / "a"))}
    fmt = UnitFormat(str(tmp_path / "t"), "t", "m", checked.model_id, 1, None, 4, 0.5, False, 32)
    actor = UnitTilePredictor(unit_format=fmt, batch_size=4, **pinned)
    assert actor.predictor.model_id == actor.format.model_id == checked.model_id
    # Weights other than the ones the job checked: the actor refuses to score.
    with pytest.raises(RuntimeError, match=f"loaded weights {other.model_id}, the job checked"):
        UnitTilePredictor(unit_format=fmt, batch_size=4, **kwargs)


# --------------------------------------------------------------------------- on Ray

_DRIVER = textwrap.dedent(
    """
    import json, sys, ray
    from breakhis.score.predict import PredictOptions
    from breakhis.score.job import ScoreConfig, run_scoring

    options, env = json.loads(sys.argv[1]), json.loads(sys.argv[3])
    ray.init(address=sys.argv[2], log_to_driver=False, runtime_env={"env_vars": env})
    predict = PredictOptions(**options.pop("predict"))
    print("summary", run_scoring(ScoreConfig(**options, predict=predict)))
    """
)


def _run_driver(options: dict, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """A scoring job from a second driver on the session's cluster, its workers with ``env``
    (the fault hooks) in their environment."""
    import ray

    address = ray.get_runtime_context().gcs_address
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(options), address, json.dumps(env)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(output: str) -> dict[str, dict]:
    fs, path = storage.resolve(f"{output}/predictions")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    return {r["uri"]: r for r in table.to_pylist()}


def _options(model: str, tiles: str, output: str, **predict) -> dict:
    return {
        "model": model,
        "input": tiles,
        "out": output,
        "unit_size": 8,
        "predict": {"attribution": "none", "batch_size": 8, "num_actors": 1, **predict},
    }


@pytest.mark.ray
@pytest.mark.slow
def test_transient_read_errors_fail_the_job_and_a_rerun_scores_the_tile(
    s3_prefix, ray_local
) -> None:
    tiles, model, output = f"{s3_prefix}/in", f"{s3_prefix}/model", f"{s3_prefix}/scores"
    broken = _make_tiles(tiles)
    _save_model(model)
    victim = [u for u in discover_inputs(tiles).table.column("uri").to_pylist() if u not in broken][
        5
    ]
    options = _options(model, tiles, output)
    env = {faults.READ_FAULTS_ENV: json.dumps({victim: "slowdown"})}  # S3 throttling it
    done = _run_driver(options, env, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "TransientStorageError" in done.stderr and victim in done.stderr
    assert not storage.exists(f"{output}/_SUCCESS")
    if storage.exists(f"{output}/_units"):  # other units may be written; never the victim
        fs, path = storage.resolve(f"{output}/_units")
        journal = pads.dataset(path, filesystem=fs, format="parquet").to_table()
        assert victim not in journal["uri"].to_pylist()
    assert not storage.exists(f"{output}/predictions")  # nothing compacted
    # The throttling is over: a rerun scores the tile, as any other.
    from breakhis.score.job import ScoreConfig, run_scoring

    predict = PredictOptions(**options.pop("predict"))
    summary = run_scoring(ScoreConfig(**options, predict=predict))
    rows = _rows(output)
    assert summary.tiles == len(rows) == 36 and rows[victim]["error"] is None
    assert summary.errors == 3  # only the three broken files of _make_tiles


@pytest.mark.ray
@pytest.mark.slow
def test_a_tile_that_kills_its_decoder_becomes_an_error_row(tmp_path, ray_local) -> None:
    tiles, model, output = tmp_path / "in", str(tmp_path / "model"), str(tmp_path / "scores")
    broken = _make_tiles(str(tiles))
    _save_model(model)
    (tiles / "huge.png").write_bytes(b"\0" * (3 * 2**20 // 2))  # over a 1 MiB cap
    listed = [r for r in discover_inputs(str(tiles)).table.to_pylist() if r["uri"] not in broken]
    poison, poison_id = listed[9]["uri"], listed[9]["tile_id"]
    options = _options(model, str(tiles), output, max_tile_mb=1)
    env = {faults.KILL_ENV: f"decode:{poison_id}"}
    done = _run_driver(options, env, timeout=400)  # before bounded retries: forever
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(output)
    assert len(rows) == 37 and storage.exists(f"{output}/_SUCCESS")
    assert rows[poison]["error"].startswith("decode: the worker decoding this tile died")
    assert rows[poison]["prob_malignant"] is None
    assert rows[str(tiles / "huge.png")]["error"] == (
        f"read: {tiles / 'huge.png'}: 1.5 MiB, over the cap of 1.0 MiB (--max-tile-mb)"
    )
    # The poison's unit mates scored as usual, with no other error than the known ones.
    assert sum(r["error"] is not None for r in rows.values()) == 5  # 3 broken, huge, poison
    assert not (tmp_path / "scores" / "_plan").exists()  # the attempts went with the plan


@pytest.mark.ray
@pytest.mark.slow
def test_a_tile_that_kills_its_model_actor_fails_the_job_instead_of_hanging(
    tmp_path, ray_local
) -> None:
    tiles, model, output = tmp_path / "in", str(tmp_path / "model"), str(tmp_path / "scores")
    _make_tiles(str(tiles))
    _save_model(model)
    poison_id = discover_inputs(str(tiles)).table.column("tile_id")[3].as_py()
    env = {faults.KILL_ENV: f"score:{poison_id}"}
    done = _run_driver(_options(model, str(tiles), output), env, timeout=400)
    assert done.returncode != 0, done.stdout[-2000:]
    assert not (tmp_path / "scores" / "_SUCCESS").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_model_replaced_mid_job_does_not_reach_the_actors(
    tmp_path, ray_local, monkeypatch
) -> None:
    """The artifact is rewritten (another model, same URI) after the driver checked it and
    before any actor loads it, as a retrain or a sweep's `best/` rewrite would."""
    import breakhis.score.job as score

    tiles, model, output = str(tmp_path / "in"), str(tmp_path / "model"), str(tmp_path / "out")
    _make_tiles(tiles)
    checked = _save_model(model)
    shutil.copytree(model, tmp_path / "original")
    torch.manual_seed(1)
    other = build_model("smallcnn").eval()
    list_inputs = score.list_inputs

    def replace_model_then_list(uri: str):
        card = ModelCard(architecture="smallcnn", image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
        replaced = save_artifact(model, other, card)
        assert replaced.model_id != checked.model_id
        return list_inputs(uri)

    monkeypatch.setattr(score, "list_inputs", replace_model_then_list)
    summary = score.run_scoring(
        score.ScoreConfig(
            model=model,
            input=tiles,
            out=output,
            unit_size=8,
            predict=PredictOptions(attribution="none", batch_size=8, num_actors=1),
        )
    )
    assert summary.model_id == checked.model_id
    assert read_card(model).model_id != checked.model_id  # replaced indeed
    rows = {u: r for u, r in _rows(output).items() if r["error"] is None}
    assert {r["model_id"] for r in rows.values()} == {checked.model_id}
    # The probabilities are those of the model the driver checked, not of the new one.
    uris = sorted(rows)
    expected = _plain_probabilities(str(tmp_path / "original"), uris)
    got = np.array([rows[u]["prob_malignant"] for u in uris])
    assert np.allclose(got, expected, atol=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_killed_while_compacting_shows_no_partial_file_and_resumes(
    tmp_path, ray_local
) -> None:
    """The worker writing the second predictions file dies (every attempt): the job fails
    before its manifest; a rerun scores nothing again, compacts anew and leaves exactly the
    manifest's large files, one row per tile and one map per scored tile."""
    from breakhis.score.job import ScoreConfig, run_scoring

    tiles, model, output = tmp_path / "in", str(tmp_path / "model"), tmp_path / "scores"
    broken = _make_tiles(str(tiles))
    _save_model(model)
    options = {
        **_options(model, str(tiles), str(output), attribution="gradcam", map_size=8),
        "file_rows": 16,  # 36 tiles in units of 8: files of 16, 16 and 4 rows
    }
    done = _run_driver(options, {faults.KILL_ENV: "compact:predictions-00001"}, timeout=400)
    assert done.returncode != 0, done.stdout[-2000:]
    assert not (output / "_SUCCESS").exists() and not (output / "_manifest.json").exists()
    assert len(list((output / "_units").glob("unit-*.parquet"))) == 5  # the journal is whole
    for table in ("predictions", "attributions"):  # what a reader sees: whole files only
        for path in (output / table).glob("*.parquet"):
            assert "part-00001-" not in path.name or table == "attributions"
            pq.read_table(path)  # a footer: a complete file

    predict = PredictOptions(**options.pop("predict"))
    summary = run_scoring(ScoreConfig(**options, predict=predict))
    assert (summary.units_written, summary.units_skipped) == (0, 5)
    assert (summary.prediction_files, summary.attribution_files) == (3, 1)
    manifest = json.loads((output / "_manifest.json").read_text())
    for table in ("predictions", "attributions"):
        named = sorted(entry["file"] for entry in manifest[table])
        assert sorted(p.name for p in (output / table).iterdir()) == named
    assert not (output / "_units").exists()
    rows = _rows(str(output))
    assert len(rows) == 36 and sum(r["error"] is not None for r in rows.values()) == 3
    maps = pq.read_table(output / "attributions")
    assert maps.num_rows == 33 == len(set(maps["tile_id"].to_pylist()))
    scored = {r["tile_id"] for r in rows.values() if r["error"] is None}
    assert set(maps["tile_id"].to_pylist()) == scored
    assert {u for u, r in rows.items() if r["error"]} == {
        u for u, stage in broken.items() if stage == "decode"
    }
    # A third run finds the manifest matching its plan: nothing scored, nothing rewritten.
    files = {p.name: p.stat().st_mtime_ns for p in (output / "predictions").iterdir()}
    again = run_scoring(ScoreConfig(**options, predict=predict))
    assert again.units_written == 0 and again.tiles == 36
    assert {p.name: p.stat().st_mtime_ns for p in (output / "predictions").iterdir()} == files
