"""Benchmark of the scoring job: throughput against a plain PyTorch loop, and memory.

    breakhis benchmark score --workdir bench-score --tiles 512 --arch resnet18

What it measures, all in one process on one machine (the benchmark starts its
own local Ray instance with ``cpus`` CPUs, so everything it measures runs on
the same CPUs):

1. **plain loop**: read, decode, normalise and predict the tiles in order in
   this process, ``batch_size`` at a time, torch using ``cpus`` threads (the
   baseline a user would write without Ray);
2. **job, predictions only** (``--attribution none``) on the same tiles;
3. **job with Grad-CAM** and 4. **with Integrated Gradients** (IG on the first
   ``attribution_tiles`` tiles only, it costs ``ig_steps`` backward passes);
5. **memory**: the predictions-only job on 1x, 4x and 16x the input
   (``memory_tiles`` tiles, hard-linked copies), each in a fresh process with
   its own local Ray instance, recording the peak proportional set size (PSS,
   so shared pages count once) summed over that process and all its
   descendants (driver, GCS, raylet, workers, actors), sampled every 0.2 s.

Each throughput is given two ways: **end to end** (wall time of the whole job,
including Ray Data's start, the actors' start and their model load; the plain
loop's includes its model load) and **steady**, what a job of millions of tiles
sees: for the job, the extra tiles over the extra time of a second run on a
quarter of the input (both pay the same start-up; results reach the driver in
bursts, so output times would not do); for the loop, the tiles after its first
batch over the time since. The target ratio (job / plain >= 0.9, predictions
only) is judged on the steady figures.

With a GPU (``torch.cuda.is_available()`` here and GPUs in the Ray cluster) the
job puts one GPU per actor and the loop uses the GPU: the figures are then
tiles/s per GPU, with and without Grad-CAM. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from breakhis import storage
from breakhis.benchmarks.harness import (
    device_name,
    peak_memory,
    save_result,
    start_local_ray,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreBenchmarkConfig:
    """Options of ``breakhis benchmark score``."""

    workdir: str = "bench-score"
    """Local folder for the generated tiles, the model and the job outputs (reused)."""
    tiles: int = 512
    """Tiles of the throughput runs."""
    arch: str = "resnet18"
    """Model architecture (random weights: speed does not depend on them)."""
    image_size: int = 224
    """Model input side in pixels."""
    tile_width: int = 700
    """Width of the generated tiles (BreakHis: 700x460), so decoding costs what it does."""
    tile_height: int = 460
    """Height of the generated tiles."""
    batch_size: int = 32
    """Tiles per model call, for the loop and the job alike."""
    unit_size: int = 64
    """Tiles per work unit of the job; 0: the job's automatic size."""
    attribution_tiles: int = 16
    """Tiles of the Integrated Gradients run."""
    ig_steps: int = 32
    """Integrated Gradients steps (the job's default)."""
    memory_tiles: int = 128
    """Tiles of the 1x memory run (4x and 16x are hard-linked copies)."""
    memory_scales: tuple[int, ...] = (1, 4, 16)
    """Input multiples of the memory runs."""
    cpus: int = 0
    """CPUs of the local Ray instance and torch threads of the loop; 0: all of this machine."""
    seed: int = 0
    """Seed of the generated tiles and the model's initialisation."""
    scale_tiles: tuple[int, ...] = ()
    """Run only the scale benchmark (breakhis.benchmarks.score_scale) at these input sizes,
    e.g. 10000,100000 (with --arch smallcnn --image-size 32 --tile-width 64
    --tile-height 42)."""

    scale_gradcam: bool = True
    """In the scale benchmark, also run the job with Grad-CAM at each size."""

    def __post_init__(self) -> None:
        if self.unit_size < 0:
            raise ValueError("--unit-size must be >= 0 (0: the job's automatic size)")
        for name in ("tiles", "image_size", "batch_size", "memory_tiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.attribution_tiles < 1 or self.ig_steps < 2:
            raise ValueError("--attribution-tiles must be >= 1 and --ig-steps >= 2")
        if self.cpus < 0:
            raise ValueError(f"--cpus must be >= 0 (0: all), got {self.cpus}")
        if not self.memory_scales or min(self.memory_scales) < 1:
            raise ValueError("--memory-scales must be integers >= 1")
        if self.scale_tiles and min(self.scale_tiles) < 1:
            raise ValueError(f"--scale-tiles must be integers >= 1, got {self.scale_tiles}")
        if storage.is_s3(self.workdir):
            raise ValueError("--workdir must be a local folder (the benchmark times local I/O)")


@dataclass(frozen=True)
class Throughput:
    """One throughput measurement."""

    name: str
    tiles: int
    seconds: float
    tiles_per_s: float  # end to end
    steady_tiles_per_s: float


@dataclass(frozen=True)
class ScoreBenchmarkResult:
    """What ``breakhis benchmark score`` measured."""

    date: str
    device: str
    cpus: int
    gpus: int
    config: dict
    load_average: tuple[float, float]  # 1-minute load at the start and at the end
    throughput: list[Throughput] = field(default_factory=list)
    peak_memory_mb: dict[int, float] = field(default_factory=dict)  # scale -> MB

    def ratio(self) -> float:
        """Steady tiles/s of the predictions-only job over the plain loop's."""
        rates = {t.name: t.steady_tiles_per_s for t in self.throughput}
        return rates["job, predictions only"] / rates["plain PyTorch loop"]

    def memory_spread(self) -> float:
        """(largest - smallest) / smallest peak memory across input scales."""
        values = list(self.peak_memory_mb.values())
        return (max(values) - min(values)) / min(values)

    def format_table(self) -> str:
        """Markdown tables for the README."""
        per = " per GPU" if self.gpus else ""
        lines = [
            f"Scoring benchmark, {self.date}, {self.device}, {self.cpus} CPUs"
            + (f", {self.gpus} GPU(s)" if self.gpus else "")
            + f" (load average {self.load_average[0]:.1f} at the start, "
            f"{self.load_average[1]:.1f} at the end)"
            + f"; {self.config['arch']} at {self.config['image_size']} px, "
            f"batch {self.config['batch_size']}, "
            f"{self.config['tile_width']}x{self.config['tile_height']} PNG tiles",
            "",
            f"| run | tiles | end to end, tiles/s{per} | steady, tiles/s{per} |",
            "|---|---:|---:|---:|",
        ]
        for t in self.throughput:
            lines.append(
                f"| {t.name} | {t.tiles} | {t.tiles_per_s:.1f} | {t.steady_tiles_per_s:.1f} |"
            )
        lines += [
            "",
            f"Job / plain loop, predictions only (steady): {self.ratio():.2f} (target >= 0.9)",
            "",
            "| input | tiles | peak memory (PSS, all processes), MB |",
            "|---|---:|---:|",
        ]
        base = self.config["memory_tiles"]
        for scale, mb in sorted(self.peak_memory_mb.items()):
            lines.append(f"| {scale}x | {base * scale} | {mb:.0f} |")
        lines.append(f"\nSpread of peak memory: {100 * self.memory_spread():.0f}% (target <= 20%)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- memory sampling


_CHILD = (
    "import json, sys, ray\n"
    "from breakhis.score.predict import PredictOptions\n"
    "from breakhis.score.job import ScoreConfig, run_scoring\n"
    "options, cpus = json.loads(sys.argv[1]), int(sys.argv[2])\n"
    "options['predict'] = PredictOptions(**options['predict'])\n"
    "ray.init(address='local', num_cpus=cpus, include_dashboard=False, log_to_driver=False)\n"
    "run_scoring(ScoreConfig(**options))\n"
)


def peak_memory_of_job(options: dict, cpus: int) -> float:
    """Run one scoring job (ScoreConfig ``options``) in a fresh process with its own local Ray
    instance and return the peak PSS in MB of that process and all its descendants.

    A fresh process per measurement, so every input size starts from the same state (no
    idle workers or caches left by earlier runs). Raises RuntimeError when the job fails.
    """
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(options), str(cpus)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(child.stderr.read()), daemon=True)
    reader.start()
    with peak_memory(child.pid) as peak:
        child.wait()
    reader.join()
    if child.returncode != 0:
        tail = b"".join(stderr).decode(errors="replace")[-3000:]
        raise RuntimeError(f"the scoring job of the memory run failed:\n{tail}")
    return peak[0] / 2**20


# --------------------------------------------------------------------------- the runs


def _tile_uris(config: ScoreBenchmarkConfig, count: int) -> list[str]:
    """``count`` generated tiles under the workdir (generated once, then reused)."""
    from breakhis.synth.dataset import plan_tiles, synthesize

    root = os.path.join(config.workdir, "tiles")
    wanted = max(count, config.memory_tiles)
    scale = 0.01
    while len(plan_tiles(scale)) < wanted:
        scale *= 1.5
    marker = os.path.join(root, f".done-{scale:.6f}-{config.tile_width}x{config.tile_height}")
    if not os.path.exists(marker):
        synthesize(
            root, scale=scale, seed=config.seed, width=config.tile_width, height=config.tile_height
        )
        storage.write_bytes(marker, b"")
    uris = [e.uri for e in storage.walk(root, (".png",))]
    return uris[:count]


def _manifest(config: ScoreBenchmarkConfig, name: str, uris: list[str]) -> str:
    path = os.path.join(config.workdir, "inputs", f"{name}.txt")
    storage.write_bytes(path, ("\n".join(uris) + "\n").encode())
    return path


def _linked_copies(config: ScoreBenchmarkConfig, uris: list[str], scale: int) -> list[str]:
    """``scale`` URIs per tile: the tile and hard links to it (no extra disk, no extra decode
    shortcut: the job cannot tell them apart from other files)."""
    out = list(uris)
    for copy in range(1, scale):
        folder = os.path.join(config.workdir, "copies", f"copy{copy:02d}")
        os.makedirs(folder, exist_ok=True)
        for uri in uris:
            link = os.path.join(folder, os.path.basename(uri))
            if not os.path.exists(link):
                os.link(uri, link)
            out.append(link)
    return out


def _plain_loop(model_uri: str, uris: list[str], batch_size: int, device: str) -> Throughput:
    import torch

    from breakhis.benchmarks.harness import pillow_decode
    from breakhis.model.artifact import load_artifact

    started = time.perf_counter()
    model, card = load_artifact(model_uri, device=device)
    mean = torch.tensor(card.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(card.std, device=device).view(1, 3, 1, 1)
    done_at = []
    probs = []
    for start in range(0, len(uris), batch_size):
        images = np.stack(
            [
                pillow_decode(storage.read_bytes(u), card.image_size)
                for u in uris[start : start + batch_size]
            ]
        )
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
        with torch.inference_mode():
            probs.append(torch.softmax(model((x - mean) / std), dim=1)[:, 1].cpu())
        done_at.append((start + len(images), time.perf_counter()))
    seconds = time.perf_counter() - started
    (first_n, first_t), (last_n, last_t) = done_at[0], done_at[-1]
    steady = (last_n - first_n) / (last_t - first_t) if last_t > first_t else float("nan")
    return Throughput("plain PyTorch loop", len(uris), seconds, len(uris) / seconds, steady)


def _timed_job(config, output: str) -> tuple[int, float]:
    """(tiles, seconds) of one scoring job into a fresh ``output``."""
    import shutil

    from breakhis.score.job import run_scoring

    shutil.rmtree(output, ignore_errors=True)  # a fresh output: every unit is scored
    started = time.perf_counter()
    summary = run_scoring(replace(config, out=output))
    return summary.tiles, time.perf_counter() - started


def _job(name: str, config, small_input: str, output: str) -> Throughput:
    """The job on its input and on a quarter of it: the difference of the two is the
    steady rate, free of the start-up both pay (Ray Data's start, actors, model load)."""
    small_tiles, small_seconds = _timed_job(replace(config, input=small_input), f"{output}-small")
    tiles, seconds = _timed_job(config, output)
    extra = seconds - small_seconds
    steady = (tiles - small_tiles) / extra if extra > 0 else float("nan")
    return Throughput(name, tiles, seconds, tiles / seconds, steady)


def _save_model(config: ScoreBenchmarkConfig) -> str:
    """A model of random weights (speed does not depend on them) in the workdir."""
    import torch

    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.model.networks import build_model

    torch.manual_seed(config.seed)
    model_uri = os.path.join(config.workdir, "model")
    save_artifact(
        model_uri,
        build_model(config.arch).eval(),
        ModelCard(
            architecture=config.arch,
            image_size=config.image_size,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
    )
    return model_uri


def run_score_benchmark(config: ScoreBenchmarkConfig):
    """Run every measurement of the module docstring; write ``benchmark-score.json`` and
    ``benchmark-score.md`` into the workdir.

    The throughput runs use a local Ray instance of ``cpus`` CPUs, started here
    unless Ray is already initialised; every memory run starts its own in a
    child process. Returns the result. Raises ValueError for bad options and
    RuntimeError when a memory run's job fails.
    """
    import ray
    import torch

    from breakhis.score.job import ScoreConfig
    from breakhis.score.predict import PredictOptions

    cpus = config.cpus or os.cpu_count() or 1
    load_at_start = os.getloadavg()[0]
    os.makedirs(config.workdir, exist_ok=True)
    if config.scale_tiles:  # each job starts its own Ray in a child process
        from breakhis.benchmarks.score_scale import run_scale_benchmark

        return run_scale_benchmark(config, _save_model(config), cpus)
    start_local_ray(cpus)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if torch.cuda.is_available() else 0
    device = "cuda" if gpus else "cpu"
    torch.set_num_threads(cpus)

    model_uri = _save_model(config)
    uris = _tile_uris(config, config.tiles)
    job = ScoreConfig(
        model=model_uri,
        input=_manifest(config, "throughput", uris),
        out="",  # set per run
        unit_size=config.unit_size,
        predict=PredictOptions(
            attribution="none",
            batch_size=config.batch_size,
            # On CPUs one actor runs the model on every core (torch threads, as in the loop)
            # while Ray reserves one CPU for it, leaving the rest to decode tasks that share
            # the cores; on GPUs one actor per GPU.
            num_actors=gpus or 1,
            cpus_per_actor=1,
            torch_threads=1 if gpus else cpus,
            ig_steps=config.ig_steps,
        ),
    )
    out = os.path.join(config.workdir, "outputs")
    results = _throughput_runs(config, job, model_uri, uris, device, out)
    if gpus:
        results = [
            replace(
                r, tiles_per_s=r.tiles_per_s / gpus, steady_tiles_per_s=r.steady_tiles_per_s / gpus
            )
            for r in results
        ]

    memory = _memory_runs(config, job, out, cpus)

    result = ScoreBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(gpus),
        cpus=cpus,
        gpus=gpus,
        config=asdict(config),
        load_average=(load_at_start, os.getloadavg()[0]),
        throughput=results,
        peak_memory_mb=memory,
    )
    save_result(config.workdir, "score", asdict(result), result.format_table())
    return result


def _throughput_runs(config, job, model_uri: str, uris: list[str], device: str, out: str) -> list:
    """The plain loop, then the job with predictions only, Grad-CAM and Integrated
    Gradients, each timed over the whole listing and a quarter of it (steady rate)."""
    quarter = _manifest(config, "throughput-quarter", uris[: max(1, len(uris) // 4)])
    results = [_plain_loop(model_uri, uris, config.batch_size, device)]
    log.info("%s", results[-1])
    # A first tiny job pays Ray Data's one-time start (its own actors, worker processes), so
    # the measured jobs pay only what every job pays (their model actors and model load).
    _timed_job(replace(job, input=_manifest(config, "warm-up", uris[:4])), f"{out}/warm-up")
    results.append(_job("job, predictions only", job, quarter, f"{out}/none"))
    log.info("%s", results[-1])
    gradcam = replace(job, predict=replace(job.predict, attribution="gradcam"))
    results.append(_job("job, Grad-CAM", gradcam, quarter, f"{out}/gradcam"))
    log.info("%s", results[-1])
    ig_uris = uris[: config.attribution_tiles]
    ig_job = replace(
        job,
        input=_manifest(config, "ig", ig_uris),
        predict=replace(job.predict, attribution="ig"),
    )
    ig_quarter = _manifest(config, "ig-quarter", ig_uris[: max(1, len(ig_uris) // 4)])
    name = f"job, Integrated Gradients ({config.ig_steps} steps)"
    results.append(_job(name, ig_job, ig_quarter, f"{out}/ig"))
    log.info("%s", results[-1])
    return results


def _memory_runs(config, job, out: str, cpus: int) -> dict[int, float]:
    """Peak memory (MB) of the job over ``memory_tiles`` linked ``scale`` times, per scale,
    each run in a child process with its own Ray."""
    import shutil

    memory: dict[int, float] = {}
    base = _tile_uris(config, config.memory_tiles)
    for scale in config.memory_scales:
        listing = _manifest(config, f"memory-{scale}x", _linked_copies(config, base, scale))
        output = f"{out}/memory-{scale}x"
        shutil.rmtree(output, ignore_errors=True)
        options = asdict(replace(job, input=listing, out=output))
        memory[scale] = peak_memory_of_job(options, cpus)
        log.info("peak memory at %dx: %.0f MB", scale, memory[scale])
    return memory
