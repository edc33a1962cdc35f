from pathlib import Path

import pytest

from breakhis.names import (
    SUBTYPES,
    BreakHisNameError,
    format_name,
    official_relative_path,
    parse_name,
)


def test_parses_official_example():
    tile = parse_name("SOB_B_A-14-22549AB-40-001.png")
    assert tile.label == 0
    assert tile.subtype == "adenosis"
    assert tile.subtype_code == "A"
    assert tile.patient_id == "14-22549AB"
    assert tile.magnification == 40
    assert tile.sequence == 1
    assert tile.class_name == "benign"


@pytest.mark.parametrize(
    ("name", "patient", "label", "subtype", "mag", "seq"),
    [
        ("SOB_M_DC-14-2523-400-010.png", "14-2523", 1, "ductal_carcinoma", 400, 10),
        ("SOB_M_PC-15-190EF-400-014.png", "15-190EF", 1, "papillary_carcinoma", 400, 14),
        ("SOB_B_TA-14-16184CD-400-024.png", "14-16184CD", 0, "tubular_adenoma", 400, 24),
        ("SOB_B_TA-14-16184-200-025.png", "14-16184", 0, "tubular_adenoma", 200, 25),
        ("SOB_B_PT-14-22704-100-003.png", "14-22704", 0, "phyllodes_tumor", 100, 3),
        ("SOB_M_LC-14-13412-200-003.png", "14-13412", 1, "lobular_carcinoma", 200, 3),
        ("SOB_M_MC-14-18842D-200-016.png", "14-18842D", 1, "mucinous_carcinoma", 200, 16),
    ],
)
def test_real_patterns(name, patient, label, subtype, mag, seq):
    tile = parse_name(name)
    assert (tile.patient_id, tile.label, tile.subtype, tile.magnification, tile.sequence) == (
        patient,
        label,
        subtype,
        mag,
        seq,
    )


def test_folder_part_is_ignored():
    assert parse_name("40X/Benign/adenosis/SOB_B_A-14-22549AB-40-001.png").patient_id == (
        "14-22549AB"
    )


def test_suffix_letters_make_a_distinct_patient():
    assert parse_name("SOB_B_TA-14-16184CD-400-024.png").patient_id != (
        parse_name("SOB_B_TA-14-16184-400-024.png").patient_id
    )


def test_lobular_and_ductal_13412_are_one_patient():
    dc = parse_name("SOB_M_DC-14-13412-100-003.png")
    lc = parse_name("SOB_M_LC-14-13412-200-003.png")
    assert dc.patient_id == lc.patient_id == "14-13412"
    assert dc.subtype != lc.subtype


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notes.txt", "not a .png"),
        ("SOB_B_A-14-22549AB-40.png", "does not match"),
        ("SOB_B_XX-14-22549AB-40-001.png", "unknown tumour type"),
        ("SOB_B_DC-14-2523-40-001.png", "contradicts"),
        ("SOB_M_A-14-2523-40-001.png", "contradicts"),
        ("SOB_B_A-14-22549AB-50-001.png", "magnification 50"),
    ],
)
def test_bad_names_say_why(name, reason):
    with pytest.raises(BreakHisNameError) as err:
        parse_name(name)
    assert reason in err.value.reason
    assert name in str(err.value)


def test_format_is_inverse_of_parse():
    for code in SUBTYPES:
        name = format_name(subtype_code=code, patient_id="14-1234AB", magnification=200, sequence=7)
        tile = parse_name(name)
        assert (tile.subtype_code, tile.patient_id, tile.magnification, tile.sequence) == (
            code,
            "14-1234AB",
            200,
            7,
        )


def test_official_relative_path():
    tile = parse_name("SOB_B_A-14-22549AB-40-001.png")
    assert official_relative_path(tile) == (
        "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/"
        "SOB_B_A-14-22549AB-40-001.png"
    )


def test_every_real_sample_name_parses(realdata_dir: Path):
    names = sorted(p.name for p in realdata_dir.glob("*.png"))
    assert len(names) == 60
    tiles = [parse_name(n) for n in names]
    assert {t.subtype_code for t in tiles} == set(SUBTYPES)
    assert {t.magnification for t in tiles} == {40, 100, 200, 400}
    assert len({t.patient_id for t in tiles}) == 11
