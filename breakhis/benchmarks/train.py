"""Benchmark of the training job: epoch time against a plain PyTorch loop.

    breakhis benchmark train --workdir bench-train              # CPU: resnet18 at 64 px
    breakhis benchmark train --workdir bench-train --use-gpu    # GPU: resnet50 at 224 px, bf16

Both sides train the same model (same seed, same optimizer, schedule, loss,
batch size and ``train_one_epoch`` function) on the same generated tiles, in
the same process tree, one after the other:

1. **the job**: ``breakhis.train.job.run_training`` with ``num_workers`` Ray Train
   worker(s) fed by Ray Data (decoded once, cached in the object store,
   augmentation off so both sides see the same pixels); the epoch time is the
   worker's training pass as the job reports it (``train_seconds``);
2. **the plain loop**: the same training images held in memory as one uint8
   tensor in this process, shuffled and cut into batches each epoch, no Ray.

On a CPU both sides run torch with ``threads`` threads (the Ray worker reserves
that many CPUs, which makes Ray set its thread count; the loop calls
``torch.set_num_threads``). The first epoch of each side is a warm-up and is
left out; the figure is the median of the others. The ratio job / loop is the
cost of Ray Train + Ray Data per epoch (target <= 1.1, issue 27). The fixed start-up
cost of the job (planning and validation on the driver, decoding the tiles
into the cache, starting the workers, writing the artifact at the end: the
job's wall time minus its epochs) is reported separately.

On a GPU the headline is images/s per GPU of the job's training pass
(ResNet50 at 224 px, bf16 autocast, channels_last; target >= 3,000 on one
H100), with the plain loop's rate beside it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from breakhis.benchmarks.harness import device_name, prepared_data, save_result, start_local_ray
from breakhis.train.config import TrainConfig

if TYPE_CHECKING:
    from breakhis.train.epoch import EpochStats

log = logging.getLogger(__name__)

_CPU_DEFAULTS = {"arch": "resnet18", "image_size": 64, "batch_size": 32, "scale": 0.1}
_GPU_DEFAULTS = {"arch": "resnet50", "image_size": 224, "batch_size": 256, "scale": 1.0}


@dataclass(frozen=True)
class TrainBenchmarkConfig:
    """Options of ``breakhis benchmark train``. ``None`` picks the CPU or GPU default."""

    workdir: str = "bench-train"
    """Local folder for the generated data (reused between runs) and the job's runs."""
    use_gpu: bool = False
    """Measure on GPUs (one per worker): bf16 autocast and channels_last."""
    arch: str | None = None
    """Model architecture; default resnet18 on CPU, resnet50 on GPU."""
    image_size: int | None = None
    """Model input side in pixels; default 64 on CPU, 224 on GPU."""
    batch_size: int | None = None
    """Images per step (per worker); default 32 on CPU, 256 on GPU."""
    scale: float | None = None
    """Size of the generated data set (fraction of BreakHis' 7,909 images); default 0.1
    on CPU (~790 images), 1.0 on GPU."""
    epochs: int = 4
    """Epochs of each side (the first is a warm-up, left out of the figures)."""
    num_workers: int = 1
    """Ray Train workers of the job (the loop is one process)."""
    threads: int = 1
    """CPU runs: torch threads of the worker and of the loop (and CPUs the worker reserves)."""
    cpus: int = 0
    """CPUs of the local Ray instance the benchmark starts; 0: all of this machine."""
    compile: bool = False
    """torch.compile the model on both sides (GPU runs)."""
    seed: int = 0
    """Seed of the data and the models' initialisation."""

    def __post_init__(self) -> None:
        if self.epochs < 2:
            raise ValueError(f"--epochs must be >= 2 (the first is a warm-up), got {self.epochs}")
        for name in ("num_workers", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.cpus < 0:
            raise ValueError(f"--cpus must be >= 0, got {self.cpus}")

    def resolved(self) -> dict:
        """The options with the device defaults filled in."""
        defaults = _GPU_DEFAULTS if self.use_gpu else _CPU_DEFAULTS
        values = asdict(self)
        for key, default in defaults.items():
            if values[key] is None:
                values[key] = default
        return values


@dataclass(frozen=True)
class TrainBenchmarkResult:
    """What ``breakhis benchmark train`` measured."""

    date: str
    device: str
    gpus: int
    config: dict
    train_images: int
    """Training images per epoch."""
    job_epoch_s: list[float] = field(default_factory=list)
    """The job's training pass per epoch (warm-up included), seconds."""
    job_full_epoch_s: list[float] = field(default_factory=list)
    """The job's whole epoch (training, validation, checkpoint), seconds."""
    loop_epoch_s: list[float] = field(default_factory=list)
    """The plain loop's epochs, seconds."""
    job_first_batch_s: list[float] = field(default_factory=list)
    """The job's wait for the first batch of each epoch (the iterator's start), seconds."""
    job_wait_s: list[float] = field(default_factory=list)
    """The job's waits for every later batch of each epoch (input stalls), seconds."""
    loop_first_batch_s: list[float] = field(default_factory=list)
    loop_wait_s: list[float] = field(default_factory=list)
    job_wall_s: float = 0.0
    """Wall time of run_training."""
    worker_threads: int = 0
    """torch threads the job's worker ran with."""

    @property
    def job_epoch(self) -> float:
        """Median training pass of the job, warm-up left out."""
        return statistics.median(self.job_epoch_s[1:])

    @property
    def loop_epoch(self) -> float:
        """Median epoch of the plain loop, warm-up left out."""
        return statistics.median(self.loop_epoch_s[1:])

    @property
    def ratio(self) -> float:
        """Job / plain loop epoch time (target <= 1.1 on CPU)."""
        return self.job_epoch / self.loop_epoch

    def split(self, side: str) -> tuple[float, float, float]:
        """Median (first batch, waits for later batches, steps) seconds of an epoch of
        ``side`` (``job`` or ``loop``), warm-up left out: the epoch is their sum."""
        epochs = getattr(self, f"{side}_epoch_s")[1:]
        first = getattr(self, f"{side}_first_batch_s")[1:] or [0.0] * len(epochs)
        waits = getattr(self, f"{side}_wait_s")[1:] or [0.0] * len(epochs)
        steps = [e - f - w for e, f, w in zip(epochs, first, waits, strict=True)]
        return statistics.median(first), statistics.median(waits), statistics.median(steps)

    @property
    def startup_s(self) -> float:
        """The job's fixed cost: its wall time minus its epochs."""
        return self.job_wall_s - sum(self.job_full_epoch_s)

    @property
    def job_images_per_s_per_worker(self) -> float:
        workers = self.config["num_workers"]
        return self.train_images / workers / self.job_epoch

    @property
    def loop_images_per_s(self) -> float:
        return self.train_images / self.loop_epoch

    def format_table(self) -> str:
        """Markdown for the README."""
        c = self.config
        unit = "GPU" if self.gpus else "worker"
        lines = [
            f"Training benchmark, {self.date}, {self.device}"
            + (f", {self.gpus} GPU(s)" if self.gpus else f", {c['threads']} torch thread(s)")
            + f"; {c['arch']} at {c['image_size']} px, batch {c['batch_size']}, "
            f"{self.train_images} training images per epoch, {c['epochs']} epochs "
            "(first left out)",
            "",
            "| | epoch, s (median) | images/s |",
            "|---|---:|---:|",
            f"| plain PyTorch loop, data in memory, 1 process | {self.loop_epoch:.2f} "
            f"| {self.loop_images_per_s:.1f} |",
            f"| job: Ray Train ({c['num_workers']} worker(s)) + Ray Data | {self.job_epoch:.2f} "
            f"| {self.job_images_per_s_per_worker:.1f} per {unit} |",
            "",
            "| epoch split, s (median) | first batch | waits for later batches | steps |",
            "|---|---:|---:|---:|",
            *(
                f"| {label} | {first:.3f} | {waits:.3f} | {steps:.3f} |"
                for label, (first, waits, steps) in (
                    ("plain loop", self.split("loop")),
                    ("job", self.split("job")),
                )
            ),
            "",
            f"Job / loop epoch time: {self.ratio:.3f} (target <= 1.1). "
            f"Fixed start-up cost of the job (not in the epochs): {self.startup_s:.1f} s "
            f"of {self.job_wall_s:.1f} s wall. Whole job epoch with validation and checkpoint: "
            f"{statistics.median(self.job_full_epoch_s[1:]):.2f} s.",
        ]
        if self.gpus:
            lines.append(
                f"Images/s per GPU (job, training pass): {self.job_images_per_s_per_worker:.0f} "
                "(target >= 3,000 on one H100 for resnet50 at 224 px)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Measurements and derived figures, for JSON."""
        out = asdict(self)
        out.update(
            job_epoch=self.job_epoch,
            loop_epoch=self.loop_epoch,
            ratio=self.ratio,
            startup_s=self.startup_s,
            job_images_per_s_per_worker=self.job_images_per_s_per_worker,
            loop_images_per_s=self.loop_images_per_s,
            job_split=self.split("job"),
            loop_split=self.split("loop"),
        )
        return out


def _plain_loop(
    images: np.ndarray, labels: np.ndarray, config: dict, class_weights: tuple[float, float]
) -> list[EpochStats]:
    """Train the same model in this process on in-memory tensors; each epoch's stats
    (``seconds`` is the epoch's wall time, with the device synchronised)."""
    import torch

    from breakhis.model.networks import build_model, split_parameters
    from breakhis.train.loop import make_loss, make_optimizer, make_scheduler, train_one_epoch

    device = torch.device("cuda" if config["use_gpu"] else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(config["threads"])
    else:
        torch.backends.cudnn.benchmark = True
    train = _train_config(config, data="unused", storage="unused")
    torch.manual_seed(config["seed"])
    net = build_model(train.arch, weights="none", dropout=train.dropout)
    net.to(device, memory_format=torch.channels_last if on_gpu else torch.preserve_format)
    backbone, head = split_parameters(net, train.arch)
    batch = train.batch_size
    steps = len(labels) // batch
    optimizer = make_optimizer(train, backbone, head)
    scheduler = make_scheduler(optimizer, train, steps)
    loss_fn = make_loss(train, class_weights).to(device)
    model = torch.compile(net) if train.compile else net
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    if on_gpu:
        x, y = x.pin_memory(), y.pin_memory()
    generator = torch.Generator().manual_seed(config["seed"])
    epochs: list[EpochStats] = []
    for epoch in range(config["epochs"]):
        order = torch.randperm(len(y), generator=generator)
        picks = [order[i * batch : (i + 1) * batch] for i in range(steps)]
        batches = [{"image": x[p], "label": y[p]} for p in picks]
        net.train()
        started = time.perf_counter()
        stats = train_one_epoch(
            model,
            batches,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            device=device,
            amp_dtype=torch.bfloat16 if on_gpu else None,
            channels_last=on_gpu,
        )
        if on_gpu:
            torch.cuda.synchronize()
        epochs.append(replace(stats, seconds=time.perf_counter() - started))
        log.info(
            "plain loop epoch %d: %.2f s, loss %.4f", epoch + 1, epochs[-1].seconds, stats.loss
        )
    return epochs


def _train_config(config: dict, *, data: str, storage: str, name: str = "bench") -> TrainConfig:
    """The job's TrainConfig for the benchmark options (also the loop's hyper-parameters)."""
    return TrainConfig(
        data=data,
        storage=storage,
        name=name,
        arch=config["arch"],
        weights="none",
        freeze_epochs=0,
        image_size=config["image_size"],
        augment_strength=0.0,
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        warmup_epochs=0.0,
        patience=0,
        num_workers=config["num_workers"],
        use_gpu=config["use_gpu"],
        cpus_per_worker=1.0 if config["use_gpu"] else float(config["threads"]),
        max_failures=0,
        compile=config["compile"],
        seed=config["seed"],
    )


def run_train_benchmark(config: TrainBenchmarkConfig) -> TrainBenchmarkResult:
    """Run both sides (module docstring); write ``benchmark-train.json`` and
    ``benchmark-train.md`` into the workdir and return the result.

    Starts a local Ray instance (``cpus`` CPUs) unless Ray is already initialised.
    Raises ValueError for bad options, RuntimeError when ``use_gpu`` is asked
    without a CUDA GPU here.
    """
    import torch

    from breakhis.data.dest import PreparedDest
    from breakhis.data.ingest import IngestConfig, build_datasets
    from breakhis.data.splits import SplitSpec
    from breakhis.train.job import run_training

    values = config.resolved()
    if config.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("--use-gpu: no CUDA GPU on this machine")
    os.makedirs(config.workdir, exist_ok=True)
    start_local_ray(config.cpus or os.cpu_count() or 1)
    data = prepared_data(
        config.workdir,
        scale=values["scale"],
        side=values["image_size"],
        seed=config.seed,
    )
    runs = os.path.join(os.path.abspath(config.workdir), "runs")
    name = time.strftime("bench-%Y%m%d-%H%M%S")
    train = _train_config(values, data=data, storage=runs, name=name)

    started = time.perf_counter()
    job = run_training(train)
    wall = time.perf_counter() - started
    history = list(job.history)

    ingest = build_datasets(
        PreparedDest.open(data),
        SplitSpec.parse(train.split, val_fraction=train.val_fraction, seed=train.seed),
        IngestConfig(image_size=train.image_size, augment_strength=0.0, seed=train.seed),
    )
    rows = ingest.datasets["train"].select_columns(["image", "label"]).take_all()
    images = np.stack([r["image"] for r in rows])
    labels = np.asarray([r["label"] for r in rows], dtype=np.int64)
    loop = _plain_loop(images, labels, values, ingest.class_weights)

    gpus = config.num_workers if config.use_gpu else 0
    result = TrainBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(gpus),
        gpus=gpus,
        config=values,
        train_images=int(history[0]["train_images"]),
        job_epoch_s=[float(r["train_seconds"]) for r in history],
        job_full_epoch_s=[float(r["epoch_seconds"]) for r in history],
        loop_epoch_s=[s.seconds for s in loop],
        job_first_batch_s=[float(r.get("train_first_batch_s", 0.0)) for r in history],
        job_wait_s=[float(r.get("train_wait_s", 0.0)) for r in history],
        loop_first_batch_s=[s.first_batch_s for s in loop],
        loop_wait_s=[s.wait_s for s in loop],
        job_wall_s=wall,
        worker_threads=int(history[0].get("torch_threads", 0)),
    )
    save_result(config.workdir, "train", result.to_dict(), result.format_table())
    return result
