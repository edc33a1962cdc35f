"""Ceiling benchmark: how fast the host side can feed a model, with no model and no GPU.

    breakhis benchmark ceiling --workdir bench-ceiling        # 224 px, batches of 256

What a GPU machine would show as "the job is slower than a plain loop" is the host side's
cost; it shows here too, on CPUs alone, when the step does nothing:

1. **training iterator**: the job's training batches, as one Ray Train worker takes them
   (breakhis.data.ingest's cached tiles, globally shuffled once, per-epoch block order, the
   per-epoch draws of augment_tiles with ``on_device``, the columns the job selects,
   ``streaming_split(1, equal=True)`` as Ray Train's DataConfig splits, and
   breakhis.train.loop.training_batches through breakhis.train.prefetch.EpochPrefetcher as
   the job calls them) into a step
   that only touches the batch; images/s per epoch, the first (cache-filling) epoch left
   out. Beside it, in the same run, a **plain in-memory indexer**: the same canonical
   uint8 tiles as one torch tensor, a new permutation each epoch, ``x[order[i:i + B]]``.
   Targets (issue 27): >= 12,000 images/s at 224 px, >= 0.9x the indexer.
2. **device augmentation on this CPU** (breakhis.data.device_augment on the iterator's
   batches): what augmenting on the device costs where the device is the CPU.
3. **predictor, host side**: the scoring/evaluation model actor (breakhis.score.predict's
   TilePredictor) with its model replaced by one that does nothing, on batches of decoded
   tiles already in memory (decode excluded), and with breakhis.data.tile_decode's decode of
   the tiles' PNG files (700x460 -> the evaluation view) first (decode included).

The tiles are random pixels (nothing here depends on them). Starts a local Ray instance
of ``cpus`` CPUs unless Ray is initialised.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from breakhis.benchmarks.harness import device_name, save_result, start_local_ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CeilingBenchmarkConfig:
    """Options of ``breakhis benchmark ceiling``."""

    workdir: str = "bench-ceiling"
    """Local folder for the result files and the predictor's PNG tiles."""
    image_size: int = 224
    """Side S of the training tiles (canonical tiles are S x round(S * 700 / 460))."""
    batch_size: int = 256
    """Images per batch (training step and model call)."""
    tiles: int = 2048
    """Training tiles in the cache (the iterator's epoch)."""
    epochs: int = 4
    """Epochs of the iterator and the indexer (the first is left out)."""
    cpus: int = 0
    """CPUs of the local Ray instance; 0: all of this machine."""
    predictor_tiles: int = 64
    """PNG tiles decoded for the predictor's decode-included figure."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 2:
            raise ValueError(f"--epochs must be >= 2 (the first is left out), got {self.epochs}")
        if self.tiles < 2 * self.batch_size:
            raise ValueError(
                f"--tiles {self.tiles}: at least two batches (2 x --batch-size) are needed"
            )
        if self.batch_size < 1 or self.image_size < 8 or self.predictor_tiles < 1:
            raise ValueError("--batch-size and --predictor-tiles must be >= 1, --image-size >= 8")


@dataclass(frozen=True)
class CeilingBenchmarkResult:
    """What ``breakhis benchmark ceiling`` measured (seconds per epoch, warm-up first)."""

    date: str
    device: str
    config: dict
    images_per_epoch: int
    iterator_epoch_s: list[float] = field(default_factory=list)
    iterator_first_batch_s: list[float] = field(default_factory=list)
    indexer_epoch_s: list[float] = field(default_factory=list)
    augment_images_per_s: float = 0.0
    predictor: dict[str, float] = field(default_factory=dict)

    @property
    def iterator_images_per_s(self) -> float:
        return self.images_per_epoch / statistics.median(self.iterator_epoch_s[1:])

    @property
    def indexer_images_per_s(self) -> float:
        return self.images_per_epoch / statistics.median(self.indexer_epoch_s[1:])

    @property
    def ratio(self) -> float:
        """Iterator / indexer images/s (target >= 0.9)."""
        return self.iterator_images_per_s / self.indexer_images_per_s

    def format_table(self) -> str:
        c = self.config
        rate, ratio = self.iterator_images_per_s, self.ratio
        lines = [
            f"Ceiling benchmark, {self.date}, {self.device}; {c['image_size']} px, batch "
            f"{c['batch_size']}, {self.images_per_epoch} images per epoch, {c['epochs']} "
            "epochs (first left out)",
            "",
            "| measure | images/s | epoch, s (median) | first batch, s |",
            "|---|---:|---:|---:|",
            f"| training iterator (1 worker), step does nothing | {rate:,.0f} "
            f"| {statistics.median(self.iterator_epoch_s[1:]):.3f} "
            f"| {statistics.median(self.iterator_first_batch_s[1:]):.3f} |",
            f"| plain in-memory tensor indexer | {self.indexer_images_per_s:,.0f} "
            f"| {statistics.median(self.indexer_epoch_s[1:]):.3f} | |",
            f"| device augmentation on this CPU (crop, flips, turns, colour) "
            f"| {self.augment_images_per_s:,.0f} | | |",
            *(f"| predictor host side, {k} | {v:,.0f} | | |" for k, v in self.predictor.items()),
            "",
            f"Iterator / indexer: {ratio:.2f}x (target >= 0.9: "
            f"{'met' if ratio >= 0.9 else 'MISSED'}); iterator {rate:,.0f} images/s "
            f"(target >= 12,000: {'met' if rate >= 12_000 else 'MISSED'}).",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            iterator_images_per_s=self.iterator_images_per_s,
            indexer_images_per_s=self.indexer_images_per_s,
            ratio=self.ratio,
        )
        return out


def _random_rows(batch: dict[str, np.ndarray], *, size: int, width: int, seed: int) -> dict:
    """Rows of the cache's contract (breakhis.data.ingest) with random canonical tiles."""
    ids = batch["id"]
    rng = np.random.default_rng([seed, int(ids[0])])
    n = len(ids)
    return {
        "image": rng.integers(0, 256, (n, 3, size, width), dtype=np.uint8),
        "label": (ids % 3 == 0).astype(np.int64),
        "patient_id": np.asarray([f"p{i % 80}" for i in ids], dtype=object),
        "tile_id": np.asarray([f"tile-{i:06d}" for i in ids], dtype=object),
        "magnification": np.full(n, 40, dtype=np.int64),
    }


