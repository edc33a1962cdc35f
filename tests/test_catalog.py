import logging
import shutil
from pathlib import Path

import pytest

from breakhis.data.catalog import CATALOG_SCHEMA, CatalogError, scan_catalog


def test_real_sample_flat_folder(realdata_dir: Path):
    catalog = scan_catalog(str(realdata_dir))
    table = catalog.table
    assert table.schema.equals(CATALOG_SCHEMA)
    assert catalog.num_images == 60
    assert catalog.num_patients == 11
    assert catalog.rejects == ()
    rows = {r["file_name"]: r for r in table.to_pylist()}
    row = rows["SOB_M_PC-15-190EF-400-014.png"]
    assert row["patient_id"] == "15-190EF"
    assert row["label"] == 1
    assert row["magnification"] == 400
    assert row["size_bytes"] == (realdata_dir / "SOB_M_PC-15-190EF-400-014.png").stat().st_size
    assert row["tile_id"] == "SOB_M_PC-15-190EF-400-014"
    assert table.column("uri").to_pylist() == sorted(table.column("uri").to_pylist())


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


@pytest.mark.parametrize("layout", ["official", "kaggle", "flat"])
def test_any_nesting_gives_the_same_facts(realdata_dir: Path, tmp_path: Path, layout: str):
    from breakhis.names import official_relative_path, parse_name

    for src in sorted(realdata_dir.glob("*.png"))[:12]:
        tile = parse_name(src.name)
        if layout == "official":
            rel = official_relative_path(tile)
        elif layout == "kaggle":
            rel = f"{tile.magnification}X/{tile.class_name.title()}/{tile.subtype}/{src.name}"
        else:
            rel = src.name
        _copy(src, tmp_path / rel)
    facts = scan_catalog(str(tmp_path)).table.drop_columns(["uri"]).sort_by("tile_id")
    flat = scan_catalog(str(realdata_dir)).table.drop_columns(["uri"]).sort_by("tile_id")
    ids = set(facts.column("tile_id").to_pylist())
    assert len(ids) == 12
    assert facts.to_pylist() == [r for r in flat.to_pylist() if r["tile_id"] in ids]


def test_unparseable_names_are_listed_with_reason(realdata_dir: Path, tmp_path: Path):
    _copy(next(realdata_dir.glob("*.png")), tmp_path / "a" / "SOB_B_F-14-25197-100-001.png")
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "a" / "photo.png").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    catalog = scan_catalog(str(tmp_path))
    assert catalog.num_images == 1
    reasons = {r.file_name: r.reason for r in catalog.rejects}
    assert set(reasons) == {"README.txt", "photo.png"}
    assert "not a .png" in reasons["README.txt"]
    assert "does not match" in reasons["photo.png"]


def test_strict_names_every_offending_file(realdata_dir: Path, tmp_path: Path):
    _copy(next(realdata_dir.glob("*.png")), tmp_path / "SOB_B_F-14-25197-100-001.png")
    (tmp_path / "bad1.png").write_bytes(b"x")
    (tmp_path / "SOB_B_DC-14-1-40-001.png").write_bytes(b"x")
    with pytest.raises(CatalogError) as err:
        scan_catalog(str(tmp_path), strict=True)
    assert "bad1.png" in str(err.value)
    assert "SOB_B_DC-14-1-40-001.png" in str(err.value)


def test_duplicate_file_in_two_folders_is_rejected(realdata_dir: Path, tmp_path: Path):
    src = next(realdata_dir.glob("*.png"))
    _copy(src, tmp_path / "x" / src.name)
    _copy(src, tmp_path / "y" / src.name)
    catalog = scan_catalog(str(tmp_path))
    assert catalog.num_images == 1
    assert "duplicate" in catalog.rejects[0].reason


def test_missing_and_empty_roots(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_catalog(str(tmp_path / "nope"))
    with pytest.raises(CatalogError, match="no BreakHis images"):
        scan_catalog(str(tmp_path))


def test_newline_in_a_file_name_cannot_forge_a_log_line(
    realdata_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    _copy(next(realdata_dir.glob("*.png")), tmp_path / "SOB_B_F-14-25197-100-001.png")
    forged = "x.png\n2026-01-01 00:00:00 INFO breakhis: all checks passed"
    (tmp_path / forged).write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="breakhis"):
        catalog = scan_catalog(str(tmp_path))
    assert [r.file_name for r in catalog.rejects] == [forged]
    messages = [r.getMessage() for r in caplog.records]
    assert any("x.png" in m for m in messages), messages
    assert not any("\n" in m for m in messages), messages
