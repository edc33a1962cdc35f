"""A prepared DEST, opened once: its manifest (checked), the shards it lists, the pixel sizes
it stores, its content hash and its splits.

``breakhis prepare`` writes a DEST (breakhis/data/prepare.py); every job that reads one opens it
here, once, and hands the PreparedDest down: the training driver's plan, ingest and its tile
reader, evaluation, sweeps, the protocol and scoring a prepared DEST. So the manifest is read
once per job, and what its metadata means (which shards are the DEST's, which pixel sizes
every shard has, the hash a model card records) is decided in this one module.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.data.catalog import CATALOG_SCHEMA
from breakhis.data.pixels import GEOMETRY_KEY, PIXELS_KEY, pixel_file_uri, pixels_uri
from breakhis.data.splits import SplitPatients, SplitSpec, select_split

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
SHARD_SCHEMA = (
    CATALOG_SCHEMA.append(pa.field("width", pa.int32()))
    .append(pa.field("height", pa.int32()))
    .append(pa.field("png", pa.binary()))
)
"""A shard's columns: the catalog's, the image size and the PNG file's bytes."""
SHARDS_KEY = "breakhis.shards"
"""Manifest metadata key: JSON list of the shard file names of its plan."""
SPLIT_KEY = "breakhis.split"
"""Manifest metadata key: JSON of the split options; ``columns`` maps each user-defined
split column to the file its test patients came from."""
HASH_KEY = "breakhis.manifest_hash"
"""Manifest metadata key: manifest_hash of the manifest as prepare wrote it."""
MANIFEST_REQUIRED = ("tile_id", "patient_id", "label")
"""Columns every manifest row needs, never null: splits group tiles by patient and stratify
by label, so a tile without either cannot be placed on one side of a split."""


