"""The GPU benchmark: every GPU figure of the README in one command on one GPU.

    make bench-gpu          # = breakhis benchmark gpu --workdir bench-gpu

Parts, each in the same process tree on the same machine, each also written to
``benchmark-gpu.json`` as soon as it ends (a later failure keeps the earlier ones):

1. **predictor**: the scoring/evaluation model actor (breakhis.score.predict.TilePredictor)
   called in this process on batches of ``batch_size`` decoded 224 px tiles already in
   host memory: tiles/s of the GPU path alone (host-to-device copy, normalisation, the
   model, softmax, maps back to the host), predictions only and with Grad-CAM, bf16
   autocast + channels_last (the default) against float32; beside it the bare model
   (``model(x)`` in bf16 on tensors already on the GPU), the ceiling no pipeline reaches.
   The pixel values are random: a ResNet's speed does not depend on them.
2. **decode**: what one CPU core decodes (breakhis.data.imaging.decode_rgb, 700x460 PNG tiles
   to 224 px), times the CPUs: the most tiles/s any job can score from PNGs on this machine.
3. **train**: ``breakhis benchmark train --use-gpu`` (ResNet50 at 224 px, bf16,
   channels_last; the Ray Train job's images/s against a plain loop).
4. **score**: ``breakhis benchmark score`` (the job end to end with Ray Data against a
   plain loop, Grad-CAM, IG, memory) on ``score_tiles`` generated 700x460 PNG tiles.

Targets (issue 14, H100/H200): >= 10,000 tiles/s predictions only and >= 3,000 with
Grad-CAM (ResNet50, 224 px); training >= 3,000 images/s. The whole run fits in about
6 minutes on one H200 (``seconds`` per predictor measurement, the data sizes below).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from breakhis import storage
from breakhis.benchmarks.harness import device_name

log = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("predictor", "decode", "train", "score")


@dataclass(frozen=True)
class GpuBenchmarkConfig:
    """Options of ``breakhis benchmark gpu``."""

    workdir: str = "bench-gpu"
    """Local folder for generated data, models and results (reused)."""
    parts: tuple[str, ...] = field(default=PARTS, metadata={"choices": PARTS})
    """Parts to run (module docstring), in this order."""
    arch: str = "resnet50"
    """Model of every part."""
    image_size: int = 224
    """Model input side in pixels."""
    batch_size: int = 256
    """Tiles per model call (predictor, score) and images per training step."""
    seconds: float = 6.0
    """Timed seconds of each predictor measurement (after a warm-up)."""
    score_tiles: int = 2048
    """Tiles of the scoring job's throughput runs."""
    train_scale: float = 0.5
    """Generated training data, as a fraction of BreakHis' 7,909 images."""
    train_epochs: int = 4
    """Epochs of each side of the training benchmark (the first is a warm-up)."""
    dry_run: bool = False
    """Run every part on the CPU at a toy size (smallcnn, 32 px, short timings) to check the
    script here before a GPU machine runs it; the figures mean nothing."""

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"--parts {','.join(self.parts)}: accepted {', '.join(PARTS)}")
        if self.seconds <= 0 or self.batch_size < 1 or self.score_tiles < 8:
            raise ValueError("--seconds must be > 0, --batch-size >= 1, --score-tiles >= 8")
        if storage.is_s3(self.workdir):
            raise ValueError("--workdir must be a local folder")


