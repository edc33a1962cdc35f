"""Every common reader reads the scoring job's output, error rows included: pandas, pyarrow,
polars, DuckDB (from the Parquet files and from an Arrow table) and Ray Data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_score import MAP, _make_tiles, _save_model

from breakhis.score.job import ScoreConfig, run_scoring
from breakhis.score.predict import PredictOptions

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_local) -> dict:
    """A real job's output over 36 tiles, 3 of which do not decode (error rows)."""
    root = tmp_path_factory.mktemp("readers")
    bad = _make_tiles(str(root / "tiles"))
    _save_model(str(root / "model"))
    config = ScoreConfig(
        model=str(root / "model"),
        input=str(root / "tiles"),
        out=str(root / "scores"),
        unit_size=8,
        predict=PredictOptions(map_size=MAP, batch_size=8, num_actors=1),
    )
    summary = run_scoring(config)
    assert (summary.tiles, summary.errors) == (36, 3)
    broken = sorted(u for u, stage in bad.items() if stage == "decode")
    return {"tiles": str(root / "scores" / "tiles"), "broken": broken}


def _check(uris: list[str], maps: np.ndarray, probs: list, broken: list[str]) -> None:
    """36 rows, maps (N, S, S): zeros and a null probability on the error rows, each other
    map scaled so that its largest absolute value is 1."""
    assert len(uris) == 36 and maps.shape == (36, MAP, MAP) and maps.dtype == np.float32
    bad = np.isin(np.asarray(uris, dtype=object), broken)
    assert bad.sum() == 3
    assert not maps[bad].any()
    assert np.allclose(np.abs(maps[~bad]).reshape(33, -1).max(axis=1), 1.0)
    assert all(p is None or p != p for p, b in zip(probs, bad, strict=True) if b)  # null/NaN
    assert all(0.0 <= p <= 1.0 for p, b in zip(probs, bad, strict=True) if not b)


def test_pandas(scored) -> None:
    import pandas as pd

    frame = pd.read_parquet(scored["tiles"])
    maps = np.stack(frame["attribution"].to_numpy()).reshape(-1, MAP, MAP)
    _check(frame["uri"].tolist(), maps, frame["prob_malignant"].tolist(), scored["broken"])


def test_pyarrow(scored) -> None:
    table = pq.read_table(scored["tiles"])
    column = table.column("attribution").combine_chunks()
    maps = column.flatten().to_numpy().reshape(len(column), MAP, MAP)
    # to_numpy of the column itself: one array of S*S values per row.
    assert np.array_equal(np.stack(column.to_numpy(zero_copy_only=False)), maps.reshape(36, -1))
    _check(table["uri"].to_pylist(), maps, table["prob_malignant"].to_pylist(), scored["broken"])


def test_polars(scored) -> None:
    import polars as pl

    frame = pl.read_parquet(f"{scored['tiles']}/*.parquet")
    maps = frame["attribution"].to_numpy().reshape(-1, MAP, MAP)
    _check(frame["uri"].to_list(), maps, frame["prob_malignant"].to_list(), scored["broken"])
    # The column is a plain fixed-size array: polars computes on it.
    peaks = frame.select(pl.col("attribution").arr.max())["attribution"].to_numpy()
    assert np.allclose(peaks, maps.reshape(36, -1).max(axis=1))


def test_duckdb_from_parquet_and_from_arrow(scored) -> None:
    import duckdb

    query = (
        "SELECT uri, prob_malignant, list_max(attribution::FLOAT[]) AS peak, "
        "len(attribution) AS cells FROM {} ORDER BY uri"
    )
    from_files = duckdb.sql(query.format(f"read_parquet('{scored['tiles']}/*.parquet')"))
    arrow = pq.read_table(scored["tiles"])  # noqa: F841 (DuckDB finds it by name)
    from_arrow = duckdb.sql(query.format("arrow"))
    for result in (from_files, from_arrow):
        rows = result.fetchall()
        assert len(rows) == 36 and {r[3] for r in rows} == {MAP * MAP}
        bad = [r for r in rows if r[0] in scored["broken"]]
        assert len(bad) == 3 and all(r[1] is None and r[2] == 0.0 for r in bad)
    maps = np.stack(
        duckdb.sql(f"SELECT attribution FROM read_parquet('{scored['tiles']}/*.parquet')")
        .df()["attribution"]
        .to_numpy()
    )
    assert maps.shape == (36, MAP * MAP)


def test_ray_data_map_batches(scored) -> None:
    import ray

    def peaks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maps = np.stack(list(batch["attribution"])).reshape(-1, MAP, MAP)
        return {"uri": batch["uri"], "peak": np.abs(maps).reshape(len(maps), -1).max(axis=1)}

    rows = ray.data.read_parquet(scored["tiles"]).map_batches(peaks, batch_format="numpy")
    out = pa.Table.from_pylist(rows.take_all())
    assert out.num_rows == 36
    by_uri = dict(zip(out["uri"].to_pylist(), out["peak"].to_pylist(), strict=True))
    assert all(by_uri[u] == 0.0 for u in scored["broken"])
    assert sorted(v for u, v in by_uri.items() if u not in scored["broken"]) == [1.0] * 33
