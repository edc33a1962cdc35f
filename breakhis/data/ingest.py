"""Ray Data ingest: Ray Datasets of decoded, resized (and, for training,
augmented) tiles for one split of a prepared DEST (local or ``s3://``).

    from breakhis.data.ingest import IngestConfig, build_datasets
    from breakhis.data.splits import SplitSpec

    data = build_datasets("s3://breakhis/prepared", SplitSpec.parse("fold:0", val_fraction=0.2),
                          IngestConfig(image_size=224, magnification=40, oversample=True))
    trainer = TorchTrainer(..., datasets=data.datasets)   # "train", "val" (if any), "test"
    # in the training loop, once per epoch:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=64,
                                                                        prefetch_batches=2):
        images = transforms.normalize(batch["image"].to(device))   # uint8 -> float32 on device

Each row: ``image`` uint8 (3, S, S), ``label`` int64 (0 benign, 1 malignant),
``patient_id``, ``tile_id`` (str) and ``magnification`` (int64). Iterate only
numeric columns with ``iter_torch_batches`` (``select_columns(["image", "label"])``
or ``collate_fn=TileCollate()``): torch has no string tensors.

The pipeline, per side of the split:

    read_parquet(DEST/shards, or DEST/pixels/S) -> filter(patients [, magnification])
         pushed into the scan
      -> map_batches(decode_tiles): PNG -> uint8 CHW at S x S (pyarrow in, numpy out),
         or map_batches(stored_tiles) when ``prepare --pixels S`` stored this size
         (a view of the stored bytes: no decode at all); fused into the read: one task
         per shard reads and decodes it
      -> train only: random_shuffle(seed)        } with ``cache``: materialize() once,
                                                 } in the object store
      -> train only: randomize_block_order (a new order each epoch, cached) and
         map_batches(augment_tiles): oversampling and per-epoch augmentation, over pools
         of mix_rows rows of the cache's small blocks (cached) or whole read blocks;
         with ``augment_on_device`` only the draws, which the training device applies
         (breakhis.data.device_augment)

Which source a run takes is logged in one line ("ingest reads stored 224x224 pixels" or
"ingest decodes PNGs to 224x224"). With ``cache`` the tiles are decoded (or read) once
per run: every epoch after the first reads them from the object store and only augments
them. Without it the same pipeline streams every epoch from the shards with bounded
memory (Ray Data's backpressure; nothing is held beyond a few blocks), for data larger
than the object store: the shard files come in a new order each epoch and a local
shuffle buffer (``IngestData.shuffle_buffer`` rows, given to ``iter_torch_batches``)
mixes the few patients of each block with many others in a batch. ``cache=None`` (the
default) chooses: cache when the decoded tiles take at most CACHE_FRACTION of the
object store.

Per-epoch yet reproducible augmentation. The randomness of a tile's
augmentation comes from ``tile_rng(seed, epoch, tile_id, copy)``
(transforms.py), never from a process's global state, so it does not depend
on which worker, task or batch handles the tile, and a retried task redoes
exactly the same pixels. The epoch is Ray Data's own execution counter of the
dataset, the one behind ``RandomSeedConfig(reseed_after_execution=True)``
(Ray's documented way to get "reproducible but different per epoch"
shuffles): each epoch of a Ray Train run, or each ``iter_batches`` pass on
the driver, is one execution of the train dataset, and the counter travels
with the dataset to the split coordinator that runs it for the trainer.
``build_datasets`` records the counter after its own executions, so the first
epoch is 0. Any other execution of the train dataset (a ``count()``, a
``take()``) also advances it: the same program gives the same augmentations,
a different program may number its epochs differently.

Class imbalance: ``class_weights`` (n / (2 n_c), over what the model sees)
for the loss, and optionally ``oversample``: each tile of the minority class
appears ``round(n_major / n_minor)`` times per epoch, each copy augmented
differently. Replicating whole tiles (not sampling) keeps an epoch's content
fixed for a seed; the class weights then correct the remainder exactly.

A tile that fails to decode is skipped, logged with its URI and counted in a
small Ray actor (``IngestData.decode_stats()``), never fatal. The same actor
counts decoded tiles, which is how the tests prove later epochs never decode.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import DataContext, Dataset, RandomSeedConfig
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.dataset import MaterializedDataset

from breakhis.data.dest import PreparedDest
from breakhis.data.geometry import TileGeometry
from breakhis.data.ingest_config import IngestConfig
from breakhis.data.pixels import pixels_uri
from breakhis.data.splits import SplitPatients, SplitSpec
from breakhis.data.tiles import (  # noqa: F401 - decode_tiles: importers use it here
    DecodeStats,
    decode_tiles,
    new_ledger,
    read_tiles,
)
from breakhis.data.transforms import TrainTransform, param_columns

log = logging.getLogger(__name__)

SIDES = ("train", "val", "test")
# Images per colour-jitter step inside a block: bounds the float32 temporaries.
_AUGMENT_CHUNK = 32
CACHE_FRACTION = 0.4
"""Automatic cache: on when the decoded tiles take at most this share of the object store
(the global shuffle holds two copies for a moment, and streaming blocks need room)."""
SHUFFLE_BUFFER_BYTES = 256 * 1024**2
"""Bytes of the local shuffle buffer of a streaming (uncached) train dataset, per reader,
and of the per-epoch mixing pool of a cached one (mix_rows)."""
CACHE_BLOCK_BYTES = 16 * 1024**2
"""Most bytes of a block of the training cache: the per-epoch mixing pools are drawn from
blocks this small (mix_rows)."""


@dataclass(frozen=True)
class IngestData:
    """The datasets of one split and what a training run needs to know about them.

    datasets: "train", "test", and "val" when the split has validation patients.
    class_counts: training images per class (benign, malignant), before oversampling.
    class_weights: loss weights n / (2 n_c) over the images the model sees per
        epoch (after oversampling); 1.0 for a class with no image.
    oversample_factor: (benign, malignant) copies of each training tile per epoch.
    num_rows: rows per epoch of each dataset; exact when cached, from the
        manifest (an upper bound if tiles fail to decode) when streaming.
    config: the IngestConfig used, its ``cache`` resolved to True or False.
    shuffle_buffer: rows of the local shuffle buffer to iterate the train dataset with
        (``iter_torch_batches(local_shuffle_buffer_size=..., local_shuffle_seed=...)``,
        seeded by the run's seed and the epoch) when streaming: a read block holds a few
        patients, and the buffer mixes many blocks in each batch, anew each epoch. 0 when
        cached (each epoch's pools mix the cache's blocks: augmented_tiles) or not
        shuffling.
    """

    datasets: dict[str, Dataset]
    class_counts: tuple[int, int]
    class_weights: tuple[float, float]
    split: SplitPatients
    manifest_hash: str
    num_rows: dict[str, int]
    oversample_factor: tuple[int, int] = (1, 1)
    config: IngestConfig = field(default_factory=IngestConfig)
    ledger: ray.actor.ActorHandle | None = field(default=None, repr=False)
    shuffle_buffer: int = 0

    def decode_stats(self) -> DecodeStats:
        """Tiles decoded and failed so far (all sides, all epochs), from the ledger actor."""
        if self.ledger is None:
            return DecodeStats(0, 0, ())
        return ray.get(self.ledger.stats.remote())


class TileCollate(ArrowBatchCollateFn):
    """``iter_torch_batches(collate_fn=TileCollate())``: the numeric columns as
    tensors (``image`` uint8 NCHW, ``label`` and ``magnification`` int64), the
    string columns dropped, so Ray moves the batch to the training device."""

    def __init__(self, columns: tuple[str, ...] = ("image", "label", "magnification")) -> None:
        super().__init__()
        self.columns = columns

    def __call__(self, batch: pa.Table) -> dict:
        from ray.data.util.torch_utils import arrow_batch_to_tensors

        keep = [c for c in self.columns if c in batch.column_names]
        return arrow_batch_to_tensors(batch.select(keep), combine_chunks=True)


def execution_index(context: DataContext | None = None) -> int:
    """Ray Data's count of finished executions for ``context`` (default: the
    running task's), the counter that reseeds ``RandomSeedConfig`` every epoch."""
    seeds = RandomSeedConfig(seed=0, reseed_after_execution=True).get_seed_tuple(
        data_context=context or DataContext.get_current()
    )
    return seeds.execution_idx or 0


def current_epoch(first_execution: int) -> int:
    """The epoch of the running execution of a dataset whose first epoch is
    execution ``first_execution`` (call inside a Ray Data task)."""
    execution = execution_index()
    # A dataset rebuilt in a fresh context starts again at 0.
    return execution - first_execution if execution >= first_execution else execution


def augment_tiles(
    batch: dict[str, np.ndarray],
    *,
    transform: TrainTransform,
    first_execution: int,
    copies_per_label: tuple[int, int] = (1, 1),
    shuffle: bool = True,
    epoch: int | None = None,
    on_device: bool = False,
) -> dict[str, np.ndarray]:
    """Oversample and augment one batch of decoded training tiles.

    Each tile of label ``c`` is emitted ``copies_per_label[c]`` times, each copy
    augmented with its own draws for this epoch; with ``shuffle`` the rows
    come out in a random order fixed by the seed, epoch and tiles. ``epoch``
    overrides the execution counter (for use outside Ray Data). Returns a new
    batch with the same columns, and ``key``.

    ``on_device`` draws the same parameters but leaves the pixels to the training
    device (breakhis.data.device_augment): ``image`` stays the canonical tile, and the
    columns AUG_GEOMETRY and (colour on) AUG_COLOUR carry each row's draws.
    """
    if epoch is None:
        epoch = current_epoch(first_execution)
    labels = batch["label"]
    repeats = np.asarray(copies_per_label, dtype=np.int64)[labels]
    index = np.repeat(np.arange(len(labels)), repeats)
    # Copy number of each output row within its tile: 0, 1, .. repeats-1.
    starts = np.repeat(np.cumsum(repeats) - repeats, repeats)
    copies = np.arange(len(index)) - starts
    tile_ids = batch["tile_id"]
    if shuffle and len(index) > 1:
        key = hashlib.blake2b("\0".join(map(str, tile_ids)).encode(), digest_size=8).hexdigest()
        order = np.random.default_rng([transform.seed, epoch, int(key, 16)]).permutation(len(index))
        index, copies = index[order], copies[order]
    ids = [str(tile_ids[i]) for i in index]
    images = batch["image"]
    rest = {name: np.asarray(values)[index] for name, values in batch.items() if name != "image"}
    keys = np.asarray([row_key(t, int(c)) for t, c in zip(ids, copies, strict=True)], np.int64)
    if on_device:
        size, width = images.shape[2], images.shape[3]
        params = transform.draw(ids, epoch=epoch, copies=copies, image_size=size, width=width)
        same = len(index) == len(images) and bool((index == np.arange(len(index))).all())
        return {
            "image": images if same else images[index],
            **rest,
            "key": keys,
            **param_columns(params, colour=transform.changes_colour),
        }
    # Canonical (3, S, W) tiles in, S x S training tiles out.
    out = np.empty((len(index), images.shape[1], images.shape[2], images.shape[2]), np.uint8)
    for start in range(0, len(index), _AUGMENT_CHUNK):
        part = slice(start, start + _AUGMENT_CHUNK)
        out[part] = transform(images[index[part]], ids[part], epoch=epoch, copies=copies[part])
    return {"image": out, **rest, "key": keys}


def row_key(tile_id: str, copy: int = 0) -> int:
    """The int64 key of one training row: the first 8 bytes of BLAKE2b of the tile id, a
    NUL and the copy number, signed little-endian. Training rows carry it as ``key`` (torch
    has no string tensors), so a step's tiles can be named (TrainConfig.trace_dir)."""
    digest = hashlib.blake2b(f"{tile_id}\0{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def class_weights(counts: tuple[int, int]) -> tuple[float, float]:
    """Loss weights n / (2 n_c) for per-class image counts; 1.0 for an empty class."""
    total = sum(counts)
    return tuple(total / (len(counts) * n) if n else 1.0 for n in counts)  # type: ignore[return-value]


def oversample_factor(counts: tuple[int, int]) -> tuple[int, int]:
    """Copies per epoch of each class's tiles: round(n_major / n_minor) for the minority."""
    if min(counts) == 0:
        return (1, 1)
    minority = int(np.argmin(counts))
    factor = max(1, int(round(max(counts) / counts[minority])))
    return (factor, 1) if minority == 0 else (1, factor)


def _label_counts(table: pa.Table) -> tuple[int, int]:
    counts = np.bincount(table.column("label").to_numpy().astype(np.int64), minlength=2)
    return int(counts[0]), int(counts[1])


def _cached_label_counts(ds: Dataset) -> tuple[int, int]:
    counts = np.zeros(2, dtype=np.int64)
    for batch in ds.select_columns(["label"]).iter_batches(batch_size=None, batch_format="numpy"):
        counts += np.bincount(batch["label"], minlength=2)[:2]
    return int(counts[0]), int(counts[1])


def cache_tiles(tiles: Dataset, *, shuffle_seed: int | None = None) -> MaterializedDataset:
    """Run ``tiles`` once and keep the result in the object store (spilling to disk).

    With ``shuffle_seed`` the decoded rows are then shuffled globally, once, so
    that blocks mix patients and classes (shards hold patients in name order),
    and put back into as many blocks as the decode made (one per shard), or as
    the cluster has CPUs if that is more, so that every CPU augments. The object
    store holds two copies of the tiles while it shuffles. Returns the
    MaterializedDataset.
    """
    decoded = tiles.materialize()
    if shuffle_seed is None:
        return decoded
    # Shuffled after the decode, not with it: fused into the shuffle, the decode would
    # run in the shuffle's map tasks, one per input block (a single task for one shard,
    # measured 3x slower on 2 cores); and the shuffle alone leaves min_parallelism (200)
    # tiny blocks, whose per-task cost then dominates every epoch.
    # Small blocks: each epoch's mixing pools are random sets of them (augmented_tiles).
    small = -(-decoded.size_bytes() // CACHE_BLOCK_BYTES)
    blocks = max(decoded.num_blocks(), int(ray.cluster_resources().get("CPU", 1)), small)
    shuffled = decoded.random_shuffle(seed=shuffle_seed).repartition(blocks)
    return shuffled.materialize()


def augmented_tiles(
    tiles: Dataset,
    config: IngestConfig,
    *,
    copies_per_label: tuple[int, int] = (1, 1),
    randomize_blocks: bool = False,
    on_device: bool = False,
) -> Dataset:
    """The training view of decoded ``tiles``: oversampled and augmented anew each epoch.

    ``randomize_blocks`` (a cached input; on a streaming one it would wait for every
    block) changes the block order every epoch and augments pools of mix_rows rows: a
    pool is a new random set of the cache's small blocks each epoch, shuffled within, and
    comes out as one block, so that the batches of an epoch are slices of it, mixed across
    the data without a local shuffle buffer. Call it after the last build-time execution
    of ``tiles``: that execution count is epoch 0.
    ``on_device``: the rows carry canonical tiles and their draws, and the training
    device augments (augment_tiles).
    """
    if randomize_blocks:
        tiles = tiles.randomize_block_order(
            seed=RandomSeedConfig(seed=config.seed, reseed_after_execution=True)
        )
    return tiles.map_batches(
        augment_tiles,
        batch_format="numpy",
        # Streaming: whole read blocks (the in-block shuffle mixes as many tiles as it can).
        batch_size=mix_rows(config.tile_geometry) if randomize_blocks else None,
        fn_kwargs={
            "transform": TrainTransform(
                strength=config.augment_strength, seed=config.seed, colour=config.colour_augment
            ),
            "first_execution": execution_index(tiles.context),
            "copies_per_label": copies_per_label,
            "shuffle": config.shuffle,
            "on_device": on_device,
        },
    )


def mix_rows(geometry: TileGeometry) -> int:
    """Rows of a cached epoch's mixing pool: SHUFFLE_BUFFER_BYTES of canonical tiles (what
    the streaming path's local shuffle buffer holds), at least 1,024."""
    height, width = geometry.canonical_hw
    return max(1024, SHUFFLE_BUFFER_BYTES // (3 * height * width))


def choose_cache(decoded_bytes: int, object_store_bytes: float) -> bool:
    """The automatic cache decision: True when ``decoded_bytes`` fit in
    ``CACHE_FRACTION`` of ``object_store_bytes``."""
    return decoded_bytes <= CACHE_FRACTION * object_store_bytes


def shuffle_buffer_rows(image_size: int, batch_size: int = 64) -> int:
    """Rows of the streaming local shuffle buffer: SHUFFLE_BUFFER_BYTES of tiles, at least
    four batches."""
    return max(4 * batch_size, SHUFFLE_BUFFER_BYTES // (3 * image_size * image_size))


def _resolve_cache(config: IngestConfig, rows: int) -> bool:
    """``config.cache``, or the automatic choice for ``rows`` tiles, logged either way."""
    decoded = rows * 3 * config.image_size * config.tile_geometry.canonical_hw[1]
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    cache = choose_cache(decoded, store) if config.cache is None else config.cache
    log.info(
        "ingest cache %s (%s): decoded tiles %.2f GiB, object store %.2f GiB",
        "on" if cache else "off, streaming",
        "automatic" if config.cache is None else "--cache" if cache else "--no-cache",
        decoded / 1024**3,
        store / 1024**3,
    )
    return cache


def _announce_source(dest: PreparedDest, size: int, stored: bool) -> None:
    if stored:
        log.info(
            "ingest reads stored %dx%d pixels from %s: no PNG decode",
            size,
            size,
            pixels_uri(dest.uri, size),
        )
        return
    sizes = ", ".join(map(str, dest.pixel_sizes)) or "none"
    log.info(
        "ingest decodes PNGs to %dx%d (stored pixel sizes: %s; `breakhis prepare --pixels %d` "
        "stores this one)",
        size,
        size,
        sizes,
        size,
    )


@contextmanager
def _ordered() -> Iterator[None]:
    """Datasets created inside keep their block order (``preserve_order``): the cache's
    seeded shuffle then starts from the same blocks every run, so a seed fixes it."""
    options = DataContext.get_current().execution_options
    previous = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = previous


def _read_sides(
    dest: PreparedDest,
    chosen: dict[str, frozenset[str]],
    rows: dict[str, pa.Table],
    config: IngestConfig,
    ledger: ray.actor.ActorHandle,
    pixel_files: list[str] | None,
) -> tuple[dict[str, Dataset], dict[str, int]]:
    """The decoded (or stored) tiles of each side in ``chosen``, cached when
    ``config.cache`` (the training side canonical and shuffled), and their row counts."""
    datasets: dict[str, Dataset] = {}
    num_rows: dict[str, int] = {}
    for side, members in chosen.items():
        shuffle = side == "train" and config.shuffle
        ds = read_tiles(
            dest,
            members,
            config,
            ledger,
            shuffle_files=shuffle and not config.cache,
            pixel_files=pixel_files,
            canonical=side == "train",
        )
        if config.cache:
            ds = cache_tiles(ds, shuffle_seed=config.seed if shuffle else None)
            num_rows[side] = ds.count()
        else:
            num_rows[side] = rows[side].num_rows
        datasets[side] = ds
    return datasets, num_rows


def _side_rows(
    manifest: pa.Table,
    patients: SplitPatients,
    sides: tuple[str, ...],
    magnification: int | None,
) -> tuple[dict[str, frozenset[str]], dict[str, pa.Table]]:
    """The patients of each side asked for (train always; val and test when they have
    patients) and their manifest rows at ``magnification`` (None: all)."""
    if magnification is not None:
        manifest = manifest.filter(pc.equal(manifest.column("magnification"), magnification))
    members_of = {"train": patients.train, "val": patients.val, "test": patients.test}
    chosen = {side: members_of[side] for side in sides if members_of[side]}
    chosen["train"] = patients.train
    rows = {
        side: manifest.filter(
            pc.is_in(manifest.column("patient_id"), pa.array(sorted(members), pa.string()))
        )
        for side, members in chosen.items()
    }
    return chosen, rows


def build_datasets(
    dest: PreparedDest,
    split: SplitSpec,
    config: IngestConfig,
    *,
    sides: tuple[str, ...] = SIDES,
    patients: SplitPatients | None = None,
    augment_on_device: bool = False,
) -> IngestData:
    """Build the Ray Datasets of one split of a prepared DEST: those of ``sides`` (a
    training run asks for train and val only, so the test tiles are never decoded).

    With ``config.cache`` this decodes every tile of those sides now (on the current Ray
    cluster) and keeps them in the object store; otherwise it only plans the pipeline.
    ``patients`` is the split the caller selected from ``dest`` already (with the leakage
    check), so the training path plans once.
    ``augment_on_device``: the training rows carry canonical tiles and their augmentation
    draws for the training device to apply (breakhis.data.device_augment). Returns IngestData.
    Raises FileNotFoundError when DEST has no shards, ValueError for a split
    the manifest lacks, an unknown side or a training side without images (e.g. at this
    magnification), and LeakageError when a patient is on two sides.
    """
    if "train" not in sides or not set(sides) <= set(SIDES):
        raise ValueError(f"sides {sides}: accepted: train, and any of val and test")
    patients = dest.split(split) if patients is None else patients
    pixel_files = dest.pixel_files(config.image_size, config.geometry)
    chosen, rows = _side_rows(dest.manifest, patients, sides, config.magnification)
    where = f"split {split}" + (f" at {config.magnification}X" if config.magnification else "")
    if rows["train"].num_rows == 0:
        raise ValueError(f"{dest.uri}: {where} has no training image")

    _announce_source(dest, config.image_size, stored=bool(pixel_files))
    cache = _resolve_cache(config, sum(r.num_rows for r in rows.values()))
    config = replace(config, cache=cache)
    ledger = new_ledger()
    with _ordered():
        datasets, num_rows = _read_sides(dest, chosen, rows, config, ledger, pixel_files)
        counts = (
            _cached_label_counts(datasets["train"])
            if config.cache
            else _label_counts(rows["train"])
        )
        factor = oversample_factor(counts) if config.oversample else (1, 1)
        seen = (counts[0] * factor[0], counts[1] * factor[1])
        num_rows["train"] = sum(seen)
        datasets["train"] = augmented_tiles(
            datasets["train"],
            config,
            copies_per_label=factor,
            randomize_blocks=config.cache and config.shuffle,
            on_device=augment_on_device,
        )
    log.info(
        "ingest %s from %s: train %d (benign %d x%d, malignant %d x%d), %s; cache %s",
        where,
        dest.uri,
        num_rows["train"],
        counts[0],
        factor[0],
        counts[1],
        factor[1],
        ", ".join(f"{s} {num_rows[s]}" for s in ("val", "test") if s in num_rows),
        "on" if config.cache else "off",
    )
    return IngestData(
        shuffle_buffer=(
            shuffle_buffer_rows(config.image_size) if config.shuffle and not config.cache else 0
        ),
        datasets=datasets,
        class_counts=counts,
        class_weights=class_weights(seen),
        split=patients,
        manifest_hash=dest.hash,
        num_rows=num_rows,
        oversample_factor=factor,
        config=config,
        ledger=ledger,
    )
