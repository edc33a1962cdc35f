"""Generated BreakHis-shaped data: layout, counts, determinism, look and class signal."""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from breakhis import storage
from breakhis.names import (
    MAGNIFICATIONS,
    SUBTYPES,
    BreakHisNameError,
    format_name,
    official_relative_path,
    parse_name,
)
from breakhis.synth.dataset import (
    FULL_ROSTER_SCALE,
    SHARED_PATIENT,
    TABLE,
    corrupt_files,
    patient_roster,
    plan_tiles,
    render_tile,
    synthesize,
)

TINY = {"width": 32, "height": 24}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _purple_fraction(pixels: np.ndarray) -> float:
    """Share of haematoxylin-dark pixels: dark red channel, blue well above green."""
    rgb = pixels.astype(np.int16)
    return float(((rgb[..., 0] < 160) & (rgb[..., 2] > rgb[..., 1] + 20)).mean())


# --------------------------------------------------------------------------- the plan


def test_full_scale_is_exactly_the_published_table():
    tiles = plan_tiles(1.0)
    assert len(tiles) == 7909
    cells = Counter((t.subtype_code, t.magnification) for t in tiles)
    for code, (n_patients, counts) in TABLE.items():
        assert [cells[(code, mag)] for mag in MAGNIFICATIONS] == list(counts)
        assert len({t.patient_id for t in tiles if t.subtype_code == code}) == n_patients
    assert Counter(t.class_name for t in tiles) == {"benign": 2480, "malignant": 5429}
    assert len({(t.subtype_code, t.patient_id) for t in tiles}) == 82
    assert len({t.patient_id for t in tiles}) == 81


def test_demo_scale_keeps_every_patient_and_the_proportions():
    scale = 0.05
    tiles = plan_tiles(scale)
    assert 390 <= len(tiles) <= 420
    cells = Counter((t.subtype_code, t.magnification) for t in tiles)
    for code, (n_patients, counts) in TABLE.items():
        for mag, count in zip(MAGNIFICATIONS, counts, strict=True):
            assert cells[(code, mag)] == max(round(count * scale), n_patients), (code, mag)
    # Every patient folder has at least one image at every magnification.
    per_patient_mag = Counter((t.subtype_code, t.patient_id, t.magnification) for t in tiles)
    assert len(per_patient_mag) == 82 * 4
    # Subtype shares stay within 1.5 points of the real ones.
    share = Counter(t.subtype_code for t in tiles)
    for code, (_, counts) in TABLE.items():
        assert abs(share[code] / len(tiles) - sum(counts) / 7909) < 0.015, code


def test_small_scales_keep_at_least_one_patient_per_subtype():
    assert FULL_ROSTER_SCALE > 0.001
    tiles = plan_tiles(0.001)
    assert len(tiles) == 32  # one patient per subtype, one image per magnification
    assert {t.subtype_code for t in tiles} == set(SUBTYPES)
    folders = {(t.subtype_code, t.patient_id) for t in tiles}
    assert len(folders) == 8 and len({p for _, p in folders}) == 7
    medium = plan_tiles(0.01)
    kept = Counter(code for code, _ in {(t.subtype_code, t.patient_id) for t in medium})
    assert min(kept.values()) >= 1 and kept["DC"] > kept["A"]
    assert len(plan_tiles(0.01)) < len(plan_tiles(0.02)) < len(plan_tiles(0.05))


@pytest.mark.parametrize("scale", [0.001, 0.01, 0.05, 1.0])
def test_slide_14_13412_is_filed_under_ductal_and_lobular(scale):
    tiles = plan_tiles(scale)
    codes = {t.subtype_code for t in tiles if t.patient_id == SHARED_PATIENT}
    assert codes == {"DC", "LC"}
    names = {t.file_name for t in tiles if t.patient_id == SHARED_PATIENT}
    assert "SOB_M_DC-14-13412-40-001.png" in names and "SOB_M_LC-14-13412-40-001.png" in names


def test_patient_ids_look_real_and_do_not_depend_on_anything():
    roster = patient_roster()
    assert roster == patient_roster()
    assert {code: len(ids) for code, ids in roster.items()} == {
        code: n for code, (n, _) in TABLE.items()
    }
    every = [pid for ids in roster.values() for pid in ids]
    assert all(re.fullmatch(r"1[345]-\d{3,5}[A-Z]{0,2}", pid) for pid in every), every
    assert Counter(every)[SHARED_PATIENT] == 2
    assert len(set(every)) == 81
    assert any(re.search(r"[A-Z]$", pid) for pid in every)  # some ids carry letters