def manifest_hash(manifest: pa.Table) -> str:
    """A short content hash of a manifest: which tiles, labels and splits.

    The splits are every column that is not a shard's own (``fold``, ``rep0``.. and the
    user-defined split columns), so that a split column added or edited by hand changes it.
    Model artifacts record it so that evaluation can tell which data a model saw.
    """
    digest = hashlib.sha256()
    keep = [
        c
        for c in manifest.column_names
        if c in ("tile_id", "patient_id", "label") or c not in SHARD_SCHEMA.names
    ]
    for row in manifest.select(keep).sort_by("tile_id").to_pylist():
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_manifest(dest: str) -> pa.Table:
    """The manifest of a prepared DEST. Raises FileNotFoundError naming it, and ValueError
    naming the column (and the first row) when a MANIFEST_REQUIRED column is missing or null."""
    uri = storage.join(dest, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no manifest; run `breakhis prepare SRC {dest}` first")
    fs, path = storage.resolve(uri)
    manifest = pq.read_table(path, filesystem=fs)
    for name in MANIFEST_REQUIRED:
        if name not in manifest.column_names:
            raise ValueError(
                f"{uri}: no {name!r} column (columns: {', '.join(manifest.column_names)}); a "
                f"manifest needs {', '.join(MANIFEST_REQUIRED)} (`breakhis prepare` writes them)"
            )
        nulls = manifest.column(name).null_count
        if nulls:
            row = pc.index(pc.is_null(manifest.column(name)), True).as_py()
            raise ValueError(
                f"{uri}: {nulls} row(s) with a null {name!r} (the first is row {row}); every "
                f"tile needs {', '.join(MANIFEST_REQUIRED)} for patient-disjoint splits"
            )
    return manifest


def stored_pixel_sizes(manifest: pa.Table | pa.Schema) -> tuple[int, ...]:
    """The sizes whose pixels every shard of a manifest's plan has (sorted; () for none)."""
    metadata = manifest.schema.metadata if isinstance(manifest, pa.Table) else manifest.metadata
    listed = (metadata or {}).get(PIXELS_KEY.encode())
    if (metadata or {}).get(GEOMETRY_KEY.encode()) != b"aspect":
        return ()  # squashed pixels of an older prepare: decode the PNGs instead
    return tuple(sorted(json.loads(listed))) if listed is not None else ()


def user_split_columns(manifest: pa.Table) -> dict[str, str]:
    """The user-defined split columns of a manifest (``--split-file``), each with the file
    its test patients came from, sorted by name ({} for none)."""
    raw = (manifest.schema.metadata or {}).get(SPLIT_KEY.encode())
    return dict(sorted(json.loads(raw).get("columns", {}).items())) if raw else {}


def listed_shards(manifest: pa.Table | pa.Schema) -> frozenset[str] | None:
    """The shard file names a manifest lists; None for a manifest written before manifests
    listed them (then every shard under DEST/shards is the DEST's)."""
    metadata = manifest.schema.metadata if isinstance(manifest, pa.Table) else manifest.metadata
    listed = (metadata or {}).get(SHARDS_KEY.encode())
    return frozenset(json.loads(listed)) if listed is not None else None


@dataclass(frozen=True)
class PreparedDest:
    """A prepared DEST (local path or ``s3://`` URI) and its checked manifest.

    Build it with ``PreparedDest.open(uri)``; what it derives (the shard URIs, the hash) is
    computed on first use and kept, so a job asks storage once.
    """

    uri: str
    manifest: pa.Table = field(repr=False)

    @classmethod
    def open(cls, uri: str) -> PreparedDest:
        """Read and check DEST's manifest. Raises FileNotFoundError when DEST has none and
        ValueError for a manifest without its required columns (read_manifest)."""
        return cls(uri=uri, manifest=read_manifest(uri))

    @cached_property
    def hash(self) -> str:
        """manifest_hash of the manifest as it is now (a split column edited by hand after
        prepare changes it, so a model card's hash tells which data a model saw)."""
        return manifest_hash(self.manifest)

    @property
    def patients(self) -> frozenset[str]:
        """Every patient id of the manifest."""
        return frozenset(self.manifest.column("patient_id").to_pylist())

    @property
    def pixel_sizes(self) -> tuple[int, ...]:
        """The sizes whose pixels every shard has (``prepare --pixels``), sorted."""
        return stored_pixel_sizes(self.manifest)

    @property
    def user_split_columns(self) -> dict[str, str]:
        """The user-defined split columns (``--split-file``), each with its source file."""
        return user_split_columns(self.manifest)

    def split(self, spec: SplitSpec) -> SplitPatients:
        """The patients of each side of ``spec``; raises ValueError for a split the manifest
        lacks and LeakageError for a patient on two sides (select_split)."""
        return select_split(self.manifest, spec)

    @cached_property
    def shard_uris(self) -> tuple[str, ...]:
        """The URIs of DEST's shards: those its manifest lists (a prepare that died before
        deleting an older plan's shards leaves them behind), or every shard for a manifest
        that lists none. Raises FileNotFoundError naming DEST/shards when there is none."""
        shards_uri = storage.join(self.uri, "shards")
        listed = listed_shards(self.manifest)
        try:
            entries = list(storage.walk(shards_uri, (".parquet",)))
        except FileNotFoundError:
            entries = []
        uris = tuple(
            e.uri
            for e in entries
            if not (name := e.uri.rsplit("/", 1)[-1]).startswith((".", "_"))
            and (listed is None or name in listed)
        )
        if not uris:
            raise FileNotFoundError(
                f"{shards_uri}: no shards; run `breakhis prepare SRC {self.uri}`"
            )
        return uris

    def pixel_files(self, image_size: int, geometry: str = "aspect") -> list[str] | None:
        """The stored pixel files at ``image_size`` (one per shard), or None when the
        manifest lists no such size, a file is missing, or the run squashes tiles
        (``geometry`` square: stored pixels keep the aspect); then ingest decodes PNGs,
        saying why."""
        if geometry != "aspect" or image_size not in self.pixel_sizes:
            return None
        wanted = [pixel_file_uri(u, image_size) for u in self.shard_uris]
        try:
            there = {e.uri for e in storage.walk(pixels_uri(self.uri, image_size), (".parquet",))}
        except FileNotFoundError:
            there = set()
        missing = [u for u in wanted if u not in there]
        if missing:
            log.warning(
                "%d stored pixel file(s) at %d px missing (e.g. %s): decoding PNGs instead; "
                "`breakhis prepare SRC %s --pixels %d` rewrites them",
                len(missing),
                image_size,
                missing[0],
                self.uri,
                image_size,
            )
            return None
        return wanted
