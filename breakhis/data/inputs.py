"""What a scoring job scores: the list of input tiles, found the same way every time.

Three kinds of input, told apart by what is at the URI:

- **prepared**: a prepare job's DEST (``manifest.parquet`` beside ``shards/``).
  Every row of ``shards/*.parquet`` is one tile; its bytes are read from the
  shard, its facts from the shard's columns. (Files prepare rejected are not
  tiles: they are listed in DEST's ``rejects.parquet``.)
- **manifest**: one file listing URIs: ``.parquet`` or ``.csv`` with a ``uri``
  column, or ``.txt`` with one URI per line (blank lines and ``#`` comments
  skipped). Relative entries are relative to the manifest's folder. A URI
  listed twice is one tile (its first row). A Parquet or CSV manifest's other
  columns follow INPUT_SCHEMA's in the listing (``user_columns``): Parquet's with
  their types, CSV's as text; one named like an INPUT_SCHEMA column is refused.
- **prefix**: anything else, a local folder or ``s3://bucket/prefix`` (or one
  image file): every PNG, JPEG or TIFF below it at any depth; hidden files
  (``.name``) and other suffixes are not tiles.

Facts are parsed from BreakHis file names when they parse (``.jpg``/``.tif``
versions of a BreakHis name too); otherwise they are null. The tile id is the
data contract's (the file name without extension, e.g.
``SOB_B_A-14-22549AB-40-001``) for BreakHis names, and for any other name the
path relative to the input root (prefix) or to the manifest's folder, with its
extension, e.g. ``scanner1/slide7/tile_0001.jpg``; a BreakHis name found twice
falls back to the relative path for both copies, so ids stay unique. Entries of
a manifest outside its folder keep their whole URI (scheme dropped) as the id.

The listing is sorted by URI, so the same input always gives the same table:
that is what lets the scoring job cut it into the same work units on a rerun.

At scale (``list_inputs``): a prefix is read page by page, never whole. A local folder
or an S3 prefix (ListObjectsV2 with delimiter ``/``, 1,000 keys a request) is walked
depth-first with each folder's entries sorted by name (a subfolder as ``name/``), which
yields paths in the same order as sorting them as strings; memory holds one folder's
names at a time. Two passes: the first counts
the tiles and keeps an 8-byte hash of each BreakHis stem (to find names found twice:
8 bytes a tile, the only thing held per tile), the second yields INPUT_SCHEMA pages,
the same rows as ``discover_inputs``. A manifest (one file) or a prepared DEST is read
as by ``discover_inputs`` and then paged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.names import BreakHisNameError, TileName, parse_name

log = logging.getLogger(__name__)

TILE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""File name endings of tiles found under a prefix (case-insensitive)."""
MANIFEST_SUFFIXES: tuple[str, ...] = (".parquet", ".csv", ".txt")
"""File name endings that make an input URI a manifest listing URIs."""
KINDS: tuple[str, ...] = ("prefix", "prepared", "manifest")
PAGE_ROWS = 65_536
"""Rows of one page of ``list_inputs``."""

INPUT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("tile_id", pa.string()),
        ("file_name", pa.string()),
        ("patient_id", pa.string()),
        ("magnification", pa.int16()),
        ("subtype", pa.string()),
        ("label", pa.int8()),
        ("shard", pa.string()),  # the prepared shard holding the bytes; null: read ``uri``
    ]
)
"""One row per input tile; facts are null when the name is not a BreakHis name."""


@dataclass(frozen=True)
class InputSet:
    """The tiles of one input URI."""

    source: str
    kind: str  # one of KINDS
    table: pa.Table  # INPUT_SCHEMA, sorted by uri, uri unique

    @property
    def num_tiles(self) -> int:
        return self.table.num_rows


def parse_tile_name(file_name: str) -> TileName | None:
    """The BreakHis facts of a file name, or None when it is not a BreakHis name.

    Accepts the official ``.png`` and the same name with a JPEG or TIFF suffix.
    """
    base = file_name.rsplit("/", 1)[-1]
    stem, dot, suffix = base.rpartition(".")
    if not dot or f".{suffix.lower()}" not in TILE_SUFFIXES:
        return None
    try:
        return parse_name(f"{stem}.png")
    except BreakHisNameError:
        return None


@dataclass(frozen=True)
class Listing:
    """The tiles of one input URI, read page by page (module docstring)."""

    source: str
    kind: str  # one of KINDS
    num_tiles: int
    read_pages: Callable[[], Iterator[pa.Table]]
    """A fresh iterator over pages of ``schema``, sorted by uri across pages."""
    schema: pa.Schema = INPUT_SCHEMA
    """INPUT_SCHEMA, then a manifest's own columns (``user_columns``)."""

    def pages(self) -> Iterator[pa.Table]:
        return self.read_pages()


