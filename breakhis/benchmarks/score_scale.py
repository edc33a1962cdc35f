"""Scale benchmark of the scoring job: ``breakhis benchmark score --scale-tiles 10000,100000``.

On generated tiny tiles (``--tile-width`` x ``--tile-height`` PNG, e.g. 64x42, in the
nested BreakHis folders, hard-linked copies beyond the generated set) with a small model
(e.g. ``--arch smallcnn --image-size 32``), for each size N:

- **plain loop**: what a user writes from ``breakhis export --format torchscript``: list
  the folder, then read, decode (Pillow), resize to the contract's input and run the
  exported TorchScript model ``batch_size`` tiles at a time in this process (torch on
  ``cpus`` threads); its listing, decode and model seconds are timed apart;
- **job, predictions only**, and **job with Grad-CAM**: ``run_scoring`` on the folder (a
  prefix input: listed page by page) in a fresh process with its own local Ray instance
  of ``cpus`` CPUs: tiles/s by its own clock (``ScoreSummary.seconds``: listing,
  planning, scoring, compaction, summary) and by the wall time of the whole command
  (Python and Ray start included), the driver's peak RSS (``ru_maxrss``), the peak PSS
  of the whole process tree (driver, raylet, GCS, workers, actors), sampled every 0.2 s,
  and the files of ``predictions/`` (per million tiles).

Targets (issues 14 and 26): predictions-only job >= 0.9x the loop at the largest N;
driver peak RSS and whole-tree peak within 1.2x between the smallest and the largest N,
i.e. driver memory per predictions row (the growth over the growth in rows) <= 1 KiB;
<= 20 predictions files per million tiles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from breakhis import storage
from breakhis.benchmarks.harness import device_name, peak_memory, save_result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleRun:
    """The loop and the job at one input size."""

    tiles: int
    loop_tiles_per_s: float
    loop_list_s: float
    loop_decode_s: float
    loop_model_s: float
    job_seconds: float  # the job's own clock
    job_wall_s: float  # the whole command
    driver_peak_rss_mb: float
    tree_peak_mb: float
    prediction_files: int
    gradcam_seconds: float  # the Grad-CAM job's own clock; NaN when not run

    @property
    def job_tiles_per_s(self) -> float:
        return self.tiles / self.job_seconds

    @property
    def ratio(self) -> float:
        return self.job_tiles_per_s / self.loop_tiles_per_s

    @property
    def gradcam_ratio(self) -> float:
        return self.tiles / self.gradcam_seconds / self.loop_tiles_per_s

    @property
    def files_per_million(self) -> float:
        return self.prediction_files * 1e6 / self.tiles


_CHILD = (
    "import json, logging, resource, sys, ray\n"
    "from breakhis.score.predict import PredictOptions\n"
    "from breakhis.score.job import ScoreConfig, run_scoring\n"
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')\n"
    "options, cpus = json.loads(sys.argv[1]), int(sys.argv[2])\n"
    "options['predict'] = PredictOptions(**options['predict'])\n"
    "ray.init(address='local', num_cpus=cpus, include_dashboard=False, log_to_driver=False)\n"
    "summary = run_scoring(ScoreConfig(**options))\n"
    "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "print(json.dumps({'seconds': summary.seconds, 'tiles': summary.tiles, 'rss_mb': rss,\n"
    "                  'files': summary.prediction_files}))\n"
)


def _job(options: dict, cpus: int, log_path: str) -> tuple[dict, float, float]:
    """(the child's JSON, wall seconds, whole-tree peak PSS MB) of one job."""
    started = time.perf_counter()
    with open(log_path, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(options), str(cpus)],
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        )
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True)
        reader.start()
        with peak_memory(child.pid) as peak:
            child.wait()
        reader.join()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        with open(log_path, "rb") as err:
            tail = err.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"the scoring job failed (log {log_path}):\n{tail}")
    return json.loads(b"".join(out).decode().strip().splitlines()[-1]), wall, peak[0] / 2**20


def _loop(model_uri: str, root: str, batch_size: int) -> tuple[float, float, float, float]:
    """(tiles/s, list s, decode s, model s) of the plain loop (module docstring) over the
    tiles below root: the model exported to TorchScript and loaded back, Pillow decoding."""
    import io

    import torch
    from PIL import Image

    from breakhis.model.artifact import load_artifact
    from breakhis.model.export import ProbabilityModel, to_torchscript

    net, card = load_artifact(model_uri)
    exported = to_torchscript(ProbabilityModel(net, card).eval(), card)
    started = time.perf_counter()
    model = torch.jit.load(io.BytesIO(exported))
    height, width = card.tile_geometry.eval_hw
    uris = [e.uri for e in storage.walk(root, (".png",))]
    listed = time.perf_counter()
    decode_s = model_s = 0.0

    def decode(uri: str) -> np.ndarray:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            rgb = image.convert("RGB").resize((width, height), Image.BILINEAR, reducing_gap=2.0)
            return np.asarray(rgb)

    for start in range(0, len(uris), batch_size):
        t0 = time.perf_counter()
        images = np.stack([decode(u) for u in uris[start : start + batch_size]])
        t1 = time.perf_counter()
        with torch.inference_mode():
            probabilities, _ = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
            probabilities.numpy()
        decode_s += t1 - t0
        model_s += time.perf_counter() - t1
    seconds = time.perf_counter() - started
    return len(uris) / seconds, listed - started, decode_s, model_s


