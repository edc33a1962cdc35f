"""Ingest benchmark: images/s through the Ray Data pipeline against a plain DataLoader.

    breakhis benchmark ingest --scale 0.05 --width 700 --height 460 --image-size 224

Both sides do the same work per image and epoch: PNG decode, bilinear resize to
S x S, the per-epoch TrainTransform, collation into uint8 NCHW torch batches
and ``normalize`` on the (CPU) training device.

- Ray: the training pipeline of ``breakhis.ingest`` over all tiles, read from
  Parquet shards in the embedded SeaweedFS (S3) -> decode -> cache -> augment
  -> ``iter_torch_batches``. Its first epoch includes reading and decoding
  (the cache is filled then); later epochs only augment cached tiles.
- Baseline: ``torch.utils.data.DataLoader`` with ``num_workers`` = cores over
  the same PNG files on local disk, decoding every epoch (no cache).

The data are generated (``breakhis.synth``) unless ``data`` names a local
BreakHis folder. The benchmark starts its own S3 server and, after it, its own
local Ray instance (so Ray's workers inherit the S3 settings): call it with no
Ray running. Peak memory is the largest proportional set size (PSS, shared
pages split between the processes that map them) summed over this process
and its children, the S3 server left out, sampled every 0.2 s.
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

    def __post_init__(self) -> None:
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
class IngestBenchmarkResult:
    """Seconds per epoch of each side, and what they mean in images/s."""

    images: int
    image_size: int
    cores: int
    ray_epoch_s: tuple[float, ...]
    loader_epoch_s: tuple[float, ...]
    ray_peak_bytes: int
    loader_peak_bytes: int
    decodes_first_epoch: int
    decodes_later_epochs: int

    @staticmethod
    def _rate(images: int, seconds: tuple[float, ...]) -> float:
        return images * len(seconds) / sum(seconds)

    @property
    def ray_first_ips(self) -> float:
        return self._rate(self.images, self.ray_epoch_s[:1])

    @property
    def ray_later_ips(self) -> float:
        return self._rate(self.images, self.ray_epoch_s[1:])

    @property
    def loader_first_ips(self) -> float:
        return self._rate(self.images, self.loader_epoch_s[:1])

    @property
    def loader_later_ips(self) -> float:
        return self._rate(self.images, self.loader_epoch_s[1:])

    @property
    def first_ratio(self) -> float:
        return self.ray_first_ips / self.loader_first_ips

    @property
    def later_ratio(self) -> float:
        return self.ray_later_ips / self.loader_later_ips

    def format_table(self) -> str:
        """The figures as a plain-text table."""
        gib = 1024**3
        return "\n".join(
            [
                f"ingest benchmark: {self.images} images, {self.image_size}px tiles, "
                f"{self.cores} cores",
                f"{'':<26}{'first epoch':>14}{'later epochs':>14}{'peak memory':>14}",
                f"{'Ray Data (S3, cached)':<26}{self.ray_first_ips:>10.1f} i/s"
                f"{self.ray_later_ips:>10.1f} i/s{self.ray_peak_bytes / gib:>10.2f} GiB",
                f"{'DataLoader (local PNGs)':<26}{self.loader_first_ips:>10.1f} i/s"
                f"{self.loader_later_ips:>10.1f} i/s{self.loader_peak_bytes / gib:>10.2f} GiB",
                f"{'ratio Ray / DataLoader':<26}{self.first_ratio:>12.2f} x"
                f"{self.later_ratio:>12.2f} x",
                f"PNG decodes: {self.decodes_first_epoch} in the first epoch, "
                f"{self.decodes_later_epochs} in later ones",
            ]
        )


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
        from breakhis.transforms import TrainTransform

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
        return torch.from_numpy(image), self.labels[i]


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
    paths: list[str], tile_ids: list[str], labels: list[int], config: IngestBenchmarkConfig
) -> tuple[tuple[float, ...], int]:
    """Seconds per epoch of the DataLoader baseline, and its peak memory in bytes."""
    import torch

    from breakhis.transforms import normalize

    sampler = EpochSampler(len(paths), config.seed)
    tiles = PngTiles(
        paths,
        tile_ids,
        labels,
        image_size=config.image_size,
        strength=config.augment_strength,
        seed=config.seed,
    )
    seconds = []
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
            for images, _labels in loader:
                seen += len(normalize(images))
            seconds.append(time.perf_counter() - started)
            log.info("DataLoader epoch %d: %d images in %.2f s", epoch, seen, seconds[-1])
        del loader
    return tuple(seconds), peak[0]


# ------------------------------------------------------------------------------------- Ray


def time_ray_pipeline(
    dest: str, patients: frozenset[str], config: IngestBenchmarkConfig, exclude: frozenset[int]
) -> tuple[tuple[float, ...], int, tuple[int, int], int]:
    """Seconds per epoch of the Ray Data pipeline, its peak memory, the decodes
    (first epoch, later epochs) and the images per epoch."""
    import ray

    from breakhis.ingest import (
        IngestConfig,
        augmented_tiles,
        cache_tiles,
        new_ledger,
        read_tiles,
    )
    from breakhis.transforms import normalize

    ingest = IngestConfig(
        image_size=config.image_size, augment_strength=config.augment_strength, seed=config.seed
    )
    ledger = new_ledger()
    seconds: list[float] = []
    decodes: list[int] = []
    with peak_memory(exclude=exclude) as peak:
        started = time.perf_counter()
        cached = cache_tiles(read_tiles(dest, patients, ingest, ledger), shuffle_seed=config.seed)
        train = augmented_tiles(cached, ingest, randomize_blocks=True).select_columns(
            ["image", "label"]
        )
        for epoch in range(config.epochs):
            if epoch:
                started = time.perf_counter()
            seen = 0
            for batch in train.iter_torch_batches(batch_size=config.batch_size, prefetch_batches=2):
                seen += len(normalize(batch["image"]))
            seconds.append(time.perf_counter() - started)
            decodes.append(ray.get(ledger.stats.remote()).decoded)
            log.info("Ray Data epoch %d: %d images in %.2f s", epoch, seen, seconds[-1])
    return tuple(seconds), peak[0], (decodes[0], decodes[-1] - decodes[0]), seen


# ------------------------------------------------------------------------------------- run


def run_ingest_benchmark(config: IngestBenchmarkConfig) -> IngestBenchmarkResult:
    """Run both sides on the same tiles and return the figures.

    Raises RuntimeError when Ray is already running in this process (the
    benchmark needs its own, started after its S3 server), FileNotFoundError
    for a missing ``data`` folder, and what prepare raises for unusable data.
    """
    import ray

    from breakhis.catalog import scan_catalog
    from breakhis.dev.s3server import embedded_s3
    from breakhis.prepare import PrepareConfig, prepare, read_manifest
    from breakhis.synth import synthesize

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
        loader_s, loader_peak = time_dataloader(
            paths,
            catalog.column("tile_id").to_pylist(),
            catalog.column("label").to_pylist(),
            config,
        )
        with embedded_s3(buckets=("breakhis",)) as server:
            ray.init(
                address="local",
                num_cpus=config.cores,
                include_dashboard=False,
                configure_logging=False,
            )
            try:
                dest = "s3://breakhis/benchmark/prepared"
                prepare(PrepareConfig(src=src, dest=dest))
                patients = frozenset(read_manifest(dest).column("patient_id").to_pylist())
                ray_s, ray_peak, decodes, images = time_ray_pipeline(
                    dest, patients, config, exclude=frozenset({server.pid})
                )
            finally:
                ray.shutdown()
    if images != len(paths):
        raise RuntimeError(f"the Ray pipeline saw {images} images, the DataLoader {len(paths)}")
    result = IngestBenchmarkResult(
        images=images,
        image_size=config.image_size,
        cores=config.cores,
        ray_epoch_s=ray_s,
        loader_epoch_s=loader_s,
        ray_peak_bytes=ray_peak,
        loader_peak_bytes=loader_peak,
        decodes_first_epoch=decodes[0],
        decodes_later_epochs=decodes[1],
    )
    if config.workdir:
        figures = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), **asdict(result)}
        save_result(config.workdir, "ingest", figures, result.format_table())
    return result