def list_inputs(uri: str, page_rows: int = PAGE_ROWS) -> Listing:
    """The tiles of ``uri`` like ``discover_inputs``, without holding a prefix's whole
    listing: its rows come in pages of ``page_rows``. Raises as ``discover_inputs``."""
    if _is_prepared(uri) or uri.lower().endswith(MANIFEST_SUFFIXES) or storage.is_file(uri):
        found = discover_inputs(uri)
        table = found.table

        def slices() -> Iterator[pa.Table]:
            for start in range(0, table.num_rows, page_rows):
                yield table.slice(start, page_rows)

        return Listing(uri, found.kind, found.num_tiles, slices, table.schema)
    count, duplicated = _count_prefix(uri)
    if count == 0:
        _no_tiles(uri)
    log.info("input %s (prefix): %d tiles", uri, count)
    fs, path = storage.resolve(uri)
    root = storage.to_uri(fs, path)
    return Listing(uri, "prefix", count, lambda: _prefix_pages(uri, root, duplicated, page_rows))


def _stem_hash(stem: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(stem.encode(), digest_size=8).digest(), "little", signed=True
    )


def _count_prefix(uri: str) -> tuple[int, set[int]]:
    """Pass 1: (tiles, hashes of the BreakHis stems found more than once)."""
    hashes = array("q")
    count = 0
    for tile in _tile_uris(uri):
        count += 1
        base = tile.rsplit("/", 1)[-1]
        if parse_tile_name(base) is not None:
            hashes.append(_stem_hash(base.rsplit(".", 1)[0]))
    values, counts = np.unique(np.frombuffer(hashes, dtype=np.int64), return_counts=True)
    return count, set(values[counts > 1].tolist())


def _prefix_pages(uri: str, root: str, duplicated: set[int], page_rows: int) -> Iterator[pa.Table]:
    """Pass 2: INPUT_SCHEMA pages, ids as ``_rows_for`` gives them."""
    page: list[str] = []
    for tile in _tile_uris(uri):
        page.append(tile)
        if len(page) == page_rows:
            yield _page_rows(page, root, duplicated)
            page = []
    if page:
        yield _page_rows(page, root, duplicated)


def _page_rows(uris: list[str], root: str, duplicated: set[int]) -> pa.Table:
    rows = []
    for uri in uris:
        base = uri.rsplit("/", 1)[-1]
        stem = base.rsplit(".", 1)[0]
        tile = parse_tile_name(base)
        plain = tile is not None and _stem_hash(stem) not in duplicated
        rows.append(_row(uri, base, stem if plain else _relative_id(uri, root), tile))
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def _tile_uris(uri: str) -> Iterator[str]:
    """The tiles below a prefix (tile suffix, not hidden), sorted, one at a time."""
    for found in _walk_sorted(uri):
        base = found.rsplit("/", 1)[-1]
        if not base.startswith(".") and base.lower().endswith(TILE_SUFFIXES):
            yield found


def _walk_sorted(uri: str) -> Iterator[str]:
    """Every file below ``uri`` in sorted URI order, page by page. Raises
    FileNotFoundError naming the URI when nothing is there."""
    fs, path = storage.resolve(uri)
    if not storage.is_s3(uri):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{uri}: no such file or folder")
        yield from _local_sorted(path)
        return
    bucket, _, prefix = path.partition("/")
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    seen = False
    for key in _s3_sorted(s3_client(), bucket, prefix):
        seen = True
        yield f"s3://{bucket}/{key}"
    if not seen and not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no such file or folder")


def _s3_sorted(client, bucket: str, prefix: str) -> Iterator[str]:
    """Keys below ``prefix`` in sorted order, one "folder" (delimiter ``/``) at a time:
    servers differ in the order of a flat listing (AWS: by key; SeaweedFS: folder by
    folder), so each level's keys and sub-prefixes (``name/``) are sorted here, as
    ``_local_sorted`` sorts a folder."""
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/"
    )
    entries = []
    for page in pages:
        entries += [(i["Key"], False) for i in page.get("Contents", []) if i["Key"] != prefix]
        entries += [(p["Prefix"], True) for p in page.get("CommonPrefixes", [])]
    for key, is_folder in sorted(entries):
        if is_folder:
            yield from _s3_sorted(client, bucket, key)
        elif not key.endswith("/"):
            yield key


def _local_sorted(folder: str) -> Iterator[str]:
    with os.scandir(folder) as found:
        entries = [(e.name + "/" if e.is_dir() else e.name, e.path, e.is_dir()) for e in found]
    for _, path, is_dir in sorted(entries):
        if is_dir:
            yield from _local_sorted(path)
        else:
            yield path