def test_sequences_run_from_one_without_gaps():
    groups: dict[tuple, list[int]] = defaultdict(list)
    for tile in plan_tiles(0.05):
        groups[(tile.subtype_code, tile.patient_id, tile.magnification)].append(tile.sequence)
    for key, sequences in groups.items():
        assert sorted(sequences) == list(range(1, len(sequences) + 1)), key
    # Patients contribute unequal numbers of images, as in the real archive.
    sizes = Counter()
    for (code, patient, _), sequences in groups.items():
        if code == "DC":
            sizes[patient] += len(sequences)
    assert max(sizes.values()) > min(sizes.values())


# --------------------------------------------------------------------------- writing


def test_writes_the_official_layout_with_names_that_parse(tmp_path):
    summary = synthesize(str(tmp_path), scale=0.001, seed=0, workers=1, **TINY)
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == summary.images == 32
    for path in files:
        tile = parse_name(path.name)
        assert str(path.relative_to(tmp_path)) == official_relative_path(tile)
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (TINY["width"], TINY["height"])
    assert not list(tmp_path.rglob(".*.tmp"))
    assert summary.out_uri == str(tmp_path)
    assert (summary.patients, summary.patient_folders) == (7, 8)
    assert summary.per_class == {"benign": 16, "malignant": 16}
    assert summary.per_magnification == {40: 8, 100: 8, 200: 8, 400: 8}
    assert summary.per_subtype == {name: 4 for name, _ in SUBTYPES.values()}
    table = summary.format_table()
    assert "ductal_carcinoma" in table and "32" in table


def test_same_seed_same_bytes_and_another_seed_other_bytes(tmp_path):
    a = _files_after(tmp_path / "a", seed=5)
    b = _files_after(tmp_path / "b", seed=5)
    c = _files_after(tmp_path / "c", seed=6)
    assert a == b
    assert a.keys() == c.keys()  # the seed changes pixels, never the file names
    assert all(a[name] != c[name] for name in a)


def _files_after(root: Path, seed: int, workers: int = 1) -> dict[str, bytes]:
    synthesize(str(root), scale=0.001, seed=seed, workers=workers, **TINY)
    return _files(root)


@pytest.mark.slow
def test_a_process_pool_writes_the_same_bytes_as_one_process(tmp_path):
    assert _files_after(tmp_path / "pool", seed=1, workers=2) == _files_after(
        tmp_path / "one", seed=1, workers=1
    )


def test_writes_to_s3(s3_prefix):
    summary = synthesize(s3_prefix, scale=0.001, seed=0, workers=1, **TINY)
    entries = list(storage.walk(s3_prefix, (".png",)))
    assert len(entries) == summary.images
    first = entries[0]
    tile = parse_name(first.uri)
    assert first.uri == storage.join(s3_prefix, official_relative_path(tile))
    pixels = render_tile(tile, seed=0, **TINY)
    with Image.open(io.BytesIO(storage.read_bytes(first.uri))) as image:
        assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0}, "scale=0"),
        ({"scale": -0.1}, "scale=-0.1"),
        ({"scale": 11}, r"scale=11: expected a number in \(0, 10"),
        ({"width": 8}, "width=8: expected an integer in 16..4096"),
        ({"height": 5000}, "height=5000"),
        ({"workers": 0}, "workers=0: expected an integer >= 1"),
    ],
)
def test_bad_options_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(str(tmp_path), **kwargs)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- broken files


def test_corrupt_files_break_in_the_announced_way(tmp_path):
    synthesize(str(tmp_path), scale=0.001, seed=0, workers=1, **TINY)
    before = _files(tmp_path)
    bad = corrupt_files(str(tmp_path), seed=0)
    assert sorted(bad.values()) == ["decode", "decode", "decode", "parse"]
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
    assert len(after) == len(before) + 4
    for uri, stage in bad.items():
        data = Path(uri).read_bytes()
        if stage == "parse":
            with pytest.raises(BreakHisNameError):
                parse_name(uri)
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # the content is fine; only the name is wrong
            continue
        tile = parse_name(uri)
        assert tile.sequence > 900
        assert Path(uri).relative_to(tmp_path).as_posix() == official_relative_path(tile)
        with (
            pytest.raises((UnidentifiedImageError, OSError)),
            Image.open(io.BytesIO(data)) as image,
        ):
            image.load()
    assert corrupt_files(str(tmp_path), seed=0) == bad  # deterministic too


