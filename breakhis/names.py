"""Facts from a BreakHis file name.

Every fact the project uses about an image (label, subtype, patient,
magnification, sequence) comes from its file name, never from the folders it
sits in, so that the official layout, flat folders and re-packaged mirrors all
load the same way. Format (see shared/BREAKHIS.md):

    <PROC>_<CLASS>_<TYPE>-<YEAR>-<SLIDE>-<MAG>-<SEQ>.png
    SOB_B_A-14-22549AB-40-001.png
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUBTYPES: dict[str, tuple[str, int]] = {
    "A": ("adenosis", 0),
    "F": ("fibroadenoma", 0),
    "PT": ("phyllodes_tumor", 0),
    "TA": ("tubular_adenoma", 0),
    "DC": ("ductal_carcinoma", 1),
    "LC": ("lobular_carcinoma", 1),
    "MC": ("mucinous_carcinoma", 1),
    "PC": ("papillary_carcinoma", 1),
}
"""Subtype code -> (folder name used by the official archive, label)."""

CLASS_NAMES: tuple[str, str] = ("benign", "malignant")
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
IMAGE_SUFFIXES: tuple[str, ...] = (".png",)

_NAME = re.compile(
    r"^(?P<proc>[A-Z]+)_(?P<cls>[BM])_(?P<type>[A-Z]+)-(?P<year>\d{2})-(?P<slide>\d+[A-Z]*)"
    r"-(?P<mag>\d+)-(?P<seq>\d+)\.(?P<ext>png)$",
    re.IGNORECASE,
)


class BreakHisNameError(ValueError):
    """A file name that does not follow the BreakHis naming scheme."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class TileName:
    """What a BreakHis file name says about its image."""

    file_name: str
    procedure: str
    label: int  # 0 benign, 1 malignant
    subtype_code: str
    subtype: str
    patient_id: str  # "<YEAR>-<SLIDE>", suffix letters kept: 14-22549AB
    magnification: int
    sequence: int

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def parse_name(file_name: str) -> TileName:
    """Parse a BreakHis file name (the base name, any folder part is ignored).

    Returns a TileName. Raises BreakHisNameError naming the file and saying
    which part is wrong and what is accepted.
    """
    name = file_name.rsplit("/", 1)[-1]
    match = _NAME.match(name)
    if match is None:
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise BreakHisNameError(name, "not a .png file")
        raise BreakHisNameError(
            name,
            "does not match <PROC>_<B|M>_<TYPE>-<YY>-<SLIDE>-<MAG>-<SEQ>.png "
            "(e.g. SOB_B_A-14-22549AB-40-001.png)",
        )
    code = match["type"].upper()
    if code not in SUBTYPES:
        raise BreakHisNameError(
            name, f"unknown tumour type {match['type']!r}; accepted: {', '.join(SUBTYPES)}"
        )
    subtype, label = SUBTYPES[code]
    cls = match["cls"].upper()
    if (cls == "M") != bool(label):
        raise BreakHisNameError(
            name, f"class {cls} contradicts type {code} ({subtype} is {CLASS_NAMES[label]})"
        )
    magnification = int(match["mag"])
    if magnification not in MAGNIFICATIONS:
        raise BreakHisNameError(
            name,
            f"magnification {magnification} not one of {', '.join(map(str, MAGNIFICATIONS))}",
        )
    return TileName(
        file_name=name,
        procedure=match["proc"].upper(),
        label=label,
        subtype_code=code,
        subtype=subtype,
        patient_id=f"{match['year']}-{match['slide'].upper()}",
        magnification=magnification,
        sequence=int(match["seq"]),
    )


def format_name(
    *, subtype_code: str, patient_id: str, magnification: int, sequence: int, procedure: str = "SOB"
) -> str:
    """The official file name for these facts (the inverse of parse_name)."""
    _, label = SUBTYPES[subtype_code]
    cls = "M" if label else "B"
    return f"{procedure}_{cls}_{subtype_code}-{patient_id}-{magnification}-{sequence:03d}.png"


def official_relative_path(tile: TileName) -> str:
    """Where the official archive keeps this image, relative to its root.

    BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<slide-dir>/<mag>X/<file>
    """
    cls = "M" if tile.label else "B"
    slide_dir = f"{tile.procedure}_{cls}_{tile.subtype_code}_{tile.patient_id}"
    return (
        f"BreaKHis_v1/histology_slides/breast/{tile.class_name}/{tile.procedure}/"
        f"{tile.subtype}/{slide_dir}/{tile.magnification}X/{tile.file_name}"
    )