def measure_iterator(config: CeilingBenchmarkConfig) -> tuple[list[float], list[float], int, Any]:
    """Part 1's iterator: (epoch seconds, first-batch seconds, images per epoch, the last
    batch)."""
    import ray

    from breakhis.data.geometry import canonical_width
    from breakhis.data.ingest import IngestConfig, augmented_tiles, cache_tiles
    from breakhis.data.transforms import AUG_COLOUR, AUG_GEOMETRY
    from breakhis.train.loop import training_batches
    from breakhis.train.prefetch import EpochPrefetcher, lookahead_batches

    size = config.image_size
    width = canonical_width(size)
    blocks = max(2, int(ray.cluster_resources().get("CPU", 1)))
    tiles = ray.data.range(config.tiles, override_num_blocks=blocks).map_batches(
        _random_rows,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"size": size, "width": width, "seed": config.seed},
    )
    ingest = IngestConfig(image_size=size, seed=config.seed, cache=True)
    cached = cache_tiles(tiles, shuffle_seed=config.seed)
    train = augmented_tiles(cached, ingest, randomize_blocks=True, on_device=True)
    train = train.select_columns(["image", "label", "key", AUG_GEOMETRY, AUG_COLOUR])
    (shard,) = train.streaming_split(1, equal=True)
    buffer = 0  # cached: the job iterates without a local shuffle buffer (IngestData)
    epochs, firsts = [], []
    batch = None
    # Through the job's EpochPrefetcher (a step that does nothing leaves it nothing to overlap:
    # each epoch's start still shows as its first batch).
    prefetcher = EpochPrefetcher(
        lambda e: training_batches(
            shard, batch_size=config.batch_size, shuffle_buffer=buffer, seed=0, epoch=e
        ),
        first=0,
        last=config.epochs - 1,
        depth=lookahead_batches(config.batch_size * 3 * size * width),
    )
    try:
        for epoch in range(config.epochs):
            started = time.perf_counter()
            first = None
            seen = 0
            for batch in prefetcher.batches(epoch):
                if first is None:
                    first = time.perf_counter() - started
                seen += int(batch["image"].shape[0])  # the step: nothing
            epochs.append(time.perf_counter() - started)
            firsts.append(first or 0.0)
            log.info("iterator epoch %d: %d images in %.2f s", epoch, seen, epochs[-1])
    finally:
        prefetcher.close()
    return epochs, firsts, seen, batch