# --------------------------------------------------------------------------- the pictures


def _tile(code: str, magnification: int, patient: int = 0, sequence: int = 1):
    pid = patient_roster()[code][patient]
    return parse_name(
        format_name(
            subtype_code=code, patient_id=pid, magnification=magnification, sequence=sequence
        )
    )


def test_colours_look_like_h_and_e():
    pixels = np.stack(
        [
            render_tile(_tile(code, mag), width=96, height=64)
            for code in SUBTYPES
            for mag in (40, 400)
        ]
    ).astype(float)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # Eosin pink and haematoxylin purple both absorb green most.
    assert r.mean() > g.mean() + 40 and b.mean() > g.mean() + 20
    pink = (r > 200) & (g < 190) & (r > b)
    purple = (b > r) & (r < 170)
    white = (r > 225) & (g > 215) & (b > 225)
    for name, mask in (("pink", pink), ("purple", purple), ("white", white)):
        assert 0.005 < mask.mean() < 0.9, (name, mask.mean())
    assert pink.mean() > purple.mean()  # mostly stroma, as in most fields


def test_the_full_size_and_a_small_render_show_the_same_field():
    tile = _tile("DC", 100)
    full = Image.fromarray(render_tile(tile, seed=3))
    assert full.size == (700, 460)
    small = render_tile(tile, seed=3, width=140, height=92).astype(float)
    resized = np.asarray(full.resize((140, 92), Image.Resampling.BOX)).astype(float)
    # A small render averages optical density where a resize averages light, so it is a
    # little darker; the layout is the same.
    assert np.abs(small.mean((0, 1)) - resized.mean((0, 1))).max() < 15
    assert np.corrcoef(small[..., 0].ravel(), resized[..., 0].ravel())[0, 1] > 0.7


def test_nuclei_grow_with_magnification():
    """At 400X a dark pixel's neighbours are dark too (big blobs); at 40X they rarely are."""

    def solidity(pixels: np.ndarray) -> float:
        dark = (pixels[..., 0] < 160) & (pixels[..., 2] > pixels[..., 1] + 20)
        inner = (
            dark[1:-1, 1:-1] & dark[:-2, 1:-1] & dark[2:, 1:-1] & dark[1:-1, :-2] & dark[1:-1, 2:]
        )
        return inner.sum() / max(dark[1:-1, 1:-1].sum(), 1)

    for code in ("DC", "F"):
        low = np.mean(
            [solidity(render_tile(_tile(code, 40, p), width=350, height=230)) for p in (0, 1)]
        )
        high = np.mean(
            [solidity(render_tile(_tile(code, 400, p), width=350, height=230)) for p in (0, 1)]
        )
        assert high > low + 0.2, (code, low, high)


def test_class_signal_is_real_but_patients_overlap():
    """Malignant patients carry more dark-purple area on average, yet the classes overlap:
    the signal is learnable, not a label written into the pixels."""
    fractions: dict[tuple[str, str], list[float]] = defaultdict(list)
    for tile in plan_tiles(0.05):
        if tile.sequence == 1 and tile.magnification in (100, 200):
            pixels = render_tile(tile, seed=0, width=64, height=48)
            fractions[(tile.subtype_code, tile.patient_id)].append(_purple_fraction(pixels))
    assert len(fractions) == 82
    benign = np.array([np.mean(v) for (code, _), v in fractions.items() if SUBTYPES[code][1] == 0])
    malignant = np.array(
        [np.mean(v) for (code, _), v in fractions.items() if SUBTYPES[code][1] == 1]
    )
    # Probability that a random malignant patient out-scores a random benign one.
    auc = (malignant[:, None] > benign[None, :]).mean()
    assert malignant.mean() > 2 * benign.mean()
    assert 0.8 < auc < 1.0, auc
    assert benign.max() > malignant.min()  # some patients sit on the wrong side


def test_render_tile_refuses_a_patient_outside_the_roster():
    tile = parse_name("SOB_B_A-14-2523-40-001.png")  # 14-2523 is a ductal patient
    with pytest.raises(ValueError, match="not a A patient of the generated roster"):
        render_tile(tile, width=32, height=24)