def s3_client():
    """A boto3 S3 client set up like breakhis.storage's filesystem: endpoint and region
    from the AWS environment, credentials from the SDK's chain, the same timeouts."""
    import boto3
    import botocore.config

    config = botocore.config.Config(
        connect_timeout=storage.CONNECT_TIMEOUT_S,
        read_timeout=storage.REQUEST_TIMEOUT_S,
        retries={"max_attempts": storage.RETRY_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)


def discover_inputs(uri: str) -> InputSet:
    """List the tiles of ``uri`` (a prepared DEST, a manifest file, or a prefix).

    Returns an InputSet whose table follows INPUT_SCHEMA, sorted by uri, followed by a
    Parquet or CSV manifest's other columns (``user_columns``), as the manifest holds them
    (CSV: text).
    Raises FileNotFoundError naming the URI when nothing is there, and
    ValueError when a manifest has no ``uri`` column or the input holds no tile
    (saying what is accepted).
    """
    if _is_prepared(uri):
        kind, table = "prepared", prepared_rows(PreparedDest.open(uri))
    elif uri.lower().endswith(MANIFEST_SUFFIXES):
        kind, table = "manifest", _manifest_rows(uri)
    else:
        kind, table = "prefix", _prefix_rows(uri)
    if table.num_rows == 0:
        _no_tiles(uri)
    log.info("input %s (%s): %d tiles", uri, kind, table.num_rows)
    return InputSet(source=uri, kind=kind, table=table)


def _no_tiles(uri: str) -> None:
    raise ValueError(
        f"{uri}: no tiles found; accepted: a prepared DEST (manifest.parquet + shards/), "
        f"a manifest ({', '.join(MANIFEST_SUFFIXES)}) listing URIs, or a folder/prefix "
        f"holding {', '.join(TILE_SUFFIXES)} files at any depth"
    )


def _is_prepared(uri: str) -> bool:
    if uri.lower().endswith(MANIFEST_SUFFIXES + TILE_SUFFIXES):
        return False
    return storage.exists(storage.join(uri, "manifest.parquet")) and storage.exists(
        storage.join(uri, "shards")
    )


def prepared_rows(dest: PreparedDest) -> pa.Table:
    """The tiles of a prepared DEST as an input listing (INPUT_SCHEMA, sorted by URI), read
    from the shards its manifest lists (PreparedDest.shard_uris: a prepare that died before
    deleting an older plan's shards leaves them behind, and their tiles are not the DEST's).
    Raises ValueError when a tile is in two shards."""
    tables = []
    for shard in dest.shard_uris:
        fs, path = storage.resolve(shard)
        columns = ["uri", "tile_id", "file_name", "patient_id", "magnification", "subtype", "label"]
        # Only the small columns: the png bytes stay in the shard until a decode task reads them.
        part = pq.read_table(path, filesystem=fs, columns=columns)
        part = part.append_column("shard", pa.array([shard] * part.num_rows, pa.string()))
        tables.append(part.cast(INPUT_SCHEMA))
    if not tables:
        return INPUT_SCHEMA.empty_table()
    table = pa.concat_tables(tables).sort_by("uri")
    uris = table.column("uri").to_pylist()
    if len(set(uris)) != len(uris):
        # Two shards of different prepare plans: one prepare run deletes stale shards, so this
        # means a DEST written to by hand. Scoring both copies would give two rows per tile.
        dup = next(u for u, n in Counter(uris).items() if n > 1)
        raise ValueError(
            f"{dest.uri}/shards: tile {dup} is in more than one shard; re-run "
            f"`breakhis prepare` into {dest.uri} to rewrite a consistent set of shards"
        )
    return table


def _manifest_rows(manifest: str) -> pa.Table:
    """INPUT_SCHEMA rows of a manifest's URIs, then its other columns (a Parquet
    manifest's with their types, a CSV's as text); a URI listed twice keeps its first
    row's values."""
    data = storage.read_bytes(manifest)
    lower = manifest.lower()
    user = pa.table({})
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        if "uri" not in table.column_names:
            raise ValueError(
                f"{manifest}: no 'uri' column (columns: {', '.join(table.column_names)}); "
                "a Parquet manifest needs a string column named uri"
            )
        keep = [i for i, u in enumerate(table.column("uri").to_pylist()) if u]
        entries = [str(table.column("uri")[i].as_py()) for i in keep]
        user = table.drop_columns(["uri"]).take(pa.array(keep, pa.int64()))
    elif lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        if not reader.fieldnames or "uri" not in reader.fieldnames:
            raise ValueError(
                f"{manifest}: no 'uri' column in the CSV header "
                f"({', '.join(reader.fieldnames or [])}); the first line must name the columns"
            )
        others = [name for name in reader.fieldnames if name != "uri"]
        rows = [row for row in reader if (row["uri"] or "").strip()]
        entries = [row["uri"].strip() for row in rows]
        user = pa.table({name: pa.array([r[name] for r in rows], pa.string()) for name in others})
    else:
        lines = (line.strip() for line in data.decode("utf-8-sig").splitlines())
        entries = [line for line in lines if line and not line.startswith("#")]
    folder = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    uris = [_absolute(entry, folder) for entry in entries]
    first = {}
    for i, uri in enumerate(uris):
        first.setdefault(uri, i)
    unique = sorted(first)
    if len(unique) != len(uris):
        log.warning(
            "%s lists %d URI(s) more than once; each is scored once (with its first row's columns)",
            manifest,
            len(uris) - len(unique),
        )
    rows = _rows_for(unique, root=folder)
    if not user.num_columns:
        return rows
    for name in user.column_names:
        if name in INPUT_SCHEMA.names:
            raise ValueError(
                f"{manifest}: column {name!r} clashes with a column the listing itself "
                f"gives; reserved: {', '.join(INPUT_SCHEMA.names)}; rename it"
            )
    # _rows_for sorts by uri, as ``unique`` is: the user's rows in the same order.
    taken = user.take(pa.array([first[u] for u in unique], pa.int64()))
    for name in taken.column_names:
        rows = rows.append_column(taken.schema.field(name), taken.column(name))
    return rows


def user_columns(table: pa.Table) -> pa.Schema:
    """The columns of a listing beyond INPUT_SCHEMA (a manifest's own columns)."""
    return pa.schema([f for f in table.schema if f.name not in INPUT_SCHEMA.names])


def _absolute(entry: str, folder: str) -> str:
    if storage.is_s3(entry) or entry.startswith("/"):
        return entry
    if entry.startswith("file://"):
        return entry[len("file://") :]
    if "://" in entry:
        raise ValueError(f"{entry!r}: unsupported scheme; accepted: s3://bucket/key or a path")
    if storage.is_s3(folder):
        return storage.join(folder, entry)
    return os.path.normpath(os.path.join(storage.resolve(folder)[1], entry))


def _prefix_rows(prefix: str) -> pa.Table:
    uris = []
    skipped = 0
    for entry in storage.walk(prefix):
        base = entry.uri.rsplit("/", 1)[-1]
        if base.startswith("."):
            continue
        if not base.lower().endswith(TILE_SUFFIXES):
            skipped += 1
            continue
        uris.append(entry.uri)
    if skipped:
        log.info("%s: %d file(s) without a tile suffix are not scored", prefix, skipped)
    fs, path = storage.resolve(prefix)
    root = storage.to_uri(fs, path)
    if len(uris) == 1 and uris[0] == root:  # the input is one file
        root = root.rsplit("/", 1)[0]
    return _rows_for(uris, root=root)


def _relative_id(uri: str, root: str) -> str:
    if not storage.is_s3(root):
        root = storage.resolve(root)[1]
    root = root.rstrip("/") + "/"
    if uri.startswith(root):
        return uri[len(root) :]
    return uri.split("://", 1)[-1].lstrip("/")


def _rows_for(uris: list[str], *, root: str) -> pa.Table:
    """Rows of INPUT_SCHEMA for file URIs (sorted) found under or listed beside ``root``."""
    uris = sorted(uris)
    parsed = [parse_tile_name(u) for u in uris]
    stems = Counter(
        u.rsplit("/", 1)[-1].rsplit(".", 1)[0] for u, p in zip(uris, parsed, strict=True) if p
    )
    twice = {s for s, n in stems.items() if n > 1}
    if twice:
        log.warning(
            "%d BreakHis name(s) occur more than once (e.g. %s); those tiles are identified "
            "by their relative path",
            len(twice),
            sorted(twice)[0],
        )
    rows = []
    for uri, tile in zip(uris, parsed, strict=True):
        base = uri.rsplit("/", 1)[-1]
        stem = base.rsplit(".", 1)[0]
        tile_id = stem if tile is not None and stem not in twice else _relative_id(uri, root)
        rows.append(_row(uri, base, tile_id, tile))
    ids = Counter(row["tile_id"] for row in rows)
    for row in rows:
        if ids[row["tile_id"]] > 1:  # e.g. /b/k and s3://b/k in one manifest
            row["tile_id"] = row["uri"]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def _row(uri: str, base: str, tile_id: str, tile: TileName | None) -> dict:
    return {
        "uri": uri,
        "tile_id": tile_id,
        "file_name": base,
        "patient_id": tile.patient_id if tile else None,
        "magnification": tile.magnification if tile else None,
        "subtype": tile.subtype if tile else None,
        "label": tile.label if tile else None,
        "shard": None,
    }