def measure_indexer(config: CeilingBenchmarkConfig, images: int) -> list[float]:
    """Part 1's baseline: epoch seconds of ``x[order[i:i + B]]`` over an in-memory tensor."""
    import torch

    from breakhis.data.geometry import canonical_width

    size = config.image_size
    rng = np.random.default_rng(config.seed)
    x = torch.from_numpy(
        rng.integers(0, 256, (config.tiles, 3, size, canonical_width(size)), dtype=np.uint8)
    )
    y = torch.from_numpy((np.arange(config.tiles) % 3 == 0).astype(np.int64))
    generator = torch.Generator().manual_seed(config.seed)
    seconds = []
    for _ in range(config.epochs):
        started = time.perf_counter()
        order = torch.randperm(config.tiles, generator=generator)
        for i in range(0, images, config.batch_size):
            pick = order[i : i + config.batch_size]
            batch = {"image": x[pick], "label": y[pick]}
            assert batch["image"].shape[0] == len(pick)  # the step: nothing
        seconds.append(time.perf_counter() - started)
    return seconds


def measure_augment(batch: dict, seconds: float = 2.0) -> float:
    """Images/s of breakhis.data.device_augment on this CPU over one of the iterator's batches."""
    import torch

    from breakhis.data.device_augment import DeviceAugment

    augment = DeviceAugment(size=int(batch["image"].shape[2]))
    cpu = torch.device("cpu")
    augment(batch, cpu)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += int(augment(batch, cpu).shape[0])
    return done / (time.perf_counter() - started)


def measure_predictor(config: CeilingBenchmarkConfig, seconds: float = 2.0) -> dict[str, float]:
    """Part 3: tiles/s of TilePredictor's host side, decode excluded and included."""
    import torch
    from PIL import Image
    from torch import nn

    from breakhis.data.geometry import TileGeometry
    from breakhis.data.tile_decode import decode_tiles
    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.model.networks import build_model
    from breakhis.score.predict import PredictOptions, TilePredictor, predictor_kwargs

    class NoModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros((x.shape[0], 2))

    size, n = config.image_size, config.batch_size
    uri = os.path.join(os.path.abspath(config.workdir), f"model-smallcnn-{size}")
    save_artifact(
        uri,
        build_model("smallcnn", weights="none").eval(),
        ModelCard(
            architecture="smallcnn",
            image_size=size,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
    )
    options = PredictOptions(attribution="none", torch_threads=1)
    predictor = TilePredictor(**predictor_kwargs(uri, 0.5, "cpu", options))
    predictor.model = NoModel()
    geometry = TileGeometry(size=size)
    rng = np.random.default_rng(config.seed)
    tiles = rng.integers(0, 256, (n, *geometry.eval_hw, 3), dtype=np.uint8)
    batch = {
        "uri": np.asarray([f"t{i}.png" for i in range(n)], dtype=object),
        "tile_id": np.asarray([f"t{i}" for i in range(n)], dtype=object),
        "unit": np.zeros(n, dtype=np.int32),
        "image": tiles,
        "error": np.asarray([""] * n, dtype=object),
    }
    rates = {"decode excluded": _rate(lambda: predictor(batch), n, seconds)}
    folder = os.path.join(os.path.abspath(config.workdir), "png-tiles")
    os.makedirs(folder, exist_ok=True)
    k = config.predictor_tiles
    uris = []
    for i in range(k):
        path = os.path.join(folder, f"tile-{i:04d}.png")
        if not os.path.exists(path):
            pixels = rng.integers(0, 256, (460, 700, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
        uris.append(path)
    rows = {
        "uri": np.asarray(uris, dtype=object),
        "tile_id": np.asarray([f"t{i}" for i in range(k)], dtype=object),
        "unit": np.zeros(k, dtype=np.int32),
        "shard": np.asarray([None] * k, dtype=object),
    }

    def decode_and_predict() -> None:
        predictor(decode_tiles(rows, geometry=geometry))

    rates["decode included (PNG 700x460, one core)"] = _rate(decode_and_predict, k, seconds)
    return rates


def _rate(call, tiles: int, seconds: float) -> float:
    call()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        done += tiles
    return done / (time.perf_counter() - started)


def run_ceiling_benchmark(config: CeilingBenchmarkConfig) -> CeilingBenchmarkResult:
    """Run the parts (module docstring); write ``benchmark-ceiling.json``/``.md`` into the
    workdir and return the result."""
    os.makedirs(config.workdir, exist_ok=True)
    start_local_ray(config.cpus or os.cpu_count() or 1)
    epochs, firsts, images, batch = measure_iterator(config)
    indexer = measure_indexer(config, images)
    result = CeilingBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(),
        config=asdict(config),
        images_per_epoch=images,
        iterator_epoch_s=epochs,
        iterator_first_batch_s=firsts,
        indexer_epoch_s=indexer,
        augment_images_per_s=measure_augment(batch),
        predictor=measure_predictor(config),
    )
    save_result(config.workdir, "ceiling", result.to_dict(), result.format_table())
    return result
