"""Ray Data ingest: Ray Datasets of decoded, resized (and, for training,
augmented) tiles for one split of a prepared DEST (local or ``s3://``).

    from breakhis.ingest import IngestConfig, build_datasets
    from breakhis.splits import SplitSpec

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

    read_parquet(DEST/shards) -> filter(patients [, magnification]) pushed into the scan
      -> map_batches(decode_tiles): PNG -> uint8 CHW at S x S (pyarrow in, numpy out),
         fused into the read: one task per shard reads and decodes it
      -> train only: random_shuffle(seed)        } with ``cache``: materialize() once,
                                                 } in the object store (spilling to disk)
      -> train only: randomize_block_order (a new order each epoch) and
         map_batches(augment_tiles): oversampling and per-epoch augmentation

With ``cache`` the decode runs once per run: every epoch after the first reads
decoded tiles from the object store and only augments them. Without it (data
too large to hold) the same pipeline streams and decodes again each epoch.

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
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.data import DataContext, Dataset, FileShuffleConfig, RandomSeedConfig
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.dataset import MaterializedDataset
from ray.data.expressions import col

from breakhis import storage
from breakhis.names import MAGNIFICATIONS
from breakhis.pixels import PIXEL_COLUMNS, images_of, pixel_file_uri, pixels_uri
from breakhis.prepare import manifest_hash, manifest_shards, read_manifest, stored_pixel_sizes
from breakhis.splits import SplitPatients, SplitSpec, select_split
from breakhis.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

SIDES = ("train", "val", "test")
# Shard columns the pipeline needs: everything but the PNG's bookkeeping.
_READ_COLUMNS = ["tile_id", "uri", "patient_id", "label", "magnification", "png"]
# Failures kept with their reason in the ledger; beyond this only counted.
_MAX_FAILURES_KEPT = 1000
# Images per colour-jitter step inside a block: bounds the float32 temporaries.
_AUGMENT_CHUNK = 32


@dataclass(frozen=True)
class IngestConfig:
    """How to turn a prepared DEST into training and evaluation datasets.

    image_size: side S of the square uint8 tiles fed to the model, in pixels.
    magnification: keep only this magnification (40, 100, 200 or 400; one model
        per magnification, as in the paper) or None for all (magnification-independent).
    cache: decode once and keep the decoded tiles in the Ray object store (which
        spills to disk); False streams and decodes every epoch, for data too
        large to hold.
    augment_strength: 0 (no augmentation) .. 1; see breakhis/transforms.py.
    oversample: repeat each minority-class training tile round(n_major / n_minor)
        times per epoch (each copy augmented differently).
    shuffle: shuffle the training tiles (once globally when cached; block and
        file order change every epoch).
    seed: seed of the shuffles and of every augmentation (must be >= 0).
    """

    image_size: int = 224
    magnification: int | None = None
    cache: bool = True
    augment_strength: float = 0.5
    oversample: bool = False
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {self.image_size}")
        if self.magnification is not None and self.magnification not in MAGNIFICATIONS:
            raise ValueError(
                f"magnification {self.magnification!r} unknown; accepted: "
                f"{', '.join(map(str, MAGNIFICATIONS))} or None for all"
            )
        if not 0.0 <= self.augment_strength <= 1.0:
            raise ValueError(f"augment_strength must be in [0, 1], got {self.augment_strength}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class DecodeStats:
    """What the decode step has done so far in this run, over all sides and epochs."""

    decoded: int
    failed: int
    failures: tuple[tuple[str, str], ...]  # (uri, reason), the first 1000


@ray.remote(num_cpus=0)
class DecodeLedger:
    """Counts decoded and failed tiles across every process of the pipeline."""

    def __init__(self) -> None:
        self._decoded = 0
        self._failed = 0
        self._failures: list[tuple[str, str]] = []

    def record(self, decoded: int, failures: list[tuple[str, str]]) -> None:
        self._decoded += decoded
        self._failed += len(failures)
        room = _MAX_FAILURES_KEPT - len(self._failures)
        self._failures.extend(failures[: max(room, 0)])

    def stats(self) -> DecodeStats:
        return DecodeStats(self._decoded, self._failed, tuple(self._failures))


def new_ledger() -> ray.actor.ActorHandle:
    """A DecodeLedger on this driver's node: it lives as long as the job does, and a worker
    node that dies does not take it along (decode tasks on every node report to it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=True)
    return DecodeLedger.options(scheduling_strategy=strategy).remote()


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


