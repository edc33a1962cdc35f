"""Batch scoring job: a model artifact over any number of tiles, exactly once.

    ray job submit --working-dir . -- python jobs/score.py \\
        --model s3://bucket/runs/rn50/best --input s3://archive/tiles/ \\
        --output s3://bucket/scores/2026-11 --attribution gradcam
    breakhis score --model ./runs/smallcnn/best --input ./synthetic --output ./scores

Input (breakhis.inputs): a prefix of PNG/JPEG/TIFF tiles at any nesting, a
prepared DEST's shards, or a manifest listing URIs.

Pipeline (Ray Data, streaming): the input listing is cut into work units; the
units' member lists are the source blocks; ``decode_tiles`` reads and decodes
tiles in CPU tasks (half a CPU each: reads from S3 wait on the network, and a
resource request different from the actors' keeps Ray from fusing decoding into
the model actors); ``TilePredictor`` holds the model in an actor pool
(``ActorPoolStrategy``, one GPU per actor when the cluster has GPUs), loads it
once per actor, predicts (optionally with test-time augmentation) and computes
the attribution maps in the same actor. The driver collects each unit's rows
and writes the unit's file once every tile of it is back. Ray Data's
backpressure, under an object-store limit of ``max_buffer_mb`` for this
dataset, bounds what is in flight, so memory does not grow with the input; the
driver keeps only the input listing (a few strings per tile) and the rows of
the units in flight (small: maps, not pixels).

Exactly once, resumable. The listing is sorted, so the same input always gives
the same units: ``unit_size`` consecutive tiles, named
``unit-NNNNN-<sha256 of the member URIs, 12 hex>.parquet``. A unit's file is
written in one piece only after all its tiles are scored (temp file + rename
locally, one PUT on S3), so a reader never sees half a file and a file that
exists is complete. A rerun into the same output lists ``tiles/``, skips the
units whose file exists and scores the rest; units of an older listing (the
input changed) and temp files of a killed writer are deleted before the job
declares success. The finished output therefore has exactly one row per input
tile. (A tile rewritten in place under the same URI is not rescored: units are
named by URIs, not contents; score into a new output for that.) ``_job.json``
records the model and every option that changes the output; a rerun with
another model or such an option is refused, naming the differences. One job at
a time per output.

Output (``OUTPUT/``, local or ``s3://``):

- ``tiles/unit-*.parquet``: one row per input tile, ``tile_schema()`` (below), rows
  sorted by uri within a file; read the folder with pyarrow or pandas;
- ``patients.parquet``: one row per patient (= slide in BreakHis), when patient
  ids are known (BreakHis names), PATIENT_SCHEMA;
- ``overlays/<name>.png``: with ``--overlays``, the tile as the model saw it
  (``image_size`` px square) with its attribution map over it; ``<name>`` is the
  tile id when it is a plain file name, else a slug of it plus a hash
  (``storage.safe_name``): never a path, so no tile id writes outside OUTPUT. The
  ``overlay_uri`` column gives each tile's file;
- ``_job.json``: model and options; ``_SUCCESS``: the summary, written last.

Tile columns: ``uri``, ``tile_id`` (stable id, see breakhis.inputs),
``file_name``, ``patient_id``, ``magnification``, ``subtype``, ``label`` (the
true label from the name: 0 benign, 1 malignant; null when the name is not a
BreakHis name), ``prob_malignant`` (float32 in [0, 1], the softmax of the
malignant logit, averaged over the 8 flips/rotations with TTA),
``predicted_label`` (int8, ``prob_malignant >= threshold``),
``predicted_class`` ("benign"/"malignant"), ``model_id`` (the artifact's hash
of its weights), ``model_version`` (the artifact format version),
``attribution_method``, ``attribution_target`` (the class explained: the
predicted one), ``attribution`` (Arrow ``fixed_shape_tensor<float16, [S, S]>``,
S = ``map_size``, default 64: the map over the whole tile, row-major, top row
first, divided by its largest absolute value so it lies in [-1, 1]),
``attribution_scale`` (float32, that largest absolute value: raw map = map x
scale), ``overlay_uri`` and ``error`` (null when the tile scored; otherwise
``read: ...`` or ``decode: ...`` and every prediction column null). pandas
reads ``attribution`` as flat numpy arrays of S*S values: ``a.reshape(S, S)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis import storage
from breakhis.attribution import canonical_method
from breakhis.calibration import PATIENT_RULES
from breakhis.inputs import INPUT_SCHEMA, InputSet, discover_inputs
from breakhis.names import CLASS_NAMES

if TYPE_CHECKING:
    from breakhis.artifact import ModelCard

log = logging.getLogger(__name__)

JOB_FORMAT = 1
ATTRIBUTION_CHOICES: tuple[str, ...] = (
    "gradcam",
    "integrated_gradients",
    "ig",
    "occlusion",
    "lime",
    "none",
)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
_TTA_VIEWS = 8  # the dihedral group: 4 rotations by 90 degrees, each also flipped


def tile_schema(map_size: int) -> pa.Schema:
    """The schema of ``tiles/unit-*.parquet`` for maps of ``map_size`` x ``map_size``."""
    described = [f for f in INPUT_SCHEMA if f.name != "shard"]  # the tile, as its input
    return pa.schema(
        [
            *described,
            ("prob_malignant", pa.float32()),
            ("predicted_label", pa.int8()),
            ("predicted_class", pa.string()),
            ("model_id", pa.string()),
            ("model_version", pa.int16()),
            ("attribution_method", pa.string()),
            ("attribution_target", pa.int8()),
            ("attribution", pa.fixed_shape_tensor(pa.float16(), (map_size, map_size))),
            ("attribution_scale", pa.float32()),
            ("overlay_uri", pa.string()),
            ("error", pa.string()),
        ]
    )


PATIENT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("label", pa.int8()),  # true label from the names; null when unknown
        ("tiles", pa.int32()),  # input tiles of the patient
        ("scored", pa.int32()),
        ("errors", pa.int32()),
        ("mean_prob_malignant", pa.float32()),  # over scored tiles
        ("frac_predicted_malignant", pa.float32()),
        ("patient_call", pa.string()),  # "malignant" when mean_prob_malignant >= threshold
    ]
)
"""``patients.parquet``: one row per patient; null statistics when no tile of it scored."""


class JobMismatchError(ValueError):
    """The output already holds a job with another model or other output-changing options."""


@dataclass(frozen=True)
class ScoreConfig:
    """Options of the scoring job."""

    model: str
    """Model artifact directory (local or s3://) written by breakhis.artifact.save_artifact."""
    input: str
    """Tiles: a prefix (any nesting), a prepared DEST, or a manifest (.parquet/.csv/.txt)."""
    output: str
    """Output root (local or s3://); a rerun into it scores only what is missing."""
    attribution: str = "gradcam"
    """gradcam, integrated_gradients (ig), occlusion, lime, or none."""
    map_size: int = 64
    """Side of the stored attribution maps in cells (the whole tile: 224/64 px per cell)."""
    tta: bool = False
    """Average the probability over the 8 flips and 90-degree rotations of each tile."""
    threshold: float | None = None
    """prob_malignant at or above which a tile is called malignant; default: the threshold
    the model's training chose on its validation patients (model.json)."""
    patient_rule: str = "mean"
    """How a patient's tiles become one call: ``mean`` (mean prob_malignant >= threshold) or
    ``majority`` (at least half of the tiles called malignant)."""
    overlays: bool = False
    """Also write OUTPUT/overlays/<tile id as a safe file name>.png: the tile with its map
    (needs attribution)."""
    unit_size: int = 256
    """Tiles per work unit (per output file); the unit of resumption."""
    batch_size: int = 32
    """Tiles per model call."""
    decode_batch_size: int = 16
    """Tiles per decode call."""
    num_actors: int = 0
    """Most model actors; 0: one per GPU, or on CPUs one per ``cpus_per_actor`` CPUs less one."""
    cpus_per_actor: int = 1
    """CPUs Ray reserves per model actor."""
    torch_threads: int = 0
    """torch threads per actor on CPUs; 0: cpus_per_actor. More oversubscribes on purpose
    (e.g. one actor using every core while decode tasks share them)."""
    device: str = "auto"
    """auto (a GPU per actor when the cluster has GPUs), cpu, or cuda."""
    ig_steps: int = 32
    """Integrated-gradients steps."""
    occlusion_window: int = 0
    """Occlusion window side in pixels; 0: image side / 8."""
    lime_samples: int = 100
    """LIME perturbations per tile."""
    lime_grid: int = 8
    """LIME superpixel grid (grid x grid squares)."""
    max_buffer_mb: int = 0
    """Most object-store memory (MB) the pipeline holds at once (decoded tiles waiting for a
    model actor, results waiting for the driver): what keeps memory flat for any input.
    0: 8 batches of decoded tiles per actor, at least 256 MB."""

    def __post_init__(self) -> None:
        if self.attribution not in ATTRIBUTION_CHOICES:
            raise ValueError(
                f"--attribution {self.attribution!r}; accepted: {', '.join(ATTRIBUTION_CHOICES)}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}; accepted: {', '.join(DEVICES)}")
        positive = {
            "--map-size": self.map_size,
            "--unit-size": self.unit_size,
            "--batch-size": self.batch_size,
            "--decode-batch-size": self.decode_batch_size,
            "--cpus-per-actor": self.cpus_per_actor,
            "--lime-grid": self.lime_grid,
        }
        for option, value in positive.items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if not 1 <= self.map_size <= 1024:
            raise ValueError(f"--map-size must be in 1..1024, got {self.map_size}")
        if self.max_buffer_mb < 0:
            raise ValueError(
                f"--max-buffer-mb must be >= 0 (0: automatic), got {self.max_buffer_mb}"
            )
        if self.torch_threads < 0:
            raise ValueError(
                f"--torch-threads must be >= 0 (0: --cpus-per-actor), got {self.torch_threads}"
            )
        if self.num_actors < 0:
            raise ValueError(f"--num-actors must be >= 0 (0: automatic), got {self.num_actors}")
        if self.ig_steps < 2 or self.lime_samples < 2:
            raise ValueError("--ig-steps and --lime-samples must be >= 2")
        if self.occlusion_window < 0:
            raise ValueError(f"--occlusion-window must be >= 0, got {self.occlusion_window}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"--threshold must be in (0, 1), got {self.threshold}")
        if self.patient_rule not in PATIENT_RULES:
            raise ValueError(
                f"--patient-rule {self.patient_rule!r}; accepted: {', '.join(PATIENT_RULES)}"
            )
        if self.overlays and self.attribution == "none":
            raise ValueError("--overlays needs an attribution method (not --attribution none)")
        out, src = _normalised(self.output), _normalised(self.input)
        if out == src or out.startswith(src + "/") or src.startswith(out + "/"):
            raise ValueError(
                f"--output {self.output} and --input {self.input} overlap; "
                "write scores outside the input (its overlays would become input tiles)"
            )

    @property
    def method(self) -> str | None:
        """The canonical attribution method, or None for ``none``."""
        return None if self.attribution == "none" else canonical_method(self.attribution)

    def threshold_for(self, card: ModelCard) -> float:
        """The threshold applied: ``threshold`` when given, else the model's own."""
        return card.threshold if self.threshold is None else self.threshold

    def job_record(self, card: ModelCard) -> dict:
        """What ``_job.json`` holds: everything that changes the output rows (the
        threshold as applied: the model's own when ``threshold`` is None)."""
        method = self.method
        return {
            "format": JOB_FORMAT,
            "model": _normalised(self.model),
            "model_id": card.model_id,
            "input": _normalised(self.input),
            "image_size": card.image_size,
            "temperature": card.temperature,
            "attribution": method,
            "map_size": self.map_size,
            "tta": self.tta,
            "threshold": self.threshold_for(card),
            "patient_rule": self.patient_rule,
            "overlays": self.overlays,
            "unit_size": self.unit_size,
            "ig_steps": self.ig_steps if method == "integrated_gradients" else None,
            "occlusion_window": self.occlusion_window if method == "occlusion" else None,
            "lime_samples": self.lime_samples if method == "lime" else None,
            "lime_grid": self.lime_grid if method == "lime" else None,
        }


def _normalised(uri: str) -> str:
    """A URI spelled one way: local paths absolute, no trailing slash."""
    uri = uri.rstrip("/")
    return uri if storage.is_s3(uri) else storage.resolve(uri)[1]


@dataclass(frozen=True)
class Unit:
    """One work unit: consecutive tiles of the sorted listing, written as one file."""

    index: int
    members: pa.Table  # inputs.INPUT_SCHEMA rows, sorted by uri

    @property
    def name(self) -> str:
        digest = hashlib.sha256()
        for uri in self.members.column("uri").to_pylist():
            digest.update(uri.encode())
            digest.update(b"\n")
        return f"unit-{self.index:05d}-{digest.hexdigest()[:12]}.parquet"


def plan_units(inputs: pa.Table, unit_size: int) -> list[Unit]:
    """Cut the (uri-sorted) listing into units of ``unit_size`` tiles, the last one shorter."""
    table = inputs.sort_by("uri")
    return [
        Unit(i, table.slice(start, unit_size))
        for i, start in enumerate(range(0, table.num_rows, unit_size))
    ]


@dataclass(frozen=True)
class ScoreSummary:
    """What a scoring run produced (the whole output, not only this run's part)."""

    output: str
    model_id: str
    attribution: str | None
    tiles: int
    scored: int
    errors: int
    units: int
    units_written: int
    units_skipped: int
    stale_deleted: int
    patients: int
    seconds: float

    @property
    def tiles_per_second(self) -> float:
        """Tiles scored by this run per second of its wall time."""
        written = self.tiles if self.units == 0 else self.tiles * self.units_written / self.units
        return written / self.seconds if self.seconds > 0 else math.nan

    def format_table(self) -> str:
        """A plain-text summary for the terminal."""
        return "\n".join(
            [
                f"scored {self.tiles} tiles into {self.output} (model {self.model_id}, "
                f"attribution {self.attribution or 'none'})",
                f"  scored: {self.scored}   errors: {self.errors}   patients: {self.patients}",
                f"  units: {self.units} ({self.units_written} written this run, "
                f"{self.units_skipped} already complete, {self.stale_deleted} stale deleted)",
                f"  time: {self.seconds:.1f} s",
            ]
        )


# --------------------------------------------------------------------------- decoding (CPU tasks)


def decode_tiles(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """Read and decode one batch of tiles (a Ray Data map_batches function).

    ``batch`` columns: uri, tile_id, unit, shard (null: read ``uri``). Returns
    uri, tile_id, unit, ``image`` (N, S, S, 3 uint8; zeros for a bad tile) and
    ``error`` ("" when decoded, else ``read: ...``/``decode: ...``). Never
    raises for a bad tile.
    """
    from breakhis.imaging import decode_rgb

    uris = [str(u) for u in batch["uri"]]
    data = _read_tile_bytes(uris, list(batch["shard"]))
    images = np.zeros((len(uris), image_size, image_size, 3), dtype=np.uint8)
    errors = []
    for i, uri in enumerate(uris):
        value = data[uri]
        if isinstance(value, str):
            errors.append(value)
            continue
        try:
            images[i] = decode_rgb(value, image_size)
        except ValueError as err:
            errors.append(f"decode: {err}")
            continue
        errors.append("")
    return {
        "uri": np.asarray(uris, dtype=object),
        "tile_id": batch["tile_id"],
        "unit": batch["unit"],
        "image": images,
        "error": np.asarray(errors, dtype=object),
    }


def _read_tile_bytes(uris: list[str], shards: list) -> dict[str, bytes | str]:
    """uri -> bytes, or -> the read error's text."""
    out: dict[str, bytes | str] = {}
    by_shard: dict[str, list[str]] = defaultdict(list)
    for uri, shard in zip(uris, shards, strict=True):
        if shard:
            by_shard[str(shard)].append(uri)
            continue
        try:
            out[uri] = storage.read_bytes(uri)
        except OSError as err:  # FileNotFoundError, permissions, network
            out[uri] = f"read: {err}"
    for shard, members in by_shard.items():
        fs, path = storage.resolve(shard)
        try:
            # Row-group statistics on the sorted uri column let the reader skip most of the shard.
            table = pq.read_table(
                path, filesystem=fs, columns=["uri", "png"], filters=[("uri", "in", members)]
            )
            found = dict(
                zip(table.column("uri").to_pylist(), table.column("png").to_pylist(), strict=True)
            )
        except (OSError, pa.ArrowInvalid) as err:
            found, problem = {}, f"read: {shard}: {err}"
        else:
            problem = f"read: not in shard {shard}"
        for uri in members:
            out[uri] = found.get(uri, problem)
    return out


# --------------------------------------------------------------------------- the model (actors)


class TilePredictor:
    """Ray Data callable class: the model, loaded once per actor, over batches of tiles.

    Returns per tile: uri, unit, ``prob`` (float32, NaN for a bad tile; the softmax
    of the logits over the model's temperature), ``prob_uncalibrated`` (at temperature 1),
    ``target`` (int8 class explained, -1 without a map), ``map`` (S x S
    float16 in [-1, 1]), ``scale`` (float32 largest |value| of the raw map,
    NaN without a map), ``overlay`` (URI or "") and ``error``.
    """

    def __init__(
        self,
        *,
        model_uri: str,
        method: str | None,
        map_size: int,
        tta: bool,
        threshold: float,
        device: str,
        torch_threads: int,
        overlay_root: str | None,
        ig_steps: int,
        occlusion_window: int,
        lime_samples: int,
        lime_grid: int,
    ) -> None:
        import torch

        from breakhis.artifact import load_artifact
        from breakhis.model import last_conv_layer

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: this actor sees no CUDA device")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.model, card = load_artifact(model_uri, device=self.device)
        for param in self.model.parameters():
            param.requires_grad_(False)  # attributions need input gradients only
        self.layer = last_conv_layer(self.model, card.architecture)
        self.mean = torch.tensor(card.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(card.std, device=self.device).view(1, 3, 1, 1)
        self.malignant = list(card.class_names).index("malignant")
        self.temperature = float(card.temperature)
        self.method = method
        self.map_size = map_size
        self.tta = tta
        self.threshold = threshold
        self.overlay_root = overlay_root
        self.options = {
            "ig_steps": ig_steps,
            "occlusion_window": occlusion_window or None,
            "lime_samples": lime_samples,
            "lime_grid": lime_grid,
        }

    def _inputs(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def _probabilities(self, x):
        """``(calibrated, raw)`` malignancy probabilities: the softmax of the logits
        divided by the model's temperature, and at temperature 1 (each averaged over
        the TTA views)."""
        import torch

        views = _TTA_VIEWS if self.tta else 1
        calibrated = torch.zeros(x.shape[0], device=x.device)
        raw = torch.zeros(x.shape[0], device=x.device)
        with torch.inference_mode():
            for view in range(views):
                turned = torch.rot90(x, view % 4, dims=(2, 3)) if view % 4 else x
                if view >= 4:
                    turned = torch.flip(turned, dims=(3,))
                logits = self.model(turned).float()
                calibrated += torch.softmax(logits / self.temperature, dim=1)[:, self.malignant]
                raw += torch.softmax(logits, dim=1)[:, self.malignant]
        return calibrated / views, raw / views

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from breakhis.attribution import attribute

        errors = np.asarray(batch["error"], dtype=object)
        ok = np.flatnonzero(errors == "")
        count = len(errors)
        prob = np.full(count, np.nan, dtype=np.float32)
        prob_raw = np.full(count, np.nan, dtype=np.float32)
        target = np.full(count, -1, dtype=np.int8)
        maps = np.zeros((count, self.map_size, self.map_size), dtype=np.float16)
        scale = np.full(count, np.nan, dtype=np.float32)
        overlays = np.full(count, "", dtype=object)
        if len(ok):
            images = np.ascontiguousarray(batch["image"][ok])
            x = self._inputs(images)
            calibrated, raw_prob = self._probabilities(x)
            p = calibrated.cpu().numpy()
            prob[ok] = p
            prob_raw[ok] = raw_prob.cpu().numpy()
            if self.method is not None:
                predicted = (p >= self.threshold).astype(np.int64)
                explained = [self.malignant if c else 1 - self.malignant for c in predicted]
                raw = attribute(
                    self.model,
                    x,
                    self.method,
                    explained,
                    layer=self.layer,
                    map_size=self.map_size,
                    **self.options,
                ).numpy()
                peak = np.abs(raw).reshape(len(ok), -1).max(axis=1)
                maps[ok] = (raw / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float16)
                scale[ok] = peak
                target[ok] = explained
                if self.overlay_root is not None:
                    overlays[ok] = self._write_overlays(batch["tile_id"][ok], images, raw)
        return {
            "uri": batch["uri"],
            "unit": batch["unit"],
            "prob": prob,
            "prob_uncalibrated": prob_raw,
            "target": target,
            "map": maps,
            "scale": scale,
            "overlay": overlays,
            "error": errors,
        }

    def _write_overlays(self, tile_ids, images: np.ndarray, raw: np.ndarray) -> list[str]:
        from breakhis.attribution import overlay_png

        uris = []
        for tile_id, image, attribution_map in zip(tile_ids, images, raw, strict=True):
            # A name, never a path: a tile id comes from the input ("../x" or "/x" in a
            # crafted shard would otherwise write outside the output).
            uri = storage.join(self.overlay_root, f"{storage.safe_name(str(tile_id))}.png")
            storage.write_bytes(uri, overlay_png(image, attribution_map))
            uris.append(uri)
        return uris


# --------------------------------------------------------------------------- the job (driver)


def run_scoring(config: ScoreConfig) -> ScoreSummary:
    """Score every input tile into ``config.output`` on the current Ray cluster
    (started locally if none); a rerun scores only the units still missing.

    Everything that can be checked on the driver is, before the output is claimed and
    before Ray starts: the model (card, weights hash and load), the input and the output.
    Returns a ScoreSummary of the whole output. Raises FileNotFoundError for a
    missing model or input, ValueError for a damaged model, an input without tiles or
    a bad manifest, JobMismatchError (a ValueError) when the output holds a job with
    another model or options, and RuntimeError when a unit comes back
    incomplete (a bug, never silently written).
    """
    from breakhis.artifact import load_artifact

    started = time.perf_counter()
    # Loaded once here so that a damaged artifact fails in one line, not in every actor.
    _, card = load_artifact(config.model)
    if "malignant" not in card.class_names:
        raise ValueError(f"{config.model}: class_names {card.class_names} lack 'malignant'")
    inputs = discover_inputs(config.input)
    record = config.job_record(card)
    log.info(
        "threshold %.4f (%s), temperature %.4f",
        config.threshold_for(card),
        "--threshold" if config.threshold is not None else "the model's",
        card.temperature,
    )
    # The threshold as applied from here on (the model's own unless one was given).
    config = replace(config, threshold=config.threshold_for(card))
    _claim_output(config.output, record)

    units = plan_units(inputs.table, config.unit_size)
    tiles_uri = storage.join(config.output, "tiles")
    existing = _listing(tiles_uri)
    pending = [u for u in units if u.name not in existing]
    log.info(
        "%d tiles in %d units: %d already complete, %d to score",
        inputs.num_tiles,
        len(units),
        len(units) - len(pending),
        len(pending),
    )
    wanted = {u.name for u in units}
    stale = sorted(n for n in existing if n not in wanted)
    if pending or stale:
        storage.delete(storage.join(config.output, "_SUCCESS"))
    if pending:
        storage.make_dirs(tiles_uri)
        _score_units(config, card, pending, tiles_uri)
    for name in stale:
        storage.delete(storage.join(tiles_uri, name))
    if stale:
        log.info("deleted %d unit file(s) of an older listing of the input", len(stale))

    counts, patients = _summarise(config, tiles_uri, units, inputs)
    summary = ScoreSummary(
        output=config.output,
        model_id=card.model_id,
        attribution=config.method,
        tiles=inputs.num_tiles,
        scored=counts["scored"],
        errors=counts["errors"],
        units=len(units),
        units_written=len(pending),
        units_skipped=len(units) - len(pending),
        stale_deleted=len(stale),
        patients=patients,
        seconds=time.perf_counter() - started,
    )
    done = {"job": record, "summary": asdict(summary)}
    storage.write_bytes(
        storage.join(config.output, "_SUCCESS"), json.dumps(done, indent=2).encode()
    )
    return summary


def _claim_output(output: str, record: dict) -> None:
    """Write ``_job.json``, or check that the one there describes the same job."""
    uri = storage.join(output, "_job.json")
    if storage.exists(uri):
        try:
            previous = json.loads(storage.read_bytes(uri))
        except json.JSONDecodeError as err:
            raise JobMismatchError(
                f"{uri}: not valid JSON ({err}); delete it or pick another --output"
            ) from err
        differences = [
            f"{key}: {previous.get(key)!r} there, {record.get(key)!r} now"
            for key in sorted(set(previous) | set(record))
            if previous.get(key) != record.get(key)
        ]
        if differences:
            raise JobMismatchError(
                f"{output} holds the output of another scoring job ("
                + "; ".join(differences)
                + "). Rerun with the same model and options to finish it, or pick another "
                "--output (or delete that output first)"
            )
        return
    storage.write_bytes(uri, json.dumps(record, indent=2, sort_keys=True).encode())


def _listing(folder: str) -> set[str]:
    """Names of the complete unit files in ``folder`` (temp files of a killed writer removed)."""
    if not storage.exists(folder):
        return set()
    names = set()
    for entry in storage.walk(folder):
        name = entry.uri.rsplit("/", 1)[-1]
        if name.startswith(".unit-") and name.endswith(".tmp"):
            storage.delete(entry.uri)  # left by a writer killed between write and rename
        elif name.startswith("unit-") and name.endswith(".parquet"):
            names.add(name)
    return names


def actor_plan(device: str, num_actors: int, cpus_per_actor: int) -> tuple[int, float, str]:
    """(most actors, GPUs per actor, device) of a model actor pool on the current cluster.

    ``device`` is ``auto``, ``cpu`` or ``cuda``; ``num_actors`` 0 sizes the pool from the
    cluster: one actor per GPU, or on CPUs as many as fit while one CPU stays free for the
    decode tasks (the actors would starve them otherwise). Raises ValueError for ``cuda`` on a
    cluster without GPUs.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" or (device == "auto" and gpus > 0):
        if gpus == 0:
            raise ValueError("--device cuda: the Ray cluster has no GPU")
        return num_actors or gpus, 1.0, "cuda"
    cpus = int(resources.get("CPU", 1))
    return num_actors or max(1, (cpus - 1) // cpus_per_actor), 0.0, "cpu"


def _score_units(config: ScoreConfig, card, pending: list[Unit], tiles_uri: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    max_actors, gpus_per_actor, device = actor_plan(
        config.device, config.num_actors, config.cpus_per_actor
    )
    blocks = [
        unit.members.select(["uri", "tile_id", "shard"]).append_column(
            "unit", pa.array([unit.index] * unit.members.num_rows, pa.int32())
        )
        for unit in pending
    ]
    log.info("scoring %d units with up to %d %s actor(s)", len(pending), max_actors, device.upper())
    tile_bytes = card.image_size * card.image_size * 3
    buffer = config.max_buffer_mb * 2**20 or max(
        256 * 2**20, 8 * max_actors * config.batch_size * tile_bytes
    )
    ds = ray.data.from_arrow(blocks)
    # A per-dataset copy of the context: the limit does not leak into the caller's datasets.
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=buffer
    )
    ds = ds.map_batches(
        decode_tiles,
        fn_kwargs={"image_size": card.image_size},
        batch_size=config.decode_batch_size,
        batch_format="numpy",
        num_cpus=0.5,
    )
    ds = ds.map_batches(
        TilePredictor,
        fn_constructor_kwargs={
            "model_uri": config.model,
            "method": config.method,
            "map_size": config.map_size,
            "tta": config.tta,
            "threshold": config.threshold,
            "device": device,
            "torch_threads": config.torch_threads or config.cpus_per_actor,
            "overlay_root": storage.join(config.output, "overlays") if config.overlays else None,
            "ig_steps": config.ig_steps,
            "occlusion_window": config.occlusion_window,
            "lime_samples": config.lime_samples,
            "lime_grid": config.lime_grid,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=gpus_per_actor,
        batch_size=config.batch_size,
        batch_format="numpy",
    )
    by_index = {u.index: u for u in pending}
    waiting: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    written: set[int] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index in np.unique(batch["unit"]):
            rows = batch["unit"] == index
            part = {k: v[rows] for k, v in batch.items()}
            index = int(index)
            waiting[index].append(part)
            received[index] += int(rows.sum())
            unit = by_index[index]
            if received[index] == unit.members.num_rows:
                table = _unit_table(config, card, unit, waiting.pop(index))
                storage.write_bytes(storage.join(tiles_uri, unit.name), _parquet_bytes(table))
                written.add(index)
                log.debug("wrote %s (%d/%d)", unit.name, len(written), len(pending))
    if len(written) != len(pending):
        missing = sorted(by_index[i].name for i in by_index if i not in written)
        raise RuntimeError(
            f"{len(missing)} unit(s) came back incomplete from Ray Data "
            f"(e.g. {missing[:3]}); nothing of them was written, rerun to score them"
        )


def _unit_table(config: ScoreConfig, card, unit: Unit, parts: list[dict]) -> pa.Table:
    """One unit's rows: the members' facts joined with their scores, sorted by uri."""
    scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(scores["uri"].astype(str), kind="stable")
    scores = {k: v[order] for k, v in scores.items()}
    members = unit.members  # sorted by uri already
    if scores["uri"].tolist() != members.column("uri").to_pylist():
        raise RuntimeError(f"{unit.name}: scored tiles differ from the unit's members")
    error = scores["error"].astype(str)
    bad = error != ""
    prob = scores["prob"].astype(np.float32)
    predicted = (prob >= config.threshold).astype(np.int8)
    has_map = (scores["target"] >= 0) & ~bad
    schema = tile_schema(config.map_size)
    count = members.num_rows
    flat = pa.array(scores["map"].reshape(-1), pa.float16())
    storage_array = pa.FixedSizeListArray.from_arrays(
        flat, config.map_size * config.map_size, mask=pa.array(~has_map)
    )
    columns = {
        **{
            name: members.column(name)
            for name in (
                "uri",
                "tile_id",
                "file_name",
                "patient_id",
                "magnification",
                "subtype",
                "label",
            )
        },
        "prob_malignant": pa.array(prob, pa.float32(), mask=bad),
        "predicted_label": pa.array(predicted, pa.int8(), mask=bad),
        "predicted_class": pa.array([CLASS_NAMES[c] for c in predicted], pa.string(), mask=bad),
        "model_id": pa.array([card.model_id] * count, pa.string()),
        "model_version": pa.array([card.version] * count, pa.int16()),
        "attribution_method": pa.array([config.method] * count, pa.string(), mask=~has_map),
        "attribution_target": pa.array(scores["target"], pa.int8(), mask=~has_map),
        "attribution": pa.ExtensionArray.from_storage(
            schema.field("attribution").type, storage_array
        ),
        "attribution_scale": pa.array(scores["scale"], pa.float32(), mask=~has_map),
        "overlay_uri": pa.array(
            scores["overlay"].astype(str), pa.string(), mask=scores["overlay"] == ""
        ),
        "error": pa.array(error, pa.string(), mask=~bad),
    }
    metadata = {
        "breakhis.score": json.dumps(
            {
                "model": config.model,
                "model_id": card.model_id,
                "attribution": {
                    "method": config.method,
                    "shape": [config.map_size, config.map_size],
                    "dtype": "float16",
                    "covers": "the whole tile, row-major, top row first",
                    "values": "map / attribution_scale, in [-1, 1]",
                },
                "tta": config.tta,
                "threshold": config.threshold,
                "image_size": card.image_size,
            }
        )
    }
    return pa.table(columns, schema=schema.with_metadata(metadata))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _summarise(
    config: ScoreConfig, tiles_uri: str, units: list[Unit], inputs: InputSet
) -> tuple[dict[str, int], int]:
    """Check the output against the plan, write ``patients.parquet``; return counts."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.resolve(tiles_uri)
    files = [f"{path}/{u.name}" for u in units]
    columns = ["uri", "patient_id", "label", "prob_malignant", "predicted_label", "error"]
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)
    if table.num_rows != inputs.num_tiles or pc.count_distinct(table["uri"]).as_py() != (
        inputs.num_tiles
    ):
        raise RuntimeError(
            f"{tiles_uri}: {table.num_rows} rows for {inputs.num_tiles} input tiles; "
            "the output is inconsistent (was it written by two jobs at once?)"
        )
    scored = table["error"].null_count  # error is null exactly when the tile scored
    counts = {"scored": scored, "errors": table.num_rows - scored}
    patients_uri = storage.join(config.output, "patients.parquet")
    known = table.filter(pc.is_valid(table["patient_id"]))
    if known.num_rows == 0:
        storage.delete(patients_uri)
        return counts, 0
    patients = patient_table(known, config.threshold, config.patient_rule)
    storage.write_bytes(patients_uri, _parquet_bytes(patients))
    return counts, patients.num_rows


def patient_table(tiles: pa.Table, threshold: float, rule: str = "mean") -> pa.Table:
    """Per-patient summary (PATIENT_SCHEMA, sorted by patient_id) of tile rows.

    ``tiles`` needs patient_id, label, prob_malignant, predicted_label and
    error. The patient call follows ``rule`` (breakhis.calibration.PATIENT_RULES):
    ``mean``, malignant when the mean probability of the patient's scored tiles
    is at least ``threshold``; ``majority``, when at least half of them are
    called malignant. The label is the true label when all the patient's names
    agree, else null.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, patient in enumerate(tiles.column("patient_id").to_pylist()):
        groups[patient].append(i)
    labels = tiles.column("label").to_pylist()
    probs = tiles.column("prob_malignant").to_pylist()
    predicted = tiles.column("predicted_label").to_pylist()
    errors = tiles.column("error").to_pylist()
    rows = []
    for patient in sorted(groups):
        members = groups[patient]
        scored = [i for i in members if errors[i] is None]
        known_labels = {labels[i] for i in members if labels[i] is not None}
        mean = float(np.mean([probs[i] for i in scored])) if scored else None
        share = float(np.mean([predicted[i] for i in scored])) if scored else None
        if mean is None:
            call = None
        else:
            call = CLASS_NAMES[int(mean >= threshold if rule == "mean" else share >= 0.5)]
        rows.append(
            {
                "patient_id": patient,
                "label": known_labels.pop() if len(known_labels) == 1 else None,
                "tiles": len(members),
                "scored": len(scored),
                "errors": len(members) - len(scored),
                "mean_prob_malignant": mean,
                "frac_predicted_malignant": share,
                "patient_call": call,
            }
        )
    return pa.Table.from_pylist(rows, schema=PATIENT_SCHEMA)
