"""ScoreConfig: the options of ``breakhis score`` (breakhis.score.job runs it). No torch, Ray
or Parquet here: the command's ``--help`` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from breakhis import storage
from breakhis.names import CLASS_NAMES
from breakhis.score.predict_config import PredictOptions
from breakhis.stats.calibration import PATIENT_RULES
from breakhis.subtypes import TASKS

if TYPE_CHECKING:
    from breakhis.model.artifact import ModelCard

UNIT_MB = 32
"""Decoded bytes (model input and maps) of an automatic work unit, in MB."""
UNIT_MIN, UNIT_MAX = 256, 8192
"""Bounds of an automatic unit size, in tiles."""
JOB_FORMAT = 3  # 2: attribution as fixed_size_list<float32>; 3: predictions/ + attributions/


@dataclass(frozen=True)
class ScoreConfig:
    """Options of the scoring job."""

    model: str
    """Model artifact directory (local or s3://) written by breakhis.model.artifact.save_artifact."""
    input: str
    """Tiles: a prefix (any nesting), a prepared DEST, or a manifest (.parquet/.csv/.txt)."""
    out: str = field(metadata={"aliases": ("output",)})
    """Output root (local or s3://); a rerun into it scores only what is missing."""
    predict: PredictOptions = field(default_factory=PredictOptions)
    """How the model runs over the tiles (breakhis.score.predict)."""
    patient_rule: str = field(default="mean", metadata={"choices": PATIENT_RULES})
    """How a patient's tiles become one call: ``mean`` (mean prob_malignant >= threshold) or
    ``majority`` (at least half of the tiles called malignant)."""
    overlays: bool = False
    """Also write OUT/overlays/<tile id as a safe file name>.png: the tile with its map
    (needs attribution)."""
    unit_size: int = 0
    """Tiles per work unit (per journal file, before compaction); the unit of resumption.
    0: automatic, as many tiles as UNIT_MB MB of decoded model input (and maps) hold,
    between 256 and 8,192 (256 at 224 px; a unit's fixed costs, a task, a plan read and a
    file, then weigh little per tile even for tiny tiles)."""
    file_rows: int = 250_000
    """Rows per file of ``predictions/`` (the last one smaller): 4 files a million tiles.
    The files are written at the end from the units' journal (breakhis.score.tables)."""
    map_file_mb: int = 128
    """Map bytes per file of ``attributions/``, in MB (uncompressed float32 maps)."""
    features: bool = False
    """Also write ``features/``: one embedding per scored tile (``tile_id``, ``embedding``:
    float32, the input of the model's classification head, from the same forward pass as
    the probabilities), e.g. to cluster tiles or fit a linear probe on a foundation model's
    features. With ``--attribution none`` the job is a feature extractor."""
    feature_file_mb: int = 128
    """Embedding bytes per file of ``features/``, in MB (uncompressed float32)."""
    max_buffer_mb: int = 0
    """Most object-store memory (MB) the pipeline holds at once (decoded units waiting for
    a model actor): what keeps memory flat for any input. 0: two units of decoded tiles
    per actor, at least 256 MB."""
    progress_interval_s: float = 10.0
    """Seconds between two progress lines (tiles done / total, tiles/s, ETA)."""
    task: str | None = field(default=None, metadata={"choices": TASKS})
    """``binary``: the benign/malignant columns only; ``subtype``: also ``prob_<subtype>``
    for each of the eight subtypes and ``predicted_subtype`` (needs a model trained with
    ``--task subtype``); default (none): the model's own task. A subtype model's
    prob_malignant is the sum of its four malignant classes' probabilities."""

    def __post_init__(self) -> None:
        if not (isinstance(self.unit_size, int) and self.unit_size >= 0):
            raise ValueError(
                f"--unit-size must be an integer >= 0 (0: automatic), got {self.unit_size!r}"
            )
        for option, value in (
            ("--file-rows", self.file_rows),
            ("--map-file-mb", self.map_file_mb),
            ("--feature-file-mb", self.feature_file_mb),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if not self.progress_interval_s > 0:
            raise ValueError(f"--progress-interval-s must be > 0, got {self.progress_interval_s}")
        if self.max_buffer_mb < 0:
            raise ValueError(
                f"--max-buffer-mb must be >= 0 (0: automatic), got {self.max_buffer_mb}"
            )
        if self.patient_rule not in PATIENT_RULES:
            raise ValueError(
                f"--patient-rule {self.patient_rule!r}; accepted: {', '.join(PATIENT_RULES)}"
            )
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} unknown; accepted: {', '.join(TASKS)}")
        if self.overlays and self.predict.method is None:
            raise ValueError("--overlays needs an attribution method (not --attribution none)")
        # Compared as places, symlinks resolved, as prepare compares SRC and DEST.
        out, src = storage.location(self.out), storage.location(self.input)
        if out[: len(src)] == src or src[: len(out)] == out:
            raise ValueError(
                f"--out {self.out} and --input {self.input} overlap; "
                "write scores outside the input (its overlays would become input tiles)"
            )
        blocker = storage.file_in_the_way(self.out)
        if blocker is not None:
            raise ValueError(
                f"--out {self.out}: {blocker} is a file; give a folder (or an s3:// "
                "prefix) for the scores"
            )

    def unit_size_for(self, card: ModelCard) -> int:
        """The tiles per unit applied: ``unit_size`` when given, else as many as UNIT_MB MB
        of the model's decoded input (and of the maps, with a method) hold, in 256..8192."""
        if self.unit_size:
            return self.unit_size
        height, width = card.tile_geometry.eval_hw
        per_tile = height * width * 3 + (4 * self.predict.map_size**2 if self.predict.method else 0)
        return int(min(UNIT_MAX, max(UNIT_MIN, UNIT_MB * 2**20 // per_tile)))

    def threshold_for(self, card: ModelCard) -> float:
        """The threshold applied: ``predict.threshold`` when given, else the model's own."""
        threshold = self.predict.threshold
        return card.threshold if threshold is None else threshold

    def task_for(self, card: ModelCard) -> str:
        """The task scored: ``task`` when given, else the model's. Raises ValueError for
        ``subtype`` with a binary model."""
        if self.task == "subtype" and card.task != "subtype":
            raise ValueError(
                f"--task subtype: {self.model} is a {card.task} model (classes "
                f"{', '.join(card.class_names)}); train one with --task subtype"
            )
        return self.task or card.task

    def class_names_for(self, card: ModelCard) -> tuple[str, ...]:
        """The classes of the predictions' ``prob_<class>`` columns: the model's eight for the
        subtype task, else benign and malignant (a subtype model scored as binary: its sums)."""
        return tuple(card.class_names) if self.task_for(card) == "subtype" else CLASS_NAMES

    def job_record(self, card: ModelCard) -> dict:
        """What ``_job.json`` holds: everything that changes the output rows (the
        threshold as applied: the model's own when ``threshold`` is None)."""
        method, predict = self.predict.method, self.predict
        return {
            "format": JOB_FORMAT,
            "model": _normalised(self.model),
            "model_id": card.model_id,
            "input": _normalised(self.input),
            "image_size": card.image_size,
            "temperature": card.temperature,
            "attribution": method,
            "map_size": predict.map_size,
            "tta": predict.tta,
            "amp": predict.amp,  # bf16 on GPUs changes probabilities in the 3rd digit
            "threshold": self.threshold_for(card),
            "patient_rule": self.patient_rule,
            "overlays": self.overlays,
            "unit_size": self.unit_size_for(card),
            "ig_steps": predict.ig_steps if method == "integrated_gradients" else None,
            "occlusion_window": predict.occlusion_window if method == "occlusion" else None,
            "lime_samples": predict.lime_samples if method == "lime" else None,
            "lime_grid": predict.lime_grid if method == "lime" else None,
            # Only for subtype rows: a binary job's record (and its reruns) stays as it was.
            **({"task": "subtype"} if self.task_for(card) == "subtype" else {}),
            **({"features": True} if self.features else {}),
        }


def _normalised(uri: str) -> str:
    """A URI spelled one way: local paths absolute, no trailing slash."""
    uri = uri.rstrip("/")
    return uri if storage.is_s3(uri) else storage.resolve(uri)[1]