def decode_tiles(
    batch: pa.Table, *, image_size: int, ledger: ray.actor.ActorHandle | None = None
) -> dict[str, np.ndarray]:
    """Decode a batch of shard rows into model-ready rows (the evaluation transform).

    Returns numpy columns ``image`` uint8 (n, 3, S, S), ``label`` int64,
    ``patient_id``, ``tile_id`` (str) and ``magnification`` int64 for the rows
    that decode. A row that does not decode is logged with its URI, reported
    to ``ledger`` and left out; it never raises.
    """
    transform = EvalTransform(image_size=image_size)
    pngs = batch.column("png").to_pylist()
    uris = batch.column("uri").to_pylist()
    images = np.empty((len(pngs), 3, image_size, image_size), dtype=np.uint8)
    keep: list[int] = []
    failures: list[tuple[str, str]] = []
    for i, data in enumerate(pngs):
        try:
            images[len(keep)] = transform(data)
        except ValueError as err:
            log.warning("skipping tile %s: %s", uris[i], err)
            failures.append((uris[i], str(err)))
            continue
        keep.append(i)
    if ledger is not None:
        # Waited for, so counts are complete when the epoch that caused them ends.
        try:
            ray.get(ledger.record.remote(len(keep), failures))
        except ray.exceptions.RayActorError as err:
            # Counting is bookkeeping: a lost ledger (its node died) must not fail training.
            log.warning("decode ledger lost, decode counts are incomplete from here: %s", err)
    return _rows(batch.take(pa.array(keep, pa.int64())), images[: len(keep)])


def stored_tiles(batch: pa.Table, *, image_size: int) -> dict[str, np.ndarray]:
    """Rows of stored pixel files (breakhis.pixels) in the row contract of ``decode_tiles``:
    the same pixels a decode at ``image_size`` gives, read, not decoded."""
    return _rows(batch, images_of(batch.column("image"), image_size))


def _rows(rows: pa.Table, images: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image": images,
        "label": rows.column("label").to_numpy().astype(np.int64),
        "patient_id": np.asarray(rows.column("patient_id").to_pylist(), dtype=object),
        "tile_id": np.asarray(rows.column("tile_id").to_pylist(), dtype=object),
        "magnification": rows.column("magnification").to_numpy().astype(np.int64),
    }


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
) -> dict[str, np.ndarray]:
    """Oversample and augment one batch of decoded training tiles.

    Each tile of label ``c`` is emitted ``copies_per_label[c]`` times, each copy
    augmented with its own draws for this epoch; with ``shuffle`` the rows
    come out in a random order fixed by the seed, epoch and tiles. ``epoch``
    overrides the execution counter (for use outside Ray Data). Returns a new
    batch with the same columns.
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
    out = np.empty((len(index), *images.shape[1:]), dtype=np.uint8)
    for start in range(0, len(index), _AUGMENT_CHUNK):
        part = slice(start, start + _AUGMENT_CHUNK)
        out[part] = transform(images[index[part]], ids[part], epoch=epoch, copies=copies[part])
    return {
        "image": out,
        **{name: np.asarray(values)[index] for name, values in batch.items() if name != "image"},
    }


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


def shard_paths(dest: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and paths of the shards of a prepared DEST: those its manifest lists
    (a prepare that died before deleting an older plan's shards leaves them behind), or every
    shard for a manifest that lists none.

    Raises FileNotFoundError naming DEST/shards when there is none.
    """
    uris = _shard_uris(dest)
    fs, _ = storage.resolve(uris[0])
    return fs, [storage.resolve(u)[1] for u in uris]


def _shard_uris(dest: str) -> list[str]:
    shards_uri = storage.join(dest, "shards")
    uris = [e.uri for e in storage.walk(shards_uri, (".parquet",))]
    with suppress(FileNotFoundError):
        listed = manifest_shards(dest)
        if listed is not None:
            uris = [u for u in uris if u.rsplit("/", 1)[-1] in set(listed)]
    if not uris:
        raise FileNotFoundError(f"{shards_uri}: no shards; run `breakhis prepare SRC {dest}`")
    return uris


