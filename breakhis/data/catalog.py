"""Catalog a BreakHis tree: one row per image, every fact from its file name.

Works on a local folder or an ``s3://bucket/prefix`` at any nesting (the
official ``BreaKHis_v1/histology_slides/...`` layout, flat folders,
Kaggle-style ``40X/Benign/...``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from breakhis import storage
from breakhis.names import BreakHisNameError, parse_name

log = logging.getLogger(__name__)

CATALOG_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("uri", pa.string()),
        ("file_name", pa.string()),
        ("patient_id", pa.string()),
        ("label", pa.int8()),
        ("subtype", pa.string()),
        ("magnification", pa.int16()),
        ("sequence", pa.int16()),
        ("size_bytes", pa.int64()),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("file_name", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class Reject:
    """A file that was left out, and why."""

    uri: str
    stage: str  # "parse" or "decode"
    reason: str

    @property
    def file_name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


class CatalogError(ValueError):
    """Raised in strict mode when files do not parse, or when nothing is found."""


@dataclass(frozen=True)
class Catalog:
    """The images found under a root, and the files left out."""

    root: str
    table: pa.Table
    rejects: tuple[Reject, ...]

    @property
    def num_images(self) -> int:
        return self.table.num_rows

    @property
    def num_patients(self) -> int:
        return len(set(self.table.column("patient_id").to_pylist()))


def rejects_table(rejects: list[Reject] | tuple[Reject, ...]) -> pa.Table:
    """The rejects as an Arrow table (columns of REJECT_SCHEMA)."""
    return pa.Table.from_pylist(
        [
            {"uri": r.uri, "file_name": r.file_name, "stage": r.stage, "reason": r.reason}
            for r in rejects
        ],
        schema=REJECT_SCHEMA,
    )


def scan_catalog(root: str, *, strict: bool = False) -> Catalog:
    """Catalog every file below ``root`` (local path or s3:// URI).

    Every file is considered: names that do not parse (including non-PNG
    files) are rejects with the reason. Hidden files (``.name``) are ignored.
    Returns a Catalog whose table follows CATALOG_SCHEMA, sorted by uri.

    Raises FileNotFoundError when ``root`` does not exist, CatalogError when
    it holds no BreakHis image, and, with ``strict``, CatalogError naming
    every file whose name does not parse.
    """
    rows: list[dict] = []
    rejects: list[Reject] = []
    seen: dict[str, str] = {}
    for entry in storage.walk(root):
        base = entry.uri.rsplit("/", 1)[-1]
        if base.startswith("."):
            continue
        try:
            tile = parse_name(base)
        except BreakHisNameError as err:
            rejects.append(Reject(entry.uri, "parse", err.reason))
            continue
        tile_id = base.rsplit(".", 1)[0]
        if tile_id in seen:
            rejects.append(Reject(entry.uri, "parse", f"duplicate of {seen[tile_id]}"))
            continue
        seen[tile_id] = entry.uri
        rows.append(
            {
                "tile_id": tile_id,
                "uri": entry.uri,
                "file_name": base,
                "patient_id": tile.patient_id,
                "label": tile.label,
                "subtype": tile.subtype,
                "magnification": tile.magnification,
                "sequence": tile.sequence,
                "size_bytes": entry.size,
            }
        )
    if strict and rejects:
        listing = "\n".join(f"  {r.uri!r}: {r.reason}" for r in rejects)
        raise CatalogError(
            f"{len(rejects)} file(s) under {root} are not BreakHis images (--strict):\n{listing}"
        )
    if rejects:
        # %r: a newline in a file name must not start a forged log line.
        log.warning(
            "skipped %d file(s) under %r whose names do not parse (first: %r: %r)",
            len(rejects),
            root,
            rejects[0].uri,
            rejects[0].reason,
        )
    if not rows:
        raise CatalogError(
            f"{root}: no BreakHis images found (expected names like "
            "SOB_B_A-14-22549AB-40-001.png at any depth)"
        )
    table = pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)
    return Catalog(root=root, table=table, rejects=tuple(rejects))
