"""The prepare job on real Ray, locally and against the embedded S3 server."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from breakhis import storage
from breakhis.data.catalog import scan_catalog
from breakhis.data.dest import (
    manifest_hash,
    read_manifest,
    stored_pixel_sizes,
    user_split_columns,
)
from breakhis.data.pixels import images_of
from breakhis.data.prepare import PrepareConfig, prepare
from breakhis.data.splits import SplitSpec, select_split

pytestmark = [pytest.mark.ray]


def _shard_names(dest: str) -> list[str]:
    return [e.uri.rsplit("/", 1)[-1] for e in storage.walk(storage.join(dest, "shards"))]


def _real_tree_with_bad_files(realdata_dir: Path, root: Path) -> dict[str, str]:
    """The real sample, in the official layout, plus five bad files."""
    from breakhis.names import official_relative_path, parse_name

    for src in realdata_dir.glob("*.png"):
        dest = root / official_relative_path(parse_name(src.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    good = (realdata_dir / "SOB_B_F-14-25197-100-001.png").read_bytes()
    # One bit flipped early in the first IDAT: libspng decoded it to wrong pixels, no error.
    flipped = bytearray(good)
    flipped[good.index(b"IDAT") + 4 + 100] ^= 0x01
    bad = {
        "SOB_B_F-14-25197-40-901.png": (good[: len(good) // 3], "decode"),
        "SOB_B_F-14-25197-40-902.png": (b"", "decode"),
        "SOB_B_F-14-25197-40-903.png": (b"<html>not a png</html>", "decode"),
        "SOB_B_F-14-25197-40-904.png": (bytes(flipped), "decode"),
        "scan-0001.png": (good, "parse"),
    }
    for name, (data, _) in bad.items():
        (root / "extra" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "extra" / name).write_bytes(data)
    return {name: stage for name, (_, stage) in bad.items()}


def test_prepare_real_sample_locally(realdata_dir, tmp_path, ray_local):
    src, dest = tmp_path / "src", str(tmp_path / "prepared")
    bad = _real_tree_with_bad_files(realdata_dir, src)
    summary = prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8, row_group_rows=4))

    assert summary.images == 60
    assert summary.patients == 11
    assert summary.rejects == 5
    assert summary.shards > 1 and summary.shards_written == summary.shards

    rejects = pq.read_table(f"{dest}/rejects.parquet").to_pylist()
    assert {r["file_name"]: r["stage"] for r in rejects} == bad
    assert all(r["reason"] for r in rejects)
    flipped = next(r["reason"] for r in rejects if r["file_name"].endswith("-904.png"))
    assert "PNG chunk IDAT" in flipped and "CRC" in flipped, flipped

    # Read back with a different reader (pandas over the whole shard folder).
    shards = pd.read_parquet(f"{dest}/shards")
    assert len(shards) == 60
    manifest = read_manifest(dest)
    catalog = scan_catalog(str(src)).table.to_pandas().set_index("tile_id")
    for row in shards.itertuples():
        expect = catalog.loc[row.tile_id]
        assert (row.patient_id, row.label, row.magnification) == (
            expect.patient_id,
            expect.label,
            expect.magnification,
        )
        assert row.png == (src / Path(row.uri).relative_to(src)).read_bytes()
    sizes = dict(zip(manifest["tile_id"].to_pylist(), manifest["height"].to_pylist(), strict=True))
    assert sizes["SOB_M_PC-14-12465-100-001"] == 456  # the real quirk: 700x456 tiles
    assert sizes["SOB_B_F-14-25197-100-001"] == 460
    for shard in _shard_names(dest):
        meta = pq.ParquetFile(f"{dest}/shards/{shard}").metadata
        assert all(meta.row_group(i).num_rows <= 4 for i in range(meta.num_row_groups))

    # Slide 14-13412 (DC and LC) is one patient: never on two sides of any split.
    for spec in [SplitSpec("fold", k) for k in range(5)] + [SplitSpec("rep", r) for r in range(5)]:
        split = select_split(manifest, spec)
        assert ("14-13412" in split.train) != ("14-13412" in split.test)


def test_rerun_is_idempotent_and_resumes(realdata_dir, tmp_path, ray_local):
    src, dest = tmp_path / "src", str(tmp_path / "prepared")
    _real_tree_with_bad_files(realdata_dir, src)
    config = PrepareConfig(src=str(src), dest=dest, shard_mb=8)
    prepare(config)
    first = _shard_names(dest)
    manifest_bytes = Path(dest, "manifest.parquet").read_bytes()

    again = prepare(config)
    assert again.shards_written == 0
    assert _shard_names(dest) == first
    assert Path(dest, "manifest.parquet").read_bytes() == manifest_bytes

    # A job that died after some shards: only the missing one is written.
    Path(dest, "shards", first[1]).unlink()
    Path(dest, "shards", "part-99999-stale.parquet").write_bytes(b"old plan")
    resumed = prepare(config)
    assert resumed.shards_written == 1
    assert resumed.shards_deleted == 1
    assert _shard_names(dest) == first
    assert Path(dest, "manifest.parquet").read_bytes() == manifest_bytes
    assert resumed.rejects == 5  # rejects of skipped shards come from their metadata


def test_prepare_generated_data_in_s3(s3_prefix, ray_local):
    from breakhis.synth.dataset import corrupt_files, synthesize

    raw, dest = f"{s3_prefix}/raw", f"{s3_prefix}/prepared"
    made = synthesize(raw, scale=0.02, seed=3, width=64, height=42)
    bad = corrupt_files(raw, seed=3)
    summary = prepare(PrepareConfig(src=raw, dest=dest, shard_mb=0.2))
    assert summary.images == made.images
    assert summary.rejects == len(bad)
    assert summary.shards > 1

    fs, path = storage.resolve(dest)
    shards = pads.dataset(f"{path}/shards", filesystem=fs, format="parquet").to_table()
    manifest = read_manifest(dest)
    assert shards.num_rows == manifest.num_rows == made.images
    assert sorted(shards["tile_id"].to_pylist()) == sorted(manifest["tile_id"].to_pylist())
    catalog = {r["tile_id"]: r for r in scan_catalog(raw).table.to_pylist()}
    for row in shards.select(["tile_id", "uri", "patient_id", "label", "width"]).to_pylist():
        assert row["uri"] == catalog[row["tile_id"]]["uri"]
        assert row["patient_id"] == catalog[row["tile_id"]]["patient_id"]
        assert row["label"] == catalog[row["tile_id"]]["label"]
        assert row["width"] == 64
    rejects = pq.read_table(f"{path}/rejects.parquet", filesystem=fs).to_pylist()
    assert {r["uri"]: r["stage"] for r in rejects} == bad


def _pixel_files(dest: str, size: int) -> dict[str, tuple[int, bytes]]:
    folder = Path(dest, "pixels", str(size))
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_pixels_are_the_eval_transform_of_each_accepted_tile_and_sizes_add_up(
    realdata_dir, tmp_path, ray_local
):
    from breakhis.data.geometry import TileGeometry
    from breakhis.data.transforms import EvalTransform

    src, dest = tmp_path / "src", str(tmp_path / "prepared")
    bad = _real_tree_with_bad_files(realdata_dir, src)
    first = prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8, pixels=(48,)))
    assert first.rejects == len(bad) and first.pixel_sizes == (48,)
    assert first.pixel_files_written == first.shards
    assert stored_pixel_sizes(read_manifest(dest)) == (48,)
    assert "stored pixels: 48x73" in first.format_table()

    # Every accepted tile, in its shard's order, is exactly what a decode at 48 px gives.
    decode = EvalTransform(geometry=TileGeometry(size=48), canonical=True)
    for shard in _shard_names(dest):
        png = pq.read_table(f"{dest}/shards/{shard}")
        pixels = pq.read_table(f"{dest}/pixels/48/{shard}")
        assert pixels.column("uri").to_pylist() == png.column("uri").to_pylist()
        assert pixels.column("patient_id").equals(png.column("patient_id"))
        images = images_of(pixels.column("image"), 48)
        for data, image in zip(png.column("png").to_pylist(), images, strict=True):
            np.testing.assert_array_equal(image, decode(data))

    # A second size is added without rewriting a shard or the first size.
    before = _pixel_files(dest, 48)
    second = prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8, pixels=(32,)))
    assert second.shards_written == 0 and second.pixel_files_written == second.shards
    assert second.pixel_sizes == (32, 48) and second.rejects == len(bad)
    assert _pixel_files(dest, 48) == before
    assert stored_pixel_sizes(read_manifest(dest)) == (32, 48)
    shard = _shard_names(dest)[0]
    np.testing.assert_array_equal(
        images_of(pq.read_table(f"{dest}/pixels/32/{shard}").column("image"), 32)[0],
        EvalTransform(geometry=TileGeometry(size=32), canonical=True)(
            pq.read_table(f"{dest}/shards/{shard}")["png"][0].as_py()
        ),
    )

    # A rerun without --pixels keeps both; a lost pixel file is rewritten, a stray one goes.
    Path(dest, "pixels", "32", shard).unlink()
    Path(dest, "pixels", "64").mkdir()
    Path(dest, "pixels", "64", shard).write_bytes(b"a size no manifest lists")
    third = prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8))
    assert third.pixel_sizes == (32, 48) and third.pixel_files_written == 1
    assert third.shards_written == 0
    assert not Path(dest, "pixels", "64", shard).exists()
    assert _pixel_files(dest, 48) == before


def test_bad_config_is_refused_before_work(tmp_path):
    for bad in ((4,), (224, 4096), (True,)):
        with pytest.raises(ValueError, match="--pixels: size .* accepted: integers 8..2048"):
            PrepareConfig(src="a", dest="b", pixels=bad)
    with pytest.raises(ValueError, match="--folds"):
        PrepareConfig(src="a", dest="b", folds=1)
    with pytest.raises(ValueError, match="differ"):
        PrepareConfig(src="s3://x/a", dest="s3://x/a/")


def test_src_and_dest_are_compared_as_places_not_strings(tmp_path, monkeypatch, capsys):
    from breakhis import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "raw")
    same = [
        ("raw", str(tmp_path / "raw")),
        ("raw", "link/"),
        ("file://raw", "./raw"),
        ("s3://x/a", "s3://x//a/"),
    ]
    for src, dest in same:
        with pytest.raises(ValueError, match="same place"):
            PrepareConfig(src=src, dest=dest)
    for src, dest in [("raw", str(tmp_path / "raw" / "prepared")), ("s3://x/a", "s3://x/a//b/")]:
        with pytest.raises(ValueError, match="DEST .* is inside SRC"):
            PrepareConfig(src=src, dest=dest)
    for src, dest in [(str(tmp_path / "raw" / "sub"), "raw"), ("s3://x/a/b", "s3://x/a")]:
        with pytest.raises(ValueError, match="SRC .* is inside DEST"):
            PrepareConfig(src=src, dest=dest)
    # Siblings whose names share a prefix are fine, and so are S3 and a local folder.
    PrepareConfig(src="raw", dest="raw2")
    PrepareConfig(src="s3://x/a", dest="s3://x/ab")
    PrepareConfig(src="s3://raw/x", dest="raw/x")

    # The user's case: the same folder given relative and absolute, refused before any work.
    code = cli.main(["prepare", "raw", str(tmp_path / "raw")])
    assert code == 2
    assert "same place" in capsys.readouterr().err
    assert list((tmp_path / "raw").iterdir()) == []


def test_a_rerun_that_dies_before_deleting_stale_shards_leaves_a_usable_manifest(
    realdata_dir, tmp_path, ray_local, monkeypatch
):
    from breakhis.data.dest import PreparedDest

    src, dest = tmp_path / "src", str(tmp_path / "prepared")
    _real_tree_with_bad_files(realdata_dir, src)
    config = PrepareConfig(src=str(src), dest=dest, shard_mb=8)
    prepare(config)
    before = set(_shard_names(dest))
    # A new image changes the plan: the shard it joins gets a new name, the old one is stale.
    new_tile = "SOB_B_F-14-25197-100-950"
    shutil.copyfile(realdata_dir / "SOB_B_F-14-25197-100-001.png", src / f"{new_tile}.png")

    def killed(uri: str) -> None:
        raise RuntimeError(f"killed while deleting {uri}")

    monkeypatch.setattr(storage, "delete", killed)
    with pytest.raises(RuntimeError, match="killed while deleting"):
        prepare(config)
    monkeypatch.undo()

    manifest = read_manifest(dest)
    assert new_tile in manifest["tile_id"].to_pylist()
    assert set(_shard_names(dest)) - before, "the new plan's shards were written"
    assert before - set(_shard_names(dest)) == set(), "nothing was deleted yet"
    # Readers take only the manifest's shards: every tile once, none from the stale shard.
    shards = PreparedDest.open(dest).shard_uris
    tiles = [
        t
        for uri in shards
        for t in pq.read_table(storage.resolve(uri)[1], filesystem=storage.resolve(uri)[0])[
            "tile_id"
        ].to_pylist()
    ]
    assert sorted(tiles) == sorted(manifest["tile_id"].to_pylist())

    finished = prepare(config)
    assert finished.shards_deleted >= 1
    assert sorted(_shard_names(dest)) == sorted(u.rsplit("/", 1)[-1] for u in shards)


def test_a_newline_in_a_file_name_cannot_forge_a_log_line(
    realdata_dir, tmp_path, ray_local, caplog
):
    src = tmp_path / "src"
    src.mkdir()
    for png in sorted(realdata_dir.glob("*.png"))[:12]:
        shutil.copyfile(png, src / png.name)
    good = next(iter(sorted(realdata_dir.glob("*.png")))).read_bytes()
    forged = "SOB_B_F-14-25197-40-901.png\n2026-01-01 00:00:00 INFO breakhis.data.prepare: ok"
    (src / forged).write_bytes(good[:100])
    with caplog.at_level("INFO", logger="breakhis"):
        prepare(PrepareConfig(src=str(src), dest=str(tmp_path / "out"), folds=2, repetitions=1))
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    assert len(rejected) == 1, rejected
    assert "\n" not in rejected[0] and "\\n" in rejected[0]


# --------------------------------------------------------------------------- --split-file


def _sides(manifest, column: str) -> dict[str, str]:
    return dict(zip(manifest["patient_id"].to_pylist(), manifest[column].to_pylist(), strict=True))


def test_split_files_add_columns_in_the_hash_and_reruns_keep_them(
    realdata_dir, tmp_path, ray_local
):
    src, dest = tmp_path / "src", str(tmp_path / "prepared")
    _real_tree_with_bad_files(realdata_dir, src)
    prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8))
    plain = read_manifest(dest)
    heldout, site = tmp_path / "heldout.txt", tmp_path / "site.txt"
    heldout.write_text("# held out by hand\n14-13412\n\n  14-25197  # fibroadenoma\n")
    site.write_text("15-190EF\n")
    files = (f"heldout={heldout}", f"site_b={site}")
    summary = prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8, split_file=files))

    manifest = read_manifest(dest)
    assert summary.shards_written == 0  # only the manifest changes
    assert manifest.num_rows == plain.num_rows == 60
    assert set(_sides(manifest, "heldout").values()) == {"train", "test"}
    assert {p for p, s in _sides(manifest, "heldout").items() if s == "test"} == {
        "14-13412",
        "14-25197",
    }
    assert {p for p, s in _sides(manifest, "site_b").items() if s == "test"} == {"15-190EF"}
    assert manifest.drop_columns(["heldout", "site_b"]).equals(plain)
    # The columns are part of the prepared data's identity.
    assert manifest_hash(manifest) != manifest_hash(plain)
    stored = manifest.schema.metadata[b"breakhis.manifest_hash"].decode()
    assert stored == manifest_hash(manifest)
    assert user_split_columns(manifest) == {"heldout": str(heldout), "site_b": str(site)}
    assert "heldout=" in summary.format_table() and "site_b=" in summary.format_table()
    split = select_split(manifest, SplitSpec.parse("column:heldout", val_fraction=0.2))
    assert split.test == {"14-13412", "14-25197"} and split.val and split.train

    # A rerun that names one column again replaces it and keeps the other as it was.
    heldout.write_text("14-2523\n")
    again = prepare(PrepareConfig(src=str(src), dest=dest, shard_mb=8, split_file=files[:1]))
    rerun = read_manifest(dest)
    assert again.shards_written == 0
    assert {p for p, s in _sides(rerun, "heldout").items() if s == "test"} == {"14-2523"}
    assert rerun["site_b"].equals(manifest["site_b"])
    assert user_split_columns(rerun) == {"heldout": str(heldout), "site_b": str(site)}
    assert manifest_hash(rerun) not in (manifest_hash(manifest), manifest_hash(plain))


def test_split_file_ids_the_data_lacks_are_refused_before_ray(realdata_dir, tmp_path, monkeypatch):
    import breakhis.data.prepare as prepare_module

    def no_ray() -> None:
        raise AssertionError("Ray started")

    monkeypatch.setattr(prepare_module, "ensure_ray", no_ray)
    listed = tmp_path / "patients.txt"
    listed.write_text("14-13412\n14-99999\n14_13412\n")
    config = PrepareConfig(
        src=str(realdata_dir), dest=str(tmp_path / "out"), split_file=(f"heldout={listed}",)
    )
    with pytest.raises(ValueError) as info:
        prepare(config)
    assert str(info.value) == (
        f"--split-file heldout={listed}: 2 patient id(s) not in the data: 14-99999, 14_13412; "
        "the data has 11 patients (ids like 14-12465)"
    )
    missing = PrepareConfig(
        src=str(realdata_dir), dest=str(tmp_path / "out"), split_file=("heldout=nope.txt",)
    )
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        prepare(missing)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (("heldout",), "expected NAME=PATH"),
        (("heldout=",), "expected NAME=PATH"),
        (("fold=a.txt",), "'fold' is a column prepare writes itself"),
        (("rep7=a.txt",), "'rep7' is a column prepare writes itself"),
        (("patient_id=a.txt",), "'patient_id' is a column prepare writes itself"),
        (("width=a.txt",), "'width' is a column prepare writes itself"),
        (("a=x.txt", "a=y.txt"), "column 'a' is given twice"),
        (("held out=a.txt",), "column name 'held out'"),
    ],
)
def test_split_file_options_are_checked_when_built(entries, message):
    with pytest.raises(ValueError, match=message):
        PrepareConfig(src="a", dest="b", split_file=entries)
