"""Input discovery for scoring: prefixes, prepared DESTs and manifests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from breakhis import storage
from breakhis.data.catalog import scan_catalog
from breakhis.data.dest import SHARDS_KEY
from breakhis.data.inputs import INPUT_SCHEMA, discover_inputs, parse_tile_name
from breakhis.data.prepare import plan_shards, write_shard


def _image(fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _write(root: Path, relative: str, data: bytes) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _mixed_tree(root: Path) -> None:
    _write(root, "a/40X/SOB_B_A-14-22549AB-40-001.png", _image())
    _write(root, "a/SOB_M_DC-14-2523-400-010.JPG", _image("JPEG"))
    _write(root, "scanner1/slide7/tile_0001.tif", _image("TIFF"))
    _write(root, "scanner1/slide7/tile_0002.jpeg", _image("JPEG", 1))
    _write(root, "scanner1/broken.png", b"not an image")  # still a tile: scored as an error
    _write(root, "scanner1/.hidden.png", _image())
    _write(root, "scanner1/notes.txt", b"not a tile")


def test_prefix_finds_every_tile_suffix_at_any_depth(tmp_path: Path) -> None:
    _mixed_tree(tmp_path)
    found = discover_inputs(str(tmp_path))
    assert found.kind == "prefix"
    table = found.table
    assert table.schema.equals(INPUT_SCHEMA)
    assert table.column("uri").to_pylist() == sorted(table.column("uri").to_pylist())
    rows = {r["tile_id"]: r for r in table.to_pylist()}
    assert set(rows) == {
        "SOB_B_A-14-22549AB-40-001",
        "SOB_M_DC-14-2523-400-010",  # a BreakHis name in JPEG still parses
        "scanner1/slide7/tile_0001.tif",
        "scanner1/slide7/tile_0002.jpeg",
        "scanner1/broken.png",
    }
    benign = rows["SOB_B_A-14-22549AB-40-001"]
    assert (benign["patient_id"], benign["magnification"], benign["subtype"], benign["label"]) == (
        "14-22549AB",
        40,
        "adenosis",
        0,
    )
    assert rows["SOB_M_DC-14-2523-400-010"]["label"] == 1
    other = rows["scanner1/slide7/tile_0001.tif"]
    assert other["patient_id"] is None and other["label"] is None and other["shard"] is None
    assert other["uri"] == str(tmp_path / "scanner1/slide7/tile_0001.tif")
    assert other["file_name"] == "tile_0001.tif"


def test_prefix_listing_is_the_same_every_time(tmp_path: Path) -> None:
    _mixed_tree(tmp_path)
    assert discover_inputs(str(tmp_path)).table.equals(discover_inputs(str(tmp_path)).table)


def test_a_breakhis_name_found_twice_gets_path_ids(tmp_path: Path) -> None:
    name = "SOB_B_F-14-9133-100-001.png"
    _write(tmp_path, f"copy1/{name}", _image())
    _write(tmp_path, f"copy2/{name}", _image())
    _write(tmp_path, "SOB_B_F-14-9133-100-002.png", _image())
    ids = discover_inputs(str(tmp_path)).table.column("tile_id").to_pylist()
    assert sorted(ids) == sorted([f"copy1/{name}", f"copy2/{name}", "SOB_B_F-14-9133-100-002"])


def test_one_file_is_an_input_of_one_tile(tmp_path: Path) -> None:
    uri = _write(tmp_path, "x/tile.png", _image())
    table = discover_inputs(uri).table
    assert table.column("uri").to_pylist() == [uri]
    assert table.column("tile_id").to_pylist() == ["tile.png"]


def test_text_manifest_relative_entries_comments_and_repeats(tmp_path: Path) -> None:
    _mixed_tree(tmp_path / "data")
    absolute = str(tmp_path / "data/a/40X/SOB_B_A-14-22549AB-40-001.png")
    manifest = tmp_path / "lists" / "batch.txt"
    manifest.parent.mkdir()
    manifest.write_text(
        "# tiles for the November run\n"
        f"{absolute}\n"
        "\n"
        "../data/scanner1/slide7/tile_0001.tif\n"
        f"{absolute}\n"
    )
    found = discover_inputs(str(manifest))
    assert found.kind == "manifest"
    assert found.table.column("uri").to_pylist() == sorted(
        [absolute, str(tmp_path / "data/scanner1/slide7/tile_0001.tif")]
    )
    ids = set(found.table.column("tile_id").to_pylist())
    # Outside the manifest's folder: the whole path (no leading slash) is the id.
    assert ids == {
        "SOB_B_A-14-22549AB-40-001",
        str(tmp_path / "data/scanner1/slide7/tile_0001.tif")[1:],
    }


def test_csv_and_parquet_manifests_need_a_uri_column(tmp_path: Path) -> None:
    _mixed_tree(tmp_path)
    uris = [
        str(tmp_path / "scanner1/slide7/tile_0001.tif"),
        str(tmp_path / "a/SOB_M_DC-14-2523-400-010.JPG"),
    ]
    (tmp_path / "m.csv").write_text("uri,note\n" + "\n".join(f"{u},x" for u in uris) + "\n")
    assert discover_inputs(str(tmp_path / "m.csv")).table.column("uri").to_pylist() == sorted(uris)
    pq.write_table(pa.table({"uri": uris}), tmp_path / "m.parquet")
    assert discover_inputs(str(tmp_path / "m.parquet")).num_tiles == 2

    (tmp_path / "bad.csv").write_text("path\n/x.png\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        discover_inputs(str(tmp_path / "bad.csv"))
    pq.write_table(pa.table({"path": uris}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="columns: path"):
        discover_inputs(str(tmp_path / "bad.parquet"))


def test_prepared_dest_lists_shard_rows(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(1, 6):
        _write(src, f"SOB_B_TA-14-3411F-100-00{i}.png", _image(seed=i))
    _write(src, "SOB_B_TA-14-3411F-100-009.png", b"truncated")  # rejected by prepare
    catalog = scan_catalog(str(src)).table
    shards = storage.join(str(dest), "shards")
    for plan in plan_shards(catalog, shard_mb=0.004):  # several small shards
        write_shard(plan, shards, row_group_rows=2)
    pq.write_table(catalog, dest / "manifest.parquet")

    found = discover_inputs(str(dest))
    assert found.kind == "prepared"
    table = found.table
    assert table.num_rows == 5  # the rejected file is not a tile of the DEST
    assert len(set(table.column("shard").to_pylist())) > 1
    assert all(s.startswith(shards) for s in table.column("shard").to_pylist())
    assert set(table.column("patient_id").to_pylist()) == {"14-3411F"}
    assert table.column("uri").to_pylist() == sorted(table.column("uri").to_pylist())

    # A manifest that lists its shards: a stale shard of an older plan left beside them
    # (a prepare that died before deleting it) is not read; before, its tiles were scored
    # twice (or refused as duplicates).
    names = sorted(p.name for p in (dest / "shards").glob("*.parquet"))
    stale = (dest / "shards" / names[0]).read_bytes()
    (dest / "shards" / "stale-old-plan.parquet").write_bytes(stale)
    with pytest.raises(ValueError, match="more than one shard"):
        discover_inputs(str(dest))  # an old manifest that lists no shards reads every one
    listed = catalog.replace_schema_metadata({SHARDS_KEY: json.dumps(names)})
    pq.write_table(listed, dest / "manifest.parquet")
    again = discover_inputs(str(dest)).table
    assert again.num_rows == 5
    assert "stale-old-plan" not in "".join(again.column("shard").to_pylist())


def test_missing_and_empty_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no tiles here")
    with pytest.raises(ValueError, match="no tiles found.*accepted"):
        discover_inputs(str(tmp_path / "empty"))


def test_parse_tile_name_accepts_other_suffixes_only_for_tiles() -> None:
    assert parse_tile_name("x/SOB_M_LC-14-12204-40-001.tiff").subtype == "lobular_carcinoma"
    assert parse_tile_name("SOB_M_LC-14-12204-40-001.txt") is None
    assert parse_tile_name("tile_0001.png") is None


def test_s3_prefix(s3_prefix: str) -> None:
    storage.write_bytes(f"{s3_prefix}/in/deep/er/SOB_M_MC-16-10147-200-001.png", _image())
    storage.write_bytes(f"{s3_prefix}/in/other/t1.jpg", _image("JPEG"))
    table = discover_inputs(f"{s3_prefix}/in/").table
    assert table.column("uri").to_pylist() == [
        f"{s3_prefix}/in/deep/er/SOB_M_MC-16-10147-200-001.png",
        f"{s3_prefix}/in/other/t1.jpg",
    ]
    assert table.column("tile_id").to_pylist() == ["SOB_M_MC-16-10147-200-001", "other/t1.jpg"]