def stored_pixel_files(dest: str, manifest: pa.Table, image_size: int) -> list[str] | None:
    """The pixel files of DEST at ``image_size`` (one per shard), or None when the manifest
    lists no such size or a file is missing (then ingest decodes PNGs, saying why)."""
    if image_size not in stored_pixel_sizes(manifest):
        return None
    wanted = [pixel_file_uri(u, image_size) for u in _shard_uris(dest)]
    try:
        there = {e.uri for e in storage.walk(pixels_uri(dest, image_size), (".parquet",))}
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
            dest,
            image_size,
        )
        return None
    return wanted


@contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Plan ``read_parquet`` with Ray Data's first Parquet datasource.

    The V2 datasource (default in Ray 2.60) starts a pool of 32 FooterReader
    actors for every execution, i.e. every epoch of a streaming dataset: 32
    Python processes to read a few footers, which on a small node costs tens of
    seconds per epoch. V1 reads the footers in the planning task and pushes the
    same filter and projection into the scan.
    """
    context = DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def read_tiles(
    dest: str,
    patients: frozenset[str],
    config: IngestConfig,
    ledger: ray.actor.ActorHandle | None = None,
    *,
    shuffle_files: bool = False,
    pixel_files: list[str] | None = None,
) -> Dataset:
    """The decoded tiles of ``patients`` (at ``config.magnification``), lazily.

    ``shuffle_files`` reads the shards in a new seeded order each execution.
    ``pixel_files`` (from ``stored_pixel_files``) reads stored pixels of the
    configured size instead of decoding the PNG shards. Returns a Dataset with
    the row contract of the module docstring (not augmented). Raises
    FileNotFoundError when DEST has no shards.
    """
    if pixel_files:
        fs, _ = storage.resolve(pixel_files[0])
        paths = [storage.resolve(u)[1] for u in pixel_files]
    else:
        fs, paths = shard_paths(dest)
    shuffle = (
        FileShuffleConfig(seed=config.seed, reseed_after_execution=True) if shuffle_files else None
    )
    with _parquet_reader_v1():
        # One read task per shard, with the decode fused into it. Left to itself Ray
        # splits each file's output into blocks to reach 200 (read_op_min_num_blocks),
        # and a split read never fuses: the decode then ran as its own operator while
        # the streaming reads held CPUs, one decode at a time on 2 cores (read and
        # decode of 1,975 tiles: 24.5 s split, 17.1 s fused). Parallelism of the
        # decode is therefore the number of shards: prepare with a smaller
        # --shard-mb for a cluster with more CPUs than shards.
        ds = ray.data.read_parquet(
            paths, filesystem=fs, shuffle=shuffle, override_num_blocks=len(paths)
        )
    # Both predicates are pushed into the Parquet scan; row-group statistics skip
    # most of the other patients' bytes since shards are written in name order.
    predicate = col("patient_id").is_in(sorted(patients))
    if config.magnification is not None:
        predicate = predicate & (col("magnification") == config.magnification)
    if pixel_files:
        # Fused into the read as well: the conversion is a view of the Arrow buffer.
        return (
            ds.filter(expr=predicate)
            .select_columns([*PIXEL_COLUMNS, "image"])
            .map_batches(
                stored_tiles,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"image_size": config.image_size},
            )
        )
    return (
        ds.filter(expr=predicate)
        .select_columns(_READ_COLUMNS)
        .map_batches(
            decode_tiles,
            batch_format="pyarrow",
            # Whole read blocks (at most target_max_block_size, 128 MiB of PNG): a
            # batch size would stop Ray from fusing the decode into the read.
            batch_size=None,
            fn_kwargs={"image_size": config.image_size, "ledger": ledger},
        )
    )


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
    blocks = max(decoded.num_blocks(), int(ray.cluster_resources().get("CPU", 1)))
    shuffled = decoded.random_shuffle(seed=shuffle_seed).repartition(blocks)
    return shuffled.materialize()


def augmented_tiles(
    tiles: Dataset,
    config: IngestConfig,
    *,
    copies_per_label: tuple[int, int] = (1, 1),
    randomize_blocks: bool = False,
) -> Dataset:
    """The training view of decoded ``tiles``: oversampled and augmented anew each epoch.

    ``randomize_blocks`` also changes the block order every epoch (for a cached
    input; on a streaming one it would wait for every block). Call it after
    the last build-time execution of ``tiles``: that execution count is epoch 0.
    """
    if randomize_blocks:
        tiles = tiles.randomize_block_order(
            seed=RandomSeedConfig(seed=config.seed, reseed_after_execution=True)
        )
    return tiles.map_batches(
        augment_tiles,
        batch_format="numpy",
        batch_size=None,  # whole blocks: the in-block shuffle mixes as many tiles as it can
        fn_kwargs={
            "transform": TrainTransform(strength=config.augment_strength, seed=config.seed),
            "first_execution": execution_index(tiles.context),
            "copies_per_label": copies_per_label,
            "shuffle": config.shuffle,
        },
    )


def build_datasets(
    dest: str,
    split: SplitSpec,
    config: IngestConfig,
    *,
    sides: tuple[str, ...] = SIDES,
    manifest: pa.Table | None = None,
) -> IngestData:
    """Build the Ray Datasets of one split of a prepared DEST: those of ``sides`` (a
    training run asks for train and val only, so the test tiles are never decoded).

    With ``config.cache`` this decodes every tile of those sides now (on the current Ray
    cluster) and keeps them in the object store; otherwise it only plans the pipeline.
    ``manifest`` is DEST's, when the caller has read it already. Returns IngestData.
    Raises FileNotFoundError when DEST has no manifest or shards, ValueError for a split
    the manifest lacks, an unknown side or a training side without images (e.g. at this
    magnification), and LeakageError when a patient is on two sides.
    """
    if "train" not in sides or not set(sides) <= set(SIDES):
        raise ValueError(f"sides {sides}: accepted: train, and any of val and test")
    manifest = read_manifest(dest) if manifest is None else manifest
    patients = select_split(manifest, split)
    pixel_files = stored_pixel_files(dest, manifest, config.image_size)
    meta = manifest.schema.metadata or {}
    mhash = meta.get(b"breakhis.manifest_hash", b"").decode() or manifest_hash(manifest)
    if config.magnification is not None:
        manifest = manifest.filter(pc.equal(manifest.column("magnification"), config.magnification))
    members_of = {"train": patients.train, "val": patients.val, "test": patients.test}
    chosen = {side: members_of[side] for side in sides if members_of[side]}
    chosen["train"] = patients.train
    rows = {
        side: manifest.filter(pc.is_in(manifest.column("patient_id"), pa.array(sorted(members))))
        for side, members in chosen.items()
    }
    where = f"split {split}" + (f" at {config.magnification}X" if config.magnification else "")
    if rows["train"].num_rows == 0:
        raise ValueError(f"{dest}: {where} has no training image")

    if pixel_files:
        log.info(
            "ingest reads stored %dx%d pixels from %s: no PNG decode",
            config.image_size,
            config.image_size,
            pixels_uri(dest, config.image_size),
        )
    else:
        stored = ", ".join(map(str, stored_pixel_sizes(manifest))) or "none"
        log.info(
            "ingest decodes PNGs to %dx%d (stored pixel sizes: %s; `breakhis prepare --pixels "
            "%d` stores this one)",
            config.image_size,
            config.image_size,
            stored,
            config.image_size,
        )
    ledger = new_ledger()
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
        )
        if config.cache:
            ds = cache_tiles(ds, shuffle_seed=config.seed if shuffle else None)
            num_rows[side] = ds.count()
        else:
            num_rows[side] = rows[side].num_rows
        datasets[side] = ds

    counts = (
        _cached_label_counts(datasets["train"]) if config.cache else _label_counts(rows["train"])
    )
    factor = oversample_factor(counts) if config.oversample else (1, 1)
    seen = (counts[0] * factor[0], counts[1] * factor[1])
    num_rows["train"] = sum(seen)
    datasets["train"] = augmented_tiles(
        datasets["train"],
        config,
        copies_per_label=factor,
        randomize_blocks=config.cache and config.shuffle,
    )
    log.info(
        "ingest %s from %s: train %d (benign %d x%d, malignant %d x%d), %s; cache %s",
        where,
        dest,
        num_rows["train"],
        counts[0],
        factor[0],
        counts[1],
        factor[1],
        ", ".join(f"{s} {num_rows[s]}" for s in ("val", "test") if s in num_rows),
        "on" if config.cache else "off",
    )
    return IngestData(
        datasets=datasets,
        class_counts=counts,
        class_weights=class_weights(seen),
        split=patients,
        manifest_hash=mhash,
        num_rows=num_rows,
        oversample_factor=factor,
        config=config,
        ledger=ledger,
    )
