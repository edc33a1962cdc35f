"""PrepareConfig: the options of ``breakhis prepare`` (breakhis.data.prepare runs it). No Parquet
or Ray here: the command's ``--help`` reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from breakhis import storage
from breakhis.data.geometry import check_sizes
from breakhis.data.split_spec import check_column_name

BUILT_IN_COLUMNS: tuple[str, ...] = (
    "tile_id",
    "uri",
    "file_name",
    "patient_id",
    "label",
    "subtype",
    "magnification",
    "sequence",
    "size_bytes",
    "width",
    "height",
    "png",
    "fold",
)
"""Manifest columns prepare writes itself (breakhis.data.prepare.SHARD_SCHEMA's and ``fold``; and
rep0..rep{k-1}): no user-defined split may take their names."""


@dataclass(frozen=True)
class PrepareConfig:
    """Options of the prepare job."""

    src: str
    """Root of a BreakHis tree (local folder or s3://bucket/prefix), any nesting."""
    dest: str
    """Where shards, manifest and rejects go (local folder or s3://bucket/prefix)."""
    strict: bool = False
    """Fail, naming every file, when a file name does not parse (default: skip such files and
    list them in rejects.parquet)."""
    folds: int = 5
    """Patient-grouped folds (the manifest's ``fold`` column)."""
    repetitions: int = 5
    """Repetitions of the paper's random 70/30 patient split (``rep0``.. columns)."""
    test_fraction: float = 0.3
    """Share of patients tested in each repetition."""
    seed: int = 0
    """Seed of both split schemes."""
    shard_mb: float = 128.0
    """Target shard size in MB of PNG bytes."""
    row_group_rows: int = 64
    """Most rows per Parquet row group (bounds a reader's memory)."""
    pixels: tuple[int, ...] = ()
    """Also store each tile decoded and resized to S x S uint8 for each size S given
    (comma-separated, e.g. 224,128): training, scoring and evaluation at --image-size S then
    read these pixels instead of decoding PNGs. Sizes stored by an earlier run are kept."""
    split_file: tuple[str, ...] = field(
        default=(), metadata={"repeatable": True, "metavar": "NAME=PATH"}
    )
    """A user-defined split NAME=PATH (repeat the option for several): the manifest column
    NAME is ``test`` for the patient ids listed in PATH (local or s3://; one per line, #
    comments) and ``train`` for the others; jobs use it as --split column:NAME. Columns of
    an earlier run are kept; naming one again replaces it."""

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"--folds must be >= 2, got {self.folds}")
        if self.repetitions < 1:
            raise ValueError(f"--repetitions must be >= 1, got {self.repetitions}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.shard_mb <= 0:
            raise ValueError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.row_group_rows < 1:
            raise ValueError(f"--row-group-rows must be >= 1, got {self.row_group_rows}")
        check_sizes(self.pixels)
        parse_split_files(self.split_file)
        src, dest = storage.location(self.src), storage.location(self.dest)
        if src == dest:
            raise ValueError(
                f"SRC {self.src} and DEST {self.dest} are the same place; they must differ"
            )
        if dest[: len(src)] == src:
            raise ValueError(
                f"DEST {self.dest} is inside SRC {self.src}: shards would be written into (and "
                "catalogued from) the source; choose a DEST outside SRC"
            )
        if src[: len(dest)] == dest:
            raise ValueError(
                f"SRC {self.src} is inside DEST {self.dest}: a rerun would delete or catalogue "
                "its own output; choose a DEST outside SRC"
            )


def parse_split_files(entries: tuple[str, ...]) -> dict[str, str]:
    """NAME -> PATH of ``--split-file NAME=PATH`` entries. Raises ValueError for an entry
    that is not NAME=PATH, a name given twice, or a name of a column prepare writes itself."""
    files: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise ValueError(
                f"--split-file {entry!r}: expected NAME=PATH, e.g. heldout=patients.txt"
            )
        check_column_name(name, what=f"--split-file {entry}")
        if name in BUILT_IN_COLUMNS or re.fullmatch(r"rep\d+", name):
            raise ValueError(
                f"--split-file {entry}: {name!r} is a column prepare writes itself "
                f"({', '.join(BUILT_IN_COLUMNS)}, rep0..); choose another name"
            )
        if name in files:
            raise ValueError(f"--split-file: column {name!r} is given twice")
        files[name] = path
    return files
