"""Every common reader reads the tables of the scoring job's output, error rows included,
and joins them on the tile id with one map and one embedding per scored tile: pandas,
pyarrow, polars, DuckDB (from the Parquet files and from an Arrow table) and Ray Data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_score import MAP, _head_inputs, _make_tiles, _save_model

from breakhis import storage
from breakhis.data.imaging import decode_rgb
from breakhis.score.job import ScoreConfig, run_scoring
from breakhis.score.predict import PredictOptions

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_local) -> dict:
    """A real job's output over 36 tiles, 3 of which do not decode (error rows), its
    predictions in files of 16 rows (3 files), with maps and embeddings (--features)."""
    root = tmp_path_factory.mktemp("readers")
    bad = _make_tiles(str(root / "tiles"))
    _save_model(str(root / "model"))
    config = ScoreConfig(
        model=str(root / "model"),
        input=str(root / "tiles"),
        out=str(root / "scores"),
        unit_size=8,
        file_rows=16,
        features=True,
        predict=PredictOptions(map_size=MAP, batch_size=8, num_actors=1),
    )
    summary = run_scoring(config)
    assert (summary.tiles, summary.errors) == (36, 3)
    assert (summary.prediction_files, summary.attribution_files, summary.feature_files) == (3, 1, 1)
    broken = sorted(u for u, stage in bad.items() if stage == "decode")
    out = root / "scores"
    manifest = json.loads((out / "_manifest.json").read_text())
    tables = ("predictions", "attributions", "features")
    files = {t: sorted(e["file"] for e in manifest[t]) for t in tables}
    assert files == {t: sorted(p.name for p in (out / t).iterdir()) for t in files}
    assert not (out / "_units").exists()  # the journal went once compacted
    return {
        "predictions": str(out / "predictions"),
        "attributions": str(out / "attributions"),
        "features": str(out / "features"),
        "model": str(root / "model"),
        "broken": broken,
    }


def _check(uris: list, probs: list, broken: list[str]) -> None:
    """36 prediction rows: a null probability on the 3 error rows, [0, 1] elsewhere."""
    assert len(uris) == 36 == len(set(uris))
    bad = np.isin(np.asarray(uris, dtype=object), broken)
    assert bad.sum() == 3
    assert all(p is None or p != p for p, b in zip(probs, bad, strict=True) if b)  # null/NaN
    assert all(0.0 <= p <= 1.0 for p, b in zip(probs, bad, strict=True) if not b)


def _check_maps(maps: np.ndarray) -> None:
    """33 maps (one per scored tile), each scaled so that its largest |value| is 1."""
    assert maps.shape == (33, MAP, MAP) and maps.dtype == np.float32
    assert np.allclose(np.abs(maps).reshape(33, -1).max(axis=1), 1.0)


def test_pandas(scored) -> None:
    import pandas as pd

    predictions = pd.read_parquet(scored["predictions"])
    _check(predictions["uri"].tolist(), predictions["prob_malignant"].tolist(), scored["broken"])
    assert set(predictions.columns) >= {"prob_benign", "prob_malignant", "threshold", "tile_id"}
    scored_rows = predictions["error"].isna()
    assert np.allclose(
        predictions.loc[scored_rows, ["prob_benign", "prob_malignant"]].sum(axis=1), 1.0
    )
    maps = pd.read_parquet(scored["attributions"])
    _check_maps(np.stack(maps["map"].to_numpy()).reshape(-1, MAP, MAP))
    joined = predictions.merge(maps, on="tile_id", how="inner", validate="one_to_one")
    assert len(joined) == 33 and joined["error"].isna().all()
    assert (joined["target"] == joined["predicted_label"]).all()  # the call is explained


def _check_embeddings(scored, uris: list[str], embeddings: np.ndarray) -> None:
    """33 embeddings (one per scored tile), each the model's head input for its tile."""
    assert embeddings.shape == (33, 128) and embeddings.dtype == np.float32
    assert len(set(uris)) == 33 and not set(uris) & set(scored["broken"])
    images = np.stack([decode_rgb(storage.read_bytes(u), 32) for u in uris])
    assert np.allclose(embeddings, _head_inputs(scored["model"], images), atol=1e-5)


def test_pandas_features(scored) -> None:
    import pandas as pd

    predictions = pd.read_parquet(scored["predictions"])
    features = pd.read_parquet(scored["features"])
    assert list(features.columns) == ["tile_id", "embedding"]
    joined = predictions.merge(features, on="tile_id", how="inner", validate="one_to_one")
    assert len(joined) == 33 and joined["error"].isna().all()
    _check_embeddings(scored, joined["uri"].tolist(), np.stack(joined["embedding"].to_numpy()))
    (file,) = sorted(Path(scored["features"]).glob("*.parquet"))
    meta = json.loads(pq.read_schema(file).metadata[b"breakhis.score"])
    assert meta["features"]["dim"] == 128