@dataclass
class GpuBenchmarkResult:
    """What ``breakhis benchmark gpu`` measured (one entry per part that ran)."""

    date: str
    device: str
    cpus: int
    torch: str
    config: dict
    parts: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def headline(self) -> str:
        """Issue 27's table: the job against the same GPU without it, with the ratios."""
        c = self.config
        rows = [
            f"| measure ({c['arch']}, {c['image_size']} px) | the job "
            "| the same GPU without it | ratio |",
            "|---|---:|---:|---:|",
        ]
        train = self.parts.get("train")
        if train:
            job, loop = train["job_images_per_s_per_worker"], train["loop_images_per_s"]
            rows.append(
                f"| training, images/s (1 GPU worker, cached) | {job:,.0f} "
                f"| plain loop, tensors in memory: {loop:,.0f} | {job / loop:.2f}x |"
            )
        predictor = self.parts.get("predictor", {})
        bare = predictor.get("bare model forward, bf16 + channels_last (ceiling)")
        for label, name in (
            ("predictions only, bf16", "predictions only, bf16 + channels_last"),
            ("predictions only, bf16, 2 calls in flight",
             "predictions only, bf16 + channels_last, 2 calls in flight"),
        ):  # fmt: skip
            if name in predictor and bare:
                rows.append(
                    f"| predictor, {label} | {predictor[name]:,.0f} tiles/s "
                    f"| bare `model(x)`: {bare:,.0f} | {predictor[name] / bare:.2f}x |"
                )
        gradcam = predictor.get("Grad-CAM, bf16 + channels_last")
        if gradcam:
            rows.append(f"| predictor, Grad-CAM, bf16 | {gradcam:,.0f} | - | - |")
        return "\n".join(rows)

    def format_table(self) -> str:
        """The headline figures as a Markdown table."""
        lines = [
            f"GPU benchmark, {self.date}, {self.device}, {self.cpus} CPUs, torch {self.torch}"
            + (" (DRY RUN on the CPU: the figures mean nothing)" if self.config["dry_run"] else ""),
            "",
            self.headline(),
            "",
            "Every figure:",
            "",
            "| measurement | figure |",
            "|---|---:|",
        ]
        for name, rate in self.parts.get("predictor", {}).items():
            lines.append(f"| predictor: {name} | {rate:,.0f} tiles/s |")
        decode = self.parts.get("decode")
        if decode:
            lines.append(
                f"| PNG decode 700x460 -> {self.config['image_size']} px, one core "
                f"| {decode['ms_per_tile']:.1f} ms/tile |"
            )
            lines.append(
                f"| PNG decode, all {self.cpus} CPUs (ceiling of any PNG job) "
                f"| {decode['tiles_per_s_all_cpus']:,.0f} tiles/s |"
            )
        for row in self.parts.get("score", {}).get("throughput", []):
            lines.append(
                f"| score: {row['name']} | {row['tiles_per_s']:,.0f} end to end, "
                f"{row['steady_tiles_per_s']:,.0f} steady tiles/s |"
            )
        train = self.parts.get("train")
        if train:
            lines.append(
                f"| train: Ray Train job | {train['job_images_per_s_per_worker']:,.0f} images/s |"
            )
            lines.append(f"| train: plain loop | {train['loop_images_per_s']:,.0f} images/s |")
        for name, error in self.errors.items():
            lines.append(f"| {name}: FAILED | {error.splitlines()[-1][:80]} |")
        return "\n".join(lines)


