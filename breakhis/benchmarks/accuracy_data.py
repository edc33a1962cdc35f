"""The data the accuracy benchmark runs on (breakhis/benchmarks/accuracy.py): the shared real
BreakHis folders by default, a folder of PNGs, a prepared DEST or generated data, prepared into
the workdir, and the tiles the reference loop reads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa

from breakhis import storage

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
"""The shared real BreakHis folders beside the repository."""

SAMPLE = REALDATA / "breakhis-sample"
"""The real sample: 60 images of 11 patients."""

DEV = REALDATA / "breakhis-dev"
"""The real development set: 197 images of 16 other patients."""

GENERATED = "generated"
"""The ``--data`` value that asks for generated data."""

GENERATED_SEED = 0
"""Seed of the generated data (the runs' seeds are the benchmark's --seeds)."""


def default_data() -> tuple[str, str]:
    """(source, kind) of the default --data: the realdata folder (prepare reads any nesting,
    so its two folders are prepared together; its README is listed among the rejects) when it
    holds both the sample and the development set, else the sample when present, else
    generated data."""
    if SAMPLE.is_dir() and DEV.is_dir():
        return str(REALDATA), "raw"
    if SAMPLE.is_dir():
        return str(SAMPLE), "raw"
    return GENERATED, GENERATED


def is_prepared(uri: str) -> bool:
    """Whether ``uri`` is a prepared DEST (it has a manifest)."""
    return storage.exists(storage.join(uri, "manifest.parquet"))


def check_source(data: str | None, splits: tuple[int, ...]) -> tuple[str, str]:
    """(source, kind) of ``--data``, checked before any work: ``kind`` is ``prepared``,
    ``raw`` or ``generated``. Raises FileNotFoundError for a --data that does not exist,
    ValueError for a prepared DEST without the repetitions ``splits``."""
    if data is None:
        return default_data()
    if data == GENERATED:
        return GENERATED, GENERATED
    if is_prepared(data):
        from breakhis.data.dest import read_manifest

        check_repetitions(read_manifest(data), splits, data)
        return data, "prepared"
    if not storage.exists(data):
        raise FileNotFoundError(
            f"--data {data}: no such folder (accepted: a folder of BreakHis PNGs, a "
            f"prepared DEST, or {GENERATED})"
        )
    return data, "raw"


def check_repetitions(manifest: pa.Table, splits: tuple[int, ...], where: str) -> None:
    """Raise ValueError, naming --splits, when the manifest lacks a repetition rep:K."""
    missing = [k for k in splits if f"rep{k}" not in manifest.column_names]
    if missing:
        reps = sorted(c for c in manifest.column_names if c.startswith("rep"))
        raise ValueError(
            f"--splits: {where} has no repetition {', '.join(map(str, missing))}; its manifest "
            f"has {', '.join(reps) or 'none'}"
        )


def prepared(workdir: str, source: str, kind: str, *, scale: float, width: int, height: int) -> str:
    """The prepared DEST of the data: ``source`` itself when prepared, else a raw folder or
    generated data (``scale``, ``width`` x ``height``) prepared into ``workdir`` (needs Ray).
    Raises what synthesize and prepare raise."""
    from breakhis.data.prepare import PrepareConfig, prepare

    workdir = os.path.abspath(workdir)
    if kind == "prepared":
        return source
    if kind == GENERATED:
        root = os.path.join(workdir, f"data-{scale:g}-{width}x{height}-seed{GENERATED_SEED}")
        dest = os.path.join(root, "prepared")
        if not is_prepared(dest):  # generated once, then reused
            from breakhis.synth.dataset import synthesize

            raw = os.path.join(root, "raw")
            synthesize(raw, scale=scale, seed=GENERATED_SEED, width=width, height=height)
            prepare(PrepareConfig(src=raw, dest=dest))
        return dest
    # A raw folder is prepared every time: a re-run keeps the complete shards and notices a
    # changed folder.
    tag = hashlib.sha256(source.encode()).hexdigest()[:8]
    name = os.path.basename(source.rstrip("/")) or "data"
    dest = os.path.join(workdir, f"prepared-{name}-{tag}")
    prepare(PrepareConfig(src=source, dest=dest))
    return dest


def read_tiles(dest: str) -> pa.Table:
    """tile_id, patient_id, label and PNG bytes of every prepared tile of ``dest``."""
    import pyarrow.parquet as pq

    from breakhis.data.dest import PreparedDest

    columns = ["tile_id", "patient_id", "label", "png"]
    tables = []
    for uri in PreparedDest.open(dest).shard_uris:
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables)


class PreparedData:
    """The prepared DEST, its manifest and its hash; the tiles' PNG bytes read on first use
    (a rerun whose reference runs are all done never reads them)."""

    def __init__(self, dest: str) -> None:
        """Read the manifest of ``dest``; raises FileNotFoundError when it has none."""
        from breakhis.data.dest import PreparedDest

        opened = PreparedDest.open(dest)
        self.dest = dest
        self.manifest = opened.manifest
        self.hash = opened.hash
        self._tiles: pa.Table | None = None

    @property
    def tiles(self) -> pa.Table:
        """tile_id, patient_id, label and PNG bytes of every tile (read_tiles, once)."""
        if self._tiles is None:
            self._tiles = read_tiles(self.dest)
        return self._tiles