def test_duckdb_features_from_parquet(scored) -> None:
    import duckdb

    rows = duckdb.sql(
        f"SELECT p.uri, f.embedding, len(f.embedding) AS dim "
        f"FROM read_parquet('{scored['predictions']}/*.parquet') p "
        f"JOIN read_parquet('{scored['features']}/*.parquet') f USING (tile_id) ORDER BY p.uri"
    ).fetchall()
    assert {r[2] for r in rows} == {128}
    embeddings = np.asarray([r[1] for r in rows], dtype=np.float32)
    _check_embeddings(scored, [r[0] for r in rows], embeddings)


def test_pyarrow(scored) -> None:
    predictions = pq.read_table(scored["predictions"])
    _check(
        predictions["uri"].to_pylist(),
        predictions["prob_malignant"].to_pylist(),
        scored["broken"],
    )
    maps = pq.read_table(scored["attributions"])
    column = maps.column("map").combine_chunks()
    _check_maps(column.flatten().to_numpy().reshape(len(column), MAP, MAP))
    # pyarrow's join (Acero) carries no fixed-size list: join the ids, then take the maps.
    index = maps.select(["tile_id"]).append_column("row", pa.array(range(maps.num_rows)))
    joined = predictions.join(index, "tile_id", join_type="inner")
    assert joined.num_rows == 33 and joined["error"].null_count == 33
    taken = maps["map"].take(joined["row"])
    assert taken.combine_chunks().flatten().to_numpy().reshape(33, MAP, MAP).shape[0] == 33


def test_polars(scored) -> None:
    import polars as pl

    predictions = pl.read_parquet(f"{scored['predictions']}/*.parquet")
    _check(predictions["uri"].to_list(), predictions["prob_malignant"].to_list(), scored["broken"])
    maps = pl.read_parquet(f"{scored['attributions']}/*.parquet")
    _check_maps(maps["map"].to_numpy().reshape(-1, MAP, MAP))
    # The map is a plain fixed-size array: polars computes on it.
    peaks = maps.select(pl.col("map").arr.max())["map"].to_numpy()
    assert np.allclose(peaks, maps["map"].to_numpy().max(axis=1))
    joined = predictions.join(maps, on="tile_id", how="inner", validate="1:1")
    assert joined.height == 33 and joined["error"].null_count() == 33


def test_duckdb_from_parquet_and_from_arrow(scored) -> None:
    import duckdb

    files = {t: f"read_parquet('{scored[t]}/*.parquet')" for t in ("predictions", "attributions")}
    query = (
        "SELECT p.uri, p.prob_malignant, list_max(a.map::FLOAT[]) AS peak, len(a.map) AS cells "
        "FROM {predictions} p LEFT JOIN {attributions} a USING (tile_id) ORDER BY p.uri"
    )
    from_files = duckdb.sql(query.format(**files))
    predictions = pq.read_table(scored["predictions"])  # noqa: F841 (DuckDB finds it by name)
    attributions = pq.read_table(scored["attributions"])  # noqa: F841
    from_arrow = duckdb.sql(query.format(predictions="predictions", attributions="attributions"))
    for result in (from_files, from_arrow):
        rows = result.fetchall()
        assert len(rows) == 36  # one row per tile: no tile has two maps
        bad = [r for r in rows if r[0] in scored["broken"]]
        assert len(bad) == 3 and all(r[1] is None and r[2] is None for r in bad)
        good = [r for r in rows if r[0] not in scored["broken"]]
        assert {r[3] for r in good} == {MAP * MAP} and {r[2] for r in good} <= {1.0, -1.0}
    maps = np.stack(duckdb.sql(f"SELECT map FROM {files['attributions']}").df()["map"])
    assert maps.shape == (33, MAP * MAP)


def test_ray_data_map_batches(scored) -> None:
    import ray

    def peaks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maps = np.stack(list(batch["map"])).reshape(-1, MAP, MAP)
        return {"tile_id": batch["tile_id"], "peak": np.abs(maps).reshape(len(maps), -1).max(1)}

    predictions = ray.data.read_parquet(scored["predictions"])
    assert predictions.count() == 36
    rows = ray.data.read_parquet(scored["attributions"]).map_batches(peaks, batch_format="numpy")
    out = pa.Table.from_pylist(rows.take_all())
    assert out.num_rows == 33 and sorted(out["peak"].to_pylist()) == [1.0] * 33
    ids = predictions.filter(lambda row: row["error"] is None).select_columns(["tile_id"])
    assert sorted(r["tile_id"] for r in ids.take_all()) == sorted(out["tile_id"].to_pylist())