def _model_artifact(config: GpuBenchmarkConfig) -> str:
    import torch

    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.model.networks import build_model

    uri = os.path.join(config.workdir, f"model-{config.arch}-{config.image_size}")
    torch.manual_seed(0)
    save_artifact(
        uri,
        build_model(config.arch, weights="none").eval(),
        ModelCard(
            architecture=config.arch,
            image_size=config.image_size,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
    )
    return uri


def _rate(call, batch_tiles: int, seconds: float) -> float:
    """Tiles/s of ``call()`` (which must wait for the GPU) over ``seconds``, after warm-up."""
    for _ in range(3):
        call()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        done += batch_tiles
    return done / (time.perf_counter() - started)


def measure_predictor(config: GpuBenchmarkConfig) -> dict[str, float]:
    """Part 1 (module docstring): tiles/s of TilePredictor and of the bare model."""
    import torch

    if not torch.cuda.is_available() and not config.dry_run:
        raise RuntimeError("the predictor part needs a CUDA GPU")
    device = "cpu" if config.dry_run else "cuda"
    uri = _model_artifact(config)
    n, side = config.batch_size, config.image_size
    rng = np.random.default_rng(0)
    batch = {
        "uri": np.asarray([f"tile-{i}.png" for i in range(n)], dtype=object),
        "tile_id": np.asarray([f"tile-{i}" for i in range(n)], dtype=object),
        "unit": np.zeros(n, dtype=np.int32),
        "image": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
        "error": np.asarray([""] * n, dtype=object),
    }
    rates: dict[str, float] = {}
    for amp in (True, False):
        for method in (None, "gradcam"):
            predictor = _gpu_predictor(uri, method, amp, device)
            name = f"{'predictions only' if method is None else 'Grad-CAM'}, " + (
                "bf16 + channels_last" if amp else "float32"
            )
            rates[name] = _rate(lambda p=predictor: p(batch), n, config.seconds)
            log.info("predictor %s: %.0f tiles/s", name, rates[name])
            del predictor
    predictor = _gpu_predictor(uri, None, True, device)
    name = "predictions only, bf16 + channels_last, 2 calls in flight"
    rates[name] = _rate(_in_flight(predictor, batch, 2), 2 * n, config.seconds)
    predictor.pin_memory = False
    name = "predictions only, bf16 + channels_last, pageable host copy"
    rates[name] = _rate(lambda: predictor(batch), n, config.seconds)
    x = predictor._inputs(batch["image"])

    def bare() -> None:
        with torch.inference_mode(), predictor._autocast():
            predictor.model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    rates["bare model forward, bf16 + channels_last (ceiling)"] = _rate(bare, n, config.seconds)
    return rates


def _gpu_predictor(uri: str, method: str | None, amp: bool, device: str = "cuda"):
    """The scoring jobs' model actor on ``device``, built as predict_dataset builds it."""
    from breakhis.score.predict import PredictOptions, TilePredictor, predictor_kwargs

    options = PredictOptions(attribution=method or "none", amp=amp, torch_threads=1)
    return TilePredictor(**predictor_kwargs(uri, 0.5, device, options))


def _in_flight(predictor, batch: dict, calls: int):
    """A call that runs ``calls`` predictor calls at once on threads (an actor with
    ``max_concurrency`` ``calls``), returning when all are done."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(calls)

    def call() -> None:
        for future in [pool.submit(predictor, batch) for _ in range(calls)]:
            future.result()

    return call


def measure_decode(config: GpuBenchmarkConfig, tiles: int = 64) -> dict[str, float]:
    """Part 2: ms per 700x460 PNG decoded and resized on one core, and the all-CPU ceiling."""
    from breakhis.data.imaging import decode_rgb
    from breakhis.synth.dataset import synthesize

    root = os.path.join(config.workdir, "decode-tiles")
    if not os.path.isdir(root):
        synthesize(root, scale=0.01, seed=0, width=700, height=460)
    data = [storage.read_bytes(e.uri) for e in storage.walk(root, (".png",))][:tiles]
    decode_rgb(data[0], config.image_size)
    started = time.perf_counter()
    for blob in data:
        decode_rgb(blob, config.image_size)
    ms = (time.perf_counter() - started) / len(data) * 1000
    cpus = os.cpu_count() or 1
    return {"tiles": len(data), "ms_per_tile": ms, "tiles_per_s_all_cpus": cpus * 1000 / ms}


def _score(config: GpuBenchmarkConfig) -> dict:
    from breakhis.benchmarks.score import ScoreBenchmarkConfig, run_score_benchmark

    result = run_score_benchmark(
        ScoreBenchmarkConfig(
            workdir=os.path.join(config.workdir, "score"),
            tiles=config.score_tiles,
            arch=config.arch,
            image_size=config.image_size,
            batch_size=config.batch_size,
            unit_size=config.batch_size,
            attribution_tiles=config.batch_size,
            memory_tiles=config.score_tiles // 4,
            memory_scales=(1, 4),
        )
    )
    return asdict(result)


def _train(config: GpuBenchmarkConfig) -> dict:
    from breakhis.benchmarks.train import TrainBenchmarkConfig, run_train_benchmark

    result = run_train_benchmark(
        TrainBenchmarkConfig(
            workdir=os.path.join(config.workdir, "train"),
            use_gpu=not config.dry_run,
            arch=config.arch,
            image_size=config.image_size,
            batch_size=config.batch_size,
            scale=config.train_scale,
            epochs=config.train_epochs,
        )
    )
    return result.to_dict()


def run_gpu_benchmark(config: GpuBenchmarkConfig) -> GpuBenchmarkResult:
    """Run the parts of ``config`` in order (module docstring). A part that fails is recorded
    (its traceback's last line in the table, the whole of it in the JSON) and the next one
    runs. Writes ``benchmark-gpu.json``/``.md`` into the workdir after every part."""
    import torch

    if config.dry_run:
        config = replace(
            config,
            arch="smallcnn",
            image_size=32,
            batch_size=16,
            seconds=0.3,
            score_tiles=16,
            train_scale=0.02,
            train_epochs=2,
        )
    os.makedirs(config.workdir, exist_ok=True)
    result = GpuBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(torch.cuda.device_count()),
        cpus=os.cpu_count() or 1,
        torch=torch.__version__,
        config=asdict(config),
    )
    runners = {
        "predictor": measure_predictor,
        "decode": measure_decode,
        "score": _score,
        "train": _train,
    }
    for part in config.parts:
        started = time.perf_counter()
        try:
            result.parts[part] = runners[part](config)
        except Exception:  # noqa: BLE001 - one part's failure must not lose the others' figures
            result.errors[part] = traceback.format_exc()
            log.exception("GPU benchmark part %s failed", part)
        result.seconds[part] = time.perf_counter() - started
        stem = os.path.join(config.workdir, "benchmark-gpu")
        storage.write_bytes(f"{stem}.json", json.dumps(asdict(result), indent=2).encode())
        storage.write_bytes(f"{stem}.md", (result.format_table() + "\n").encode())
    return result
