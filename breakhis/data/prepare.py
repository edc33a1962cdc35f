"""Prepare job: catalog a BreakHis tree, check every image decodes, pack the
PNG bytes into Parquet shards for streaming, and assign patient-disjoint splits.

Writes to DEST (local or ``s3://``):

- ``shards/part-NNNNN-<hash>.parquet``: catalog columns, ``width``, ``height``
  and ``png`` (the file's bytes), ~``shard_mb`` per file in row groups of at
  most ``row_group_rows`` rows;
- ``manifest.parquet``: one row per accepted image with the split columns
  (``fold``, ``rep0``.., and one per ``--split-file NAME=PATH``) but no pixels;
- ``rejects.parquet``: every file that failed to parse or decode, with the reason;
- with ``--pixels S[,S2]``: ``pixels/S/part-NNNNN-<hash>.parquet`` beside each shard, its
  tiles decoded and resized to S x S uint8 (breakhis/data/pixels.py), so that training and
  scoring at ``--image-size S`` read pixels instead of decoding PNGs. A rerun with a new
  size adds it (reading the PNG shards, rewriting none of them nor the sizes already
  there); the manifest lists every stored size, and a rerun keeps them all.

Shards are planned deterministically from the catalog and named by a hash of
their members, so a re-run skips shards that are already complete (a job that
died part-way resumes), rewrites none twice, and deletes shards of an older
plan: the result is the same whatever happened before.

User-defined splits: ``--split-file heldout=patients.txt`` (repeatable) adds the
manifest column ``heldout``, ``test`` for the patient ids the file lists (one per
line, ``#`` comments and blank lines ignored) and ``train`` for the others; jobs
use it as ``--split column:heldout``. An id the data does not have is refused
before Ray starts. The column is part of the manifest hash, so a model trained
before it changed cannot be evaluated against it. A rerun keeps the split columns
of earlier runs (as it keeps stored pixels: dropping one would change the hash
under every model trained on DEST); naming a column again replaces it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.data.catalog import Reject, rejects_table, scan_catalog
from breakhis.data.dest import (
    HASH_KEY,
    SHARD_SCHEMA,
    SHARDS_KEY,
    SPLIT_KEY,
    manifest_hash,
    read_manifest,
    stored_pixel_sizes,
    user_split_columns,
)
from breakhis.data.geometry import TileGeometry, canonical_width
from breakhis.data.imaging import decode_rgb
from breakhis.data.pixels import (
    GEOMETRY_KEY,
    PIXELS_KEY,
    encode_pixel_file,
    is_complete,
    pixel_file_uri,
)
from breakhis.data.prepare_config import PrepareConfig, parse_split_files
from breakhis.data.splits import (
    SplitSpec,
    add_split_columns,
    read_patient_list,
    select_split,
    user_split_column,
)
from breakhis.data.transforms import to_chw
from breakhis.raysession import ensure_ray

log = logging.getLogger(__name__)

_REJECTS_KEY = b"breakhis.rejects"


@dataclass(frozen=True)
class ShardPlan:
    """The rows that go into one shard, and its file name."""

    index: int
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(f"{row['uri']}\0{row['size_bytes']}\n".encode())
        return f"part-{self.index:05d}-{digest.hexdigest()[:12]}.parquet"


@dataclass(frozen=True)
class ShardResult:
    """What writing (or finding) one shard produced."""

    name: str
    metadata: pa.Table  # accepted rows, without the png column
    rejects: tuple[Reject, ...]
    skipped: bool  # True when the shard was already complete
    pixel_files: int = 0  # pixel files written (one per size the shard lacked)


@dataclass(frozen=True)
class PrepareSummary:
    """What the prepare job produced."""

    dest: str
    images: int
    patients: int
    rejects: int
    shards: int
    shards_written: int
    shards_deleted: int
    pixel_sizes: tuple[int, ...]
    pixel_files_written: int
    counts: dict[str, int]  # "class/magnification" -> images
    split_counts: dict[str, int]  # "fold K test" -> images

    def format_table(self) -> str:
        """A plain-text summary table for the terminal."""
        lines = [
            f"prepared {self.images} images of {self.patients} patients into {self.dest}",
            f"shards: {self.shards} ({self.shards_written} written, "
            f"{self.shards - self.shards_written} already complete, "
            f"{self.shards_deleted} stale deleted); rejects: {self.rejects}",
            "stored pixels: "
            + (
                f"{', '.join(f'{s}x{canonical_width(s)}' for s in self.pixel_sizes)} "
                f"({self.pixel_files_written} file(s) written)"
                if self.pixel_sizes
                else "none (--pixels S stores them)"
            ),
            "",
            f"{'class':<10}{'40X':>7}{'100X':>7}{'200X':>7}{'400X':>7}{'total':>8}",
        ]
        for cls in ("benign", "malignant"):
            cells = [self.counts.get(f"{cls}/{m}", 0) for m in (40, 100, 200, 400)]
            lines.append(f"{cls:<10}" + "".join(f"{c:>7}" for c in cells) + f"{sum(cells):>8}")
        lines.append("")
        lines.append(
            "test images per split: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.split_counts.items()))
        )
        return "\n".join(lines)


def plan_shards(catalog: pa.Table, *, shard_mb: float) -> list[ShardPlan]:
    """Group catalog rows (in uri order) into shards of about ``shard_mb`` MB."""
    limit = shard_mb * 1e6
    plans: list[ShardPlan] = []
    current: list[dict] = []
    size = 0
    for row in catalog.sort_by("uri").to_pylist():
        if current and size + row["size_bytes"] > limit:
            plans.append(ShardPlan(len(plans), tuple(current)))
            current, size = [], 0
        current.append(row)
        size += row["size_bytes"]
    if current:
        plans.append(ShardPlan(len(plans), tuple(current)))
    return plans


def _read_existing(uri: str, *, with_png: bool = False) -> tuple[ShardResult, pa.Table] | None:
    """The result of a complete shard already at ``uri`` and its rows (with the PNG bytes
    when ``with_png``), or None."""
    fs, path = storage.resolve(uri)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    table = parquet.read(columns=[f.name for f in SHARD_SCHEMA if with_png or f.name != "png"])
    raw = parquet.schema_arrow.metadata or {}
    rejects = tuple(Reject(**r) for r in json.loads(raw.get(_REJECTS_KEY, b"[]")))
    metadata = table.drop_columns(["png"]) if with_png else table
    return ShardResult(uri.rsplit("/", 1)[-1], metadata, rejects, skipped=True), table


def _write_pixels(
    shard_uri: str, rows: pa.Table, images: dict[int, list[np.ndarray]], row_group_rows: int
) -> None:
    for size, tiles in images.items():
        stack = np.stack(tiles) if tiles else np.empty((0, 3, size, size), np.uint8)
        data = encode_pixel_file(rows, stack, row_group_rows=row_group_rows)
        storage.write_bytes(pixel_file_uri(shard_uri, size), data)


def write_shard(
    plan: ShardPlan, shards_uri: str, row_group_rows: int, sizes: tuple[int, ...] = ()
) -> ShardResult:
    """Read, decode-check and pack one shard, and store its pixels at each of ``sizes``;
    skip what is already complete (an existing shard's PNGs are decoded only for a size
    it lacks). Each tile is decoded once, whatever the number of sizes.

    Files that cannot be read (missing, refused) or decoded become rejects; they never
    raise. A transient storage error still there after retries (throttling, 5xx, no answer)
    raises breakhis.storage.TransientStorageError: the task fails, so that Ray retries it or
    the job fails and is rerun, instead of the image being rejected for good.
    """
    uri = storage.join(shards_uri, plan.name)
    missing = [s for s in sizes if not is_complete(pixel_file_uri(uri, s), s)]
    existing = _read_existing(uri, with_png=bool(missing))
    if existing is not None:
        result, table = existing
        if missing:
            # Accepted rows decode (this shard's own check said so when it was written).
            images = {s: [] for s in missing}
            for data in table.column("png").to_pylist():
                pixels = decode_rgb(data)
                for size in missing:
                    images[size].append(to_chw(TileGeometry(size=size).canonical(pixels)))
            _write_pixels(uri, table, images, row_group_rows)
        return replace(result, pixel_files=len(missing))
    rows: list[dict] = []
    rejects: list[Reject] = []
    images = {s: [] for s in sizes}
    for row in plan.rows:
        try:
            data = storage.read_retrying(row["uri"])
        except storage.TransientStorageError:
            raise  # the task fails, to be retried: a reject would drop the image for good
        except OSError as err:
            rejects.append(Reject(row["uri"], "read", str(err)))
            continue
        try:
            pixels = decode_rgb(data)  # the whole decode proves the file usable
        except ValueError as err:
            rejects.append(Reject(row["uri"], "decode", str(err)))
            continue
        for size in sizes:
            images[size].append(to_chw(TileGeometry(size=size).canonical(pixels)))
        height, width = pixels.shape[:2]
        rows.append({**row, "size_bytes": len(data), "width": width, "height": height, "png": data})
    meta = {_REJECTS_KEY: json.dumps([asdict(r) for r in rejects]).encode()}
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA.with_metadata(meta))
    # Pixels first: a shard on storage then has its pixels unless a size was added later.
    _write_pixels(uri, table, images, row_group_rows)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_rows, compression="none")
    storage.write_bytes(uri, buffer.getvalue())
    return ShardResult(
        plan.name,
        table.drop_columns(["png"]),
        tuple(rejects),
        skipped=False,
        pixel_files=len(sizes),
    )


def _table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _previous_pixel_sizes(dest: str) -> tuple[int, ...]:
    fs, path = storage.resolve(storage.join(dest, "manifest.parquet"))
    try:
        return stored_pixel_sizes(pq.read_schema(fs.open_input_file(path)))
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return ()


def _test_patients(config: PrepareConfig, catalog: pa.Table) -> dict[str, tuple[str, frozenset]]:
    """Each user-defined split column: NAME -> (source, its test patients), from the split
    files given and, for the names not given again, DEST's current manifest. Raises
    FileNotFoundError for a missing file and ValueError for one that is not text or lists
    patient ids ``catalog`` lacks (before Ray starts)."""
    known = frozenset(catalog.column("patient_id").to_pylist())
    chosen: dict[str, tuple[str, frozenset]] = {}
    for name, path in parse_split_files(config.split_file).items():
        try:
            text = storage.read_bytes(path).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--split-file {name}={path}: not UTF-8 text ({err})") from err
        test = frozenset(read_patient_list(text))
        user_split_column(known, test, known=known, source=f"--split-file {name}={path}")
        chosen[name] = (path, test)
    try:
        previous = read_manifest(config.dest)
    except FileNotFoundError:
        return chosen
    for name, source in user_split_columns(previous).items():
        if name in chosen or name not in previous.column_names:
            continue  # given again: the new list replaces it
        rows = previous.filter(pc.equal(previous.column(name), "test"))
        kept = frozenset(rows.column("patient_id").to_pylist()) & known
        if not kept:
            log.warning("dropping split column %r: none of its test patients is in SRC", name)
            continue
        log.info("keeping split column %r of the earlier run (from %s)", name, source)
        chosen[name] = (source, kept)
    return dict(sorted(chosen.items()))


def _add_user_split_columns(
    manifest: pa.Table, columns: dict[str, tuple[str, frozenset]], known: frozenset[str]
) -> pa.Table:
    """Append the user-defined split columns and run the split checks on each."""
    patients = manifest.column("patient_id").to_pylist()
    for name, (source, test) in columns.items():
        column = user_split_column(
            patients, test, known=known, source=f"--split-file {name}={source}"
        )
        manifest = manifest.append_column(name, column)
        select_split(manifest, SplitSpec("column", column=name))  # one side per patient
    return manifest


def _stale_pixel_files(dest: str, shards: set[str], sizes: tuple[int, ...]) -> list[str]:
    """Pixel files of no shard of the plan, or of a size the manifest does not list."""
    try:
        entries = list(storage.walk(storage.join(dest, "pixels"), (".parquet",)))
    except FileNotFoundError:
        return []
    folders = {str(s) for s in sizes}
    return [
        e.uri
        for e in entries
        if e.uri.rsplit("/", 1)[-1] not in shards or e.uri.rsplit("/", 2)[-2] not in folders
    ]


def prepare(config: PrepareConfig) -> PrepareSummary:
    """Run the prepare job on the current Ray cluster (started locally if none).

    Returns a PrepareSummary. Raises FileNotFoundError when SRC does not
    exist, CatalogError when it holds no BreakHis image (or, with strict, a
    name does not parse), ValueError when the patients cannot be split.
    """
    import ray

    catalog = scan_catalog(config.src, strict=config.strict)
    user_splits = _test_patients(config, catalog.table)  # a bad list fails before Ray starts
    plans = plan_shards(catalog.table, shard_mb=config.shard_mb)
    ensure_ray()  # only now: a SRC without images fails before Ray starts
    shards_uri = storage.join(config.dest, "shards")
    storage.make_dirs(shards_uri)
    sizes = tuple(sorted(set(config.pixels) | set(_previous_pixel_sizes(config.dest))))
    log.info(
        "checking and packing %d images into %d shard(s)%s",
        catalog.num_images,
        len(plans),
        f", pixels at {', '.join(map(str, sizes))}" if sizes else "",
    )

    remote = ray.remote(
        num_cpus=1, max_retries=3, retry_exceptions=[storage.TransientStorageError]
    )(write_shard)
    refs = [remote.remote(plan, shards_uri, config.row_group_rows, sizes) for plan in plans]
    results: list[ShardResult] = ray.get(refs)

    wanted = {p.name for p in plans}
    accepted = pa.concat_tables([r.metadata for r in results]).sort_by("uri")
    rejects = list(catalog.rejects) + [rej for r in results for rej in r.rejects]
    if accepted.num_rows == 0:
        raise ValueError(f"{config.src}: no image decoded; see {config.dest}/rejects.parquet")
    known = frozenset(catalog.table.column("patient_id").to_pylist())
    manifest = _manifest(accepted, config, user_splits, known, shards=wanted, pixel_sizes=sizes)
    storage.write_bytes(storage.join(config.dest, "manifest.parquet"), _table_bytes(manifest))
    storage.write_bytes(
        storage.join(config.dest, "rejects.parquet"),
        _table_bytes(rejects_table(sorted(rejects, key=lambda r: r.uri))),
    )
    stale = _delete_stale_files(config.dest, shards_uri, wanted, sizes)
    for reject in rejects:
        # %r: a newline in a file name must not start a forged log line.
        log.info("rejected %r (%s): %r", reject.uri, reject.stage, reject.reason)

    return PrepareSummary(
        dest=config.dest,
        images=manifest.num_rows,
        patients=len(set(manifest.column("patient_id").to_pylist())),
        rejects=len(rejects),
        shards=len(plans),
        shards_written=sum(not r.skipped for r in results),
        shards_deleted=len(stale),
        pixel_sizes=sizes,
        pixel_files_written=sum(r.pixel_files for r in results),
        counts=_class_counts(manifest),
        split_counts=_test_counts(manifest, config.repetitions, user_splits),
    )


def _manifest(
    accepted: pa.Table,
    config: PrepareConfig,
    user_splits: dict,
    known: frozenset[str],
    *,
    shards: set[str],
    pixel_sizes: tuple[int, ...],
) -> pa.Table:
    """The manifest: the accepted tiles with the split columns (the paper's folds and
    repetitions, then the user's), and in its metadata the split options, the content hash,
    the shard list readers take and the stored pixel sizes."""
    manifest = add_split_columns(
        accepted,
        folds=config.folds,
        repetitions=config.repetitions,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    manifest = _add_user_split_columns(manifest, user_splits, known)
    split_options = {
        "folds": config.folds,
        "repetitions": config.repetitions,
        "test_fraction": config.test_fraction,
        "seed": config.seed,
    }
    if user_splits:
        split_options["columns"] = {name: source for name, (source, _) in user_splits.items()}
    return manifest.replace_schema_metadata(
        {
            SPLIT_KEY: json.dumps(split_options),
            HASH_KEY: manifest_hash(manifest),
            # Readers take exactly these shards, so stale ones left by a job that died
            # before deleting them are never read twice.
            SHARDS_KEY: json.dumps(sorted(shards)),
            PIXELS_KEY: json.dumps(list(pixel_sizes)),
            GEOMETRY_KEY: "aspect",
        }
    )


def _delete_stale_files(
    dest: str, shards_uri: str, wanted: set[str], sizes: tuple[int, ...]
) -> list[str]:
    """Delete the shards and pixel files of an older plan; returns the shards deleted.

    Called only once the new manifest is in place: a job that dies here leaves extra files
    (which readers skip), never a manifest that points at deleted ones."""
    stale = [
        e.uri
        for e in storage.walk(shards_uri, (".parquet",))
        if e.uri.rsplit("/", 1)[-1] not in wanted
    ]
    for uri in _stale_pixel_files(dest, wanted, sizes):
        storage.delete(uri)
    for uri in stale:
        storage.delete(uri)
    return stale


def _class_counts(manifest: pa.Table) -> dict[str, int]:
    """Images per class and magnification, e.g. ``{"benign/40": 625, ...}``."""
    labels = manifest.column("label").to_pylist()
    mags = manifest.column("magnification").to_pylist()
    pairs = zip(labels, mags, strict=True)
    return dict(Counter(f"{('benign', 'malignant')[c]}/{m}" for c, m in pairs))


def _test_counts(manifest: pa.Table, repetitions: int, user_splits: dict) -> dict[str, int]:
    """Images per fold, and test images of each repetition and user split column."""
    counts = Counter(f"fold{f}" for f in manifest.column("fold").to_pylist())
    for name in [f"rep{i}" for i in range(repetitions)] + list(user_splits):
        counts[name] = pc.sum(pc.equal(manifest.column(name), "test")).as_py()
    return dict(counts)
