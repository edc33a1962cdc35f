"""Ingest benchmark: images/s through the Ray Data pipeline against a plain DataLoader.

    breakhis benchmark ingest --scale 0.25 --width 700 --height 460 --image-size 224

Every side does the same work per image and epoch: tiles at S x S, the per-epoch
TrainTransform, uint8 NCHW torch batches and ``normalize`` on the (CPU) training
device.

- Baseline: ``torch.utils.data.DataLoader`` with ``num_workers`` = cores over the PNG
  files on local disk, decoded with Pillow every epoch, as a user would write it.
- Ray, decode PNGs, cached: ``breakhis.data.ingest`` over Parquet shards in the embedded
  SeaweedFS (S3): read -> decode (libspng) -> cache -> augment. The first epoch fills
  the cache; later ones only augment.
- Ray, stored pixels, cached: the same after ``prepare --pixels S``: the first epoch
  reads stored pixels instead of decoding.
- Ray, stored pixels, no cache: streaming every epoch with the local shuffle buffer, in
  a Ray instance whose object store is smaller than the decoded data (default half of
  it); then one epoch over ``memory_multiple`` times the data (the pixel files read that
  many times) to show that peak memory does not grow with the data.

Prepare is timed twice: the PNG shards, then adding the pixels to that DEST (a rerun of
prepare with ``--pixels S``); bytes on storage of each are reported. The data are
generated (``breakhis.synth.dataset``) unless ``data`` names a local BreakHis folder. The
benchmark starts its own S3 server and, after it, its own local Ray instances (so Ray's
workers inherit the S3 settings): call it with no Ray running. Peak memory is the
largest proportional set size (PSS, shared pages split between the processes that map
them) summed over this process and its children, the S3 server left out, sampled every
0.2 s. "pat/b" is the mean number of distinct patients in a batch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from breakhis.benchmarks.harness import device_name, peak_memory, save_result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestBenchmarkConfig:
    """Options of ``breakhis benchmark ingest``."""

    data: str | None = None
    """A local BreakHis folder to read instead of generated tiles."""
    workdir: str | None = None
    """Local folder for the generated PNGs and the result files (default: a temporary
    folder, removed, and no result files)."""
    scale: float = 0.05
    """Size of the generated data set (fraction of the real per-subtype counts)."""
    width: int = 700
    """Width of the generated PNGs (BreakHis: 700)."""
    height: int = 460
    """Height of the generated PNGs (BreakHis: 460)."""
    image_size: int = 224
    """Side of the model's input tiles."""
    batch_size: int = 64
    """Images per torch batch."""
    epochs: int = 3
    """Passes over the data on each side (>= 2: one first, the rest "later")."""
    augment_strength: float = 0.5
    """Strength of the training augmentation (0..1)."""
    workers: int | None = None
    """DataLoader worker processes and Ray CPUs (default: this machine's cores)."""
    seed: int = 0
    """Seed of the generated data and of the augmentation."""
    object_store_mb: float | None = None
    """Object store of the no-cache runs' Ray instance in MiB (default: half the decoded
    tiles, at least 80, so that the data are larger than the store)."""
    memory_multiple: int = 8
    """The no-cache memory check streams this many times the data in one epoch."""

    def __post_init__(self) -> None:
        if self.memory_multiple < 2:
            raise ValueError(f"--memory-multiple must be >= 2, got {self.memory_multiple}")
        if self.object_store_mb is not None and self.object_store_mb < 80:
            raise ValueError(
                f"--object-store-mb must be >= 80 (Ray's least), got {self.object_store_mb}"
            )
        if self.epochs < 2:
            raise ValueError(
                f"--epochs must be >= 2 (a first and a later epoch), got {self.epochs}"
            )
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.data is not None and "://" in self.data:
            raise ValueError(
                f"--data {self.data!r}: the baseline reads local files; give a local folder"
            )

    @property
    def cores(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class PipelineRun:
    """One pipeline's epochs: seconds each, peak memory, PNG decodes, and the mix of patients
    in its batches."""

    name: str
    epoch_s: tuple[float, ...]
    peak_bytes: int
    decodes: tuple[int, int]  # (first epoch, later epochs)
    patients_per_batch: float

    @property
    def first_s(self) -> float:
        return self.epoch_s[0]

    @property
    def later_s(self) -> float:
        """Mean seconds of an epoch after the first."""
        return sum(self.epoch_s[1:]) / len(self.epoch_s[1:])


@dataclass(frozen=True)
class IngestBenchmarkResult:
    """Every pipeline's epochs against the DataLoader's, the memory of streaming at 1x and
    Nx the data, and what prepare cost."""

    images: int
    image_size: int
    cores: int
    loader: PipelineRun
    runs: tuple[PipelineRun, ...]  # png-cached, pixels-cached, pixels-streaming
    object_store_bytes: int  # of the streaming runs' Ray instance
    decoded_bytes: int  # the tiles at image_size, one epoch
    memory_multiple: int
    stream_peak_1x: int
    stream_peak_nx: int
    prepare_s: float  # PNG shards (catalog, decode check, pack)
    prepare_pixels_s: float  # adding the pixels at image_size to that DEST
    png_bytes: int
    pixel_bytes: int

    def run(self, name: str) -> PipelineRun:
        return next(r for r in self.runs if r.name == name)

    def ratio(self, name: str, epoch: str) -> float:
        """images/s of run ``name`` over the DataLoader's, ``epoch`` "first" or "later"."""
        run = self.run(name)
        if epoch == "first":
            return self.loader.first_s / run.first_s
        return self.loader.later_s / run.later_s

    @property
    def memory_growth(self) -> float:
        return self.stream_peak_nx / self.stream_peak_1x

    def format_table(self) -> str:
        """The figures as a plain-text table, with the targets of issue 15."""
        gib, mib = 1024**3, 1024**2
        n = self.images

        def row(label: str, run: PipelineRun) -> str:
            return (
                f"{label:<34}{n / run.first_s:>9.1f} i/s{n / run.later_s:>9.1f} i/s"
                f"{run.peak_bytes / gib:>8.2f} GiB{run.patients_per_batch:>7.1f}"
                f"{run.decodes[0]:>7d}{run.decodes[1]:>7d}"
            )

        labels = {
            "png-cached": "Ray, decode PNGs, cached",
            "pixels-cached": "Ray, stored pixels, cached",
            "pixels-streaming": "Ray, stored pixels, no cache",
        }
        lines = [
            f"ingest benchmark: {n} images, {self.image_size}px tiles, {self.cores} cores",
            f"{'':<34}{'first epoch':>13}{'later epochs':>13}{'peak mem':>12}"
            f"{'pat/b':>7}{'dec 1':>7}{'dec 2+':>7}",
            row("DataLoader (local PNGs, Pillow)", self.loader),
            *(row(labels[r.name], r) for r in self.runs),
            "",
            "ratio to the DataLoader (images/s)      first    later",
            *(
                f"  {labels[r.name]:<36}{self.ratio(r.name, 'first'):>6.2f}x"
                f"{self.ratio(r.name, 'later'):>8.2f}x"
                for r in self.runs
            ),
            "",
            f"no cache, data {self.decoded_bytes / mib:.0f} MiB decoded vs object store "
            f"{self.object_store_bytes / mib:.0f} MiB: peak memory "
            f"{self.stream_peak_1x / gib:.2f} GiB at 1x the data, "
            f"{self.stream_peak_nx / gib:.2f} GiB at {self.memory_multiple}x "
            f"({self.memory_growth:.2f}x)",
            f"prepare: {self.prepare_s:.1f} s for the PNG shards ({self.png_bytes / mib:.0f} MiB), "
            f"+{self.prepare_pixels_s:.1f} s to add {self.image_size}px pixels "
            f"({self.pixel_bytes / mib:.0f} MiB)",
            "",
            "targets: " + "; ".join(self.targets()),
        ]
        return "\n".join(lines)

    def targets(self) -> list[str]:
        """Each target of issue 15 with its figure and met / missed."""
        checks = [
            ("first epoch >= 1.5x", self.ratio("pixels-cached", "first"), 1.5),
            ("no-cache epochs >= 1.5x", self.ratio("pixels-streaming", "later"), 1.5),
            ("cached later epochs >= 5x", self.ratio("pixels-cached", "later"), 5.0),
        ]
        out = [f"{name}: {v:.2f}x {'met' if v >= goal else 'MISSED'}" for name, v, goal in checks]
        flat = self.memory_growth <= 1.2
        out.append(
            f"no-cache memory 1x->{self.memory_multiple}x <= 1.2x: {self.memory_growth:.2f}x "
            f"{'met' if flat else 'MISSED'}"
        )
        return out


# -------------------------------------------------------------------------------- baseline


class PngTiles:
    """A map-style torch dataset over PNG files: decode, resize, augment for an epoch.

    Index ``epoch * n + i`` is tile ``i`` in ``epoch``, so persistent DataLoader
    workers learn the epoch from the sampler (see EpochSampler).
    """

    def __init__(
        self,
        paths: list[str],
        tile_ids: list[str],
        labels: list[int],
        *,
        image_size: int,
        strength: float,
        seed: int,
    ) -> None:
        from breakhis.data.transforms import TrainTransform

        self.paths, self.tile_ids, self.labels = paths, tile_ids, labels
        self.image_size = image_size
        self.augment = TrainTransform(strength=strength, seed=seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        epoch, i = divmod(index, len(self.paths))
        # Decoded as a user would write it, with Pillow (the pipeline's libspng is its own
        # advantage); the same resize, so both sides produce the same pixels.
        with Image.open(self.paths[i]) as image:
            size = (self.image_size, self.image_size)
            image = image.convert("RGB").resize(size, Image.BILINEAR, reducing_gap=2.0)
            tile = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
        image = self.augment(tile[None], [self.tile_ids[i]], epoch=epoch)[0]
        return torch.from_numpy(image), self.labels[i], i


class EpochSampler:
    """Shuffled indices of one epoch, offset by ``epoch * n`` (call ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return iter((self.epoch * self.n + order).tolist())


def time_dataloader(
    paths: list[str],
    tile_ids: list[str],
    labels: list[int],
    patients: list[str],
    config: IngestBenchmarkConfig,
) -> PipelineRun:
    """The DataLoader baseline's epochs."""
    import torch

    from breakhis.data.transforms import normalize

    sampler = EpochSampler(len(paths), config.seed)
    tiles = PngTiles(
        paths,
        tile_ids,
        labels,
        image_size=config.image_size,
        strength=config.augment_strength,
        seed=config.seed,
    )
    seconds, mixes = [], []
    with peak_memory() as peak:
        loader = torch.utils.data.DataLoader(
            tiles,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=config.cores,
            persistent_workers=True,
            prefetch_factor=2,
        )
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            started = time.perf_counter()
            seen = 0
            for images, _labels, index in loader:
                seen += len(normalize(images))
                mixes.append(len({patients[i] for i in index.tolist()}))
            seconds.append(time.perf_counter() - started)
            log.info("DataLoader epoch %d: %d images in %.2f s", epoch, seen, seconds[-1])
        del loader
    return PipelineRun("dataloader", tuple(seconds), peak[0], (seen, seen * (config.epochs - 1)),
                       float(np.mean(mixes)))  # fmt: skip


# ------------------------------------------------------------------------------------- Ray


def ray_epochs(
    name: str,
    dest: str,
    patients: frozenset[str],
    config: IngestBenchmarkConfig,
    *,
    cache: bool,
    epochs: int,
    exclude: frozenset[int],
    repeat: int = 1,
) -> tuple[PipelineRun, int]:
    """Time ``epochs`` of the training pipeline of ``breakhis.data.ingest`` over ``patients``:
    stored pixels when DEST has them at the image size, else PNG decodes; cached (the first
    epoch fills the cache) or streaming with the local shuffle buffer. ``repeat`` reads the
    data that many times per epoch (the memory check). Returns the run and the images seen
    in one epoch."""
    import ray
    import torch

    from breakhis.data.dest import PreparedDest
    from breakhis.data.ingest import (
        IngestConfig,
        augmented_tiles,
        cache_tiles,
        new_ledger,
        read_tiles,
        shuffle_buffer_rows,
    )
    from breakhis.data.transforms import normalize

    ingest = IngestConfig(
        image_size=config.image_size,
        augment_strength=config.augment_strength,
        seed=config.seed,
        cache=cache,
    )
    prepared = PreparedDest.open(dest)
    pixels = prepared.pixel_files(config.image_size)
    pixels = pixels * repeat if pixels else None
    buffer = None if cache else shuffle_buffer_rows(config.image_size, config.batch_size)
    ledger = new_ledger()
    seconds: list[float] = []
    decodes: list[int] = []
    mixes: list[int] = []
    with peak_memory(exclude=exclude) as peak:
        started = time.perf_counter()
        tiles = read_tiles(prepared, patients, ingest, ledger, shuffle_files=not cache,
                           pixel_files=pixels)  # fmt: skip
        if cache:
            tiles = cache_tiles(tiles, shuffle_seed=config.seed)
        train = augmented_tiles(tiles, ingest, randomize_blocks=cache).select_columns(
            ["image", "patient_id"]
        )
        for epoch in range(epochs):
            if epoch:
                started = time.perf_counter()
            seen = 0
            for batch in train.iter_batches(
                batch_size=config.batch_size,
                batch_format="numpy",
                prefetch_batches=2,
                local_shuffle_buffer_size=buffer,
            ):
                seen += len(normalize(torch.from_numpy(batch["image"])))
                mixes.append(len(set(batch["patient_id"])))
            seconds.append(time.perf_counter() - started)
            decodes.append(ray.get(ledger.stats.remote()).decoded)
            log.info("%s epoch %d: %d images in %.2f s", name, epoch, seen, seconds[-1])
    run = PipelineRun(
        name,
        tuple(seconds),
        peak[0],
        (decodes[0], decodes[-1] - decodes[0]),
        float(np.mean(mixes)),
    )
    return run, seen


def _bytes_under(uri: str) -> int:
    from breakhis import storage

    return sum(e.size for e in storage.walk(uri))


def _timed_prepare(src: str, dest: str, pixels: tuple[int, ...] = ()) -> float:
    from breakhis.data.prepare import PrepareConfig, prepare

    started = time.perf_counter()
    prepare(PrepareConfig(src=src, dest=dest, pixels=pixels))
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------- run


def run_ingest_benchmark(config: IngestBenchmarkConfig) -> IngestBenchmarkResult:
    """Run the DataLoader and every Ray pipeline on the same tiles and return the figures.

    Order: the DataLoader; prepare (PNG shards); Ray decoding PNGs, cached; prepare adds
    the pixels; Ray on stored pixels, cached; then Ray again with an object store smaller
    than the decoded data: stored pixels, not cached, at 1x and ``memory_multiple`` x the
    data. Raises RuntimeError when Ray is already running in this process (the benchmark
    needs its own, started after its S3 server), FileNotFoundError for a missing ``data``
    folder, and what prepare raises for unusable data.
    """
    import ray

    from breakhis.data.catalog import scan_catalog
    from breakhis.synth.dataset import synthesize

    if ray.is_initialized():
        raise RuntimeError(
            "the ingest benchmark starts its own S3 server and local Ray; run it without Ray "
            "already initialised in this process"
        )
    with tempfile.TemporaryDirectory(prefix="breakhis-bench-") as scratch:
        src = config.data
        if src is None:
            src = str(Path(config.workdir or scratch) / "raw")
            synthesize(
                src, scale=config.scale, seed=config.seed, width=config.width, height=config.height
            )
        catalog = scan_catalog(src).table
        paths = catalog.column("uri").to_pylist()
        log.info("baseline: DataLoader, %d workers, %d local PNGs", config.cores, len(paths))
        loader = time_dataloader(
            paths,
            catalog.column("tile_id").to_pylist(),
            catalog.column("label").to_pylist(),
            catalog.column("patient_id").to_pylist(),
            config,
        )
        decoded_bytes = len(paths) * 3 * config.image_size**2
        store = int(config.object_store_mb * 1024**2) if config.object_store_mb else None
        store = store or max(80 * 1024**2, decoded_bytes // 2)
        runs = _ray_runs(src, config, store)
    images = runs["images"]
    if images != len(paths):
        raise RuntimeError(f"the Ray pipeline saw {images} images, the DataLoader {len(paths)}")
    result = IngestBenchmarkResult(
        images=images,
        image_size=config.image_size,
        cores=config.cores,
        loader=loader,
        runs=(runs["png"], runs["cached"], runs["streaming"]),
        object_store_bytes=store,
        decoded_bytes=decoded_bytes,
        memory_multiple=config.memory_multiple,
        stream_peak_1x=runs["streaming"].peak_bytes,
        stream_peak_nx=runs["big"].peak_bytes,
        prepare_s=runs["prepare_s"],
        prepare_pixels_s=runs["pixels_s"],
        png_bytes=runs["png_bytes"],
        pixel_bytes=runs["pixel_bytes"],
    )
    if config.workdir:
        figures = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), **asdict(result)}
        figures["targets"] = result.targets()
        save_result(config.workdir, "ingest", figures, result.format_table())
    return result


def _ray_runs(src: str, config: IngestBenchmarkConfig, store: int) -> dict:
    """Every Ray side of the benchmark, on an embedded S3 server: prepare, PNGs cached,
    prepare with pixels, pixels cached (a local Ray instance of ``config.cores`` CPUs), then
    with an object store of ``store`` bytes: pixels streamed at 1x and ``memory_multiple`` x
    the data. Returns the runs and the timings by name."""
    import ray

    from breakhis.data.dest import PreparedDest
    from breakhis.dev.s3server import embedded_s3

    with embedded_s3(buckets=("breakhis",)) as server:
        exclude = frozenset({server.pid})
        dest = "s3://breakhis/benchmark/prepared"
        ray.init(address="local", num_cpus=config.cores, include_dashboard=False,
                 configure_logging=False)  # fmt: skip
        try:
            prepare_s = _timed_prepare(src, dest)
            patients = PreparedDest.open(dest).patients
            epochs = config.epochs
            png, images = ray_epochs("png-cached", dest, patients, config, cache=True,
                                     epochs=epochs, exclude=exclude)  # fmt: skip
            pixels_s = _timed_prepare(src, dest, (config.image_size,))
            cached, _ = ray_epochs("pixels-cached", dest, patients, config, cache=True,
                                   epochs=epochs, exclude=exclude)  # fmt: skip
            png_bytes = _bytes_under(f"{dest}/shards")
            pixel_bytes = _bytes_under(f"{dest}/pixels/{config.image_size}")
        finally:
            ray.shutdown()
        # The data are larger than this object store: what --no-cache is for.
        ray.init(address="local", num_cpus=config.cores, object_store_memory=store,
                 include_dashboard=False, configure_logging=False)  # fmt: skip
        try:
            streaming, _ = ray_epochs("pixels-streaming", dest, patients, config,
                                      cache=False, epochs=epochs, exclude=exclude)  # fmt: skip
            big, _ = ray_epochs("pixels-streaming-nx", dest, patients, config, cache=False,
                                epochs=1, exclude=exclude,
                                repeat=config.memory_multiple)  # fmt: skip
        finally:
            ray.shutdown()
    return {
        "prepare_s": prepare_s,
        "png": png,
        "images": images,
        "pixels_s": pixels_s,
        "cached": cached,
        "png_bytes": png_bytes,
        "pixel_bytes": pixel_bytes,
        "streaming": streaming,
        "big": big,
    }