def _input_folder(config, base: list[str], tiles: int) -> str:
    """A folder of exactly ``tiles`` tiles: the generated ones (nested), then hard-linked
    copies of them in ``copyNN/`` folders."""
    root = os.path.join(config.workdir, "scale", f"in-{tiles}")
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return root
    made = 0
    while made < tiles:
        copy = made // len(base)
        for uri in base[: tiles - made]:
            rel = os.path.relpath(uri, os.path.join(config.workdir, "scale", "base"))
            link = os.path.join(root, f"copy{copy:02d}", rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.exists(link):
                os.link(uri, link)
        made += min(len(base), tiles - made)
    storage.write_bytes(marker, b"")
    return root


def _base_tiles(config, wanted: int) -> list[str]:
    from breakhis.synth.dataset import plan_tiles, synthesize

    root = os.path.join(config.workdir, "scale", "base")
    scale = 0.1
    while len(plan_tiles(scale)) < wanted and scale < 1.0:
        scale = min(1.0, scale * 1.5)
    marker = os.path.join(root, f".done-{scale:.6f}-{config.tile_width}x{config.tile_height}")
    if not os.path.exists(marker):
        synthesize(
            root, scale=scale, seed=config.seed, width=config.tile_width, height=config.tile_height
        )
        storage.write_bytes(marker, b"")
    return [e.uri for e in storage.walk(root, (".png",))]


@dataclass(frozen=True)
class ScaleResult:
    runs: list[ScaleRun]
    table: str

    def format_table(self) -> str:
        return self.table


def run_scale_benchmark(config, model_uri: str, cpus: int) -> ScaleResult:
    """The loop and the job at each of ``config.scale_tiles`` (module docstring); writes
    ``benchmark-score-scale.json`` and ``.md`` into the workdir."""
    import torch

    from breakhis.score.job import ScoreConfig
    from breakhis.score.predict import PredictOptions

    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(cpus)
    base = _base_tiles(config, min(max(config.scale_tiles), 10_000))
    runs = []
    for tiles in config.scale_tiles:
        folder = _input_folder(config, base, tiles)
        loop = _loop(model_uri, folder, config.batch_size)
        log.info("plain loop at %d tiles: %.1f tiles/s", tiles, loop[0])
        output = os.path.join(config.workdir, "scale", f"out-{tiles}")
        jobs = {}
        for method in ("none", "gradcam") if config.scale_gradcam else ("none",):
            out = output if method == "none" else f"{output}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            job = ScoreConfig(
                model=model_uri,
                input=folder,
                out=out,
                unit_size=config.unit_size,
                predict=PredictOptions(
                    attribution=method,
                    batch_size=config.batch_size,
                    num_actors=1,
                    cpus_per_actor=1,
                    torch_threads=cpus,
                ),
            )
            jobs[method] = _job(asdict(job), cpus, f"{out}.log")
        child, wall, tree = jobs["none"]
        gradcam = jobs["gradcam"][0]["seconds"] if "gradcam" in jobs else float("nan")
        runs.append(
            ScaleRun(
                tiles, *loop, child["seconds"], wall, child["rss_mb"], tree, child["files"], gradcam
            )
        )
        log.info("%s", runs[-1])
    table = format_scale(runs, config, cpus, (load_at_start, os.getloadavg()[0]))
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(0),
        "cpus": cpus,
        "config": asdict(config),
        "runs": [
            {
                **asdict(r),
                "job_tiles_per_s": r.job_tiles_per_s,
                "ratio": r.ratio,
                "gradcam_ratio": r.gradcam_ratio,
                "files_per_million": r.files_per_million,
            }
            for r in runs
        ],
    }
    save_result(config.workdir, "score-scale", figures, table)
    return ScaleResult(runs, table)


def format_scale(runs: list[ScaleRun], config, cpus: int, load: tuple[float, float]) -> str:
    """Markdown table of the scale runs, with the targets."""
    lines = [
        f"Scoring at scale, {time.strftime('%Y-%m-%d')}, {device_name(0)}, {cpus} CPUs "
        f"(load average {load[0]:.1f} at the start, {load[1]:.1f} at the end); "
        f"{config.arch} at {config.image_size} px, batch {config.batch_size}, "
        f"units of {config.unit_size}, {config.tile_width}x{config.tile_height} PNG tiles; "
        "the loop: the exported TorchScript model, Pillow decode",
        "",
        "| tiles | plain loop, tiles/s | job (own clock), tiles/s | job / loop | Grad-CAM "
        "job / loop | job, whole command, tiles/s | driver peak RSS, MB | whole tree peak "
        "PSS, MB | predictions files per million tiles | loop: list / decode / model, s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.tiles} | {r.loop_tiles_per_s:.0f} | {r.job_tiles_per_s:.0f} | {r.ratio:.2f} "
            f"| {r.gradcam_ratio:.2f} | {r.tiles / r.job_wall_s:.0f} "
            f"| {r.driver_peak_rss_mb:.0f} | {r.tree_peak_mb:.0f} | {r.files_per_million:.0f} "
            f"| {r.loop_list_s:.1f} / {r.loop_decode_s:.1f} / {r.loop_model_s:.1f} |"
        )
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        per_row = (
            (large.driver_peak_rss_mb - small.driver_peak_rss_mb)
            * 2**20
            / (large.tiles - small.tiles)
            if large.tiles > small.tiles
            else float("nan")
        )
        lines += [
            "",
            f"Job / loop at {large.tiles} tiles: {large.ratio:.2f} (target >= 0.9); driver peak "
            f"RSS {large.driver_peak_rss_mb / small.driver_peak_rss_mb:.2f}x and whole tree "
            f"{large.tree_peak_mb / small.tree_peak_mb:.2f}x from {small.tiles} to "
            f"{large.tiles} tiles (targets <= 1.2x); driver memory per predictions row "
            f"{per_row:.0f} bytes (target <= 1024); {large.files_per_million:.0f} predictions "
            "files per million tiles (target <= 20)",
        ]
    return "\n".join(lines)
