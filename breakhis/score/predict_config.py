"""PredictOptions: how a model runs over tiles, the options ``breakhis score`` and
``breakhis evaluate`` share (breakhis.score.predict runs them). No torch or Ray here: the
commands' ``--help`` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

ATTRIBUTION_CHOICES: tuple[str, ...] = (
    "gradcam",
    "integrated_gradients",
    "ig",
    "occlusion",
    "lime",
    "none",
)
"""Accepted values of --attribution (``ig`` is integrated_gradients)."""
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""Accepted values of --device."""
CONCURRENT_ATTRIBUTIONS: tuple[str, ...] = ("none", "gradcam")
"""The attributions whose model calls may run in parallel threads on one model (calls_per_actor):
Grad-CAM's hook records the calling thread's pass only."""


@dataclass(frozen=True)
class PredictOptions:
    """How a model runs over tiles (nested in ScoreConfig and EvaluateOptions)."""

    attribution: str = field(default="gradcam", metadata={"choices": ATTRIBUTION_CHOICES})
    """Attribution map per tile: gradcam, integrated_gradients (ig), occlusion, lime, or
    none."""
    map_size: int = 64
    """Side of the attribution maps in cells (the whole tile: 224/64 px per cell)."""
    tta: bool = False
    """Average the probability over the 8 flips and 90-degree rotations of each tile."""
    threshold: float | None = None
    """Probability of malignancy at or above which a tile is called malignant; default: the
    threshold the model's training chose on its validation patients (model.json)."""
    batch_size: int = 32
    """Tiles per model call."""
    decode_batch_size: int = 16
    """Tiles per decode call."""
    num_actors: int = 0
    """Most model actors; 0: one per GPU, or on CPUs one per ``cpus_per_actor`` CPUs less one."""
    cpus_per_actor: int = 1
    """CPUs Ray reserves per model actor."""
    calls_per_actor: int = 1
    """Model calls in flight per actor, each in its own thread (Ray Data's
    ``max_concurrent_calls_per_actor``): on a GPU, 2 overlaps one batch's host side and copy
    with another's forward pass. Above 1 only with ``--attribution none`` or ``gradcam``
    (captum's other methods are not safe in parallel on one model)."""
    torch_threads: int = 0
    """torch threads per actor on CPUs; 0: cpus_per_actor. More oversubscribes on purpose
    (e.g. one actor using every core while decode tasks share them)."""
    device: str = field(default="auto", metadata={"choices": DEVICES})
    """auto (a GPU per actor when the cluster has GPUs), cpu, or cuda."""
    amp: bool = True
    """On CUDA: bf16 autocast and channels_last (as training); probabilities and maps are
    computed in bf16, then reported in float32. No effect on CPUs."""
    ig_steps: int = 32
    """Integrated-gradients steps."""
    occlusion_window: int = 0
    """Occlusion window side in pixels; 0: image side / 8."""
    lime_samples: int = 100
    """LIME perturbations per tile."""
    lime_grid: int = 8
    """LIME superpixel grid (grid x grid squares)."""
    max_tile_mb: int = 64
    """Largest tile file read, in MiB: a larger one becomes an error row naming its size,
    without being read (a poison object must not exhaust a worker's memory)."""

    def __post_init__(self) -> None:
        if self.attribution not in ATTRIBUTION_CHOICES:
            raise ValueError(
                f"--attribution {self.attribution!r}; accepted: {', '.join(ATTRIBUTION_CHOICES)}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}; accepted: {', '.join(DEVICES)}")
        positive = {
            "--map-size": self.map_size,
            "--batch-size": self.batch_size,
            "--decode-batch-size": self.decode_batch_size,
            "--cpus-per-actor": self.cpus_per_actor,
            "--lime-grid": self.lime_grid,
            "--max-tile-mb": self.max_tile_mb,
        }
        for option, value in positive.items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if not 1 <= self.map_size <= 1024:
            raise ValueError(f"--map-size must be in 1..1024, got {self.map_size}")
        if self.torch_threads < 0:
            raise ValueError(
                f"--torch-threads must be >= 0 (0: --cpus-per-actor), got {self.torch_threads}"
            )
        if not (isinstance(self.calls_per_actor, int) and self.calls_per_actor >= 1):
            raise ValueError(
                f"--calls-per-actor must be an integer >= 1, got {self.calls_per_actor!r}"
            )
        if self.calls_per_actor > 1 and self.attribution not in CONCURRENT_ATTRIBUTIONS:
            raise ValueError(
                f"--calls-per-actor {self.calls_per_actor} with --attribution {self.attribution}: "
                f"calls in parallel on one model take --attribution "
                f"{' or '.join(CONCURRENT_ATTRIBUTIONS)}; use --calls-per-actor 1"
            )
        if self.num_actors < 0:
            raise ValueError(f"--num-actors must be >= 0 (0: automatic), got {self.num_actors}")
        if self.ig_steps < 2 or self.lime_samples < 2:
            raise ValueError("--ig-steps and --lime-samples must be >= 2")
        if self.occlusion_window < 0:
            raise ValueError(f"--occlusion-window must be >= 0, got {self.occlusion_window}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"--threshold must be in (0, 1), got {self.threshold}")

    @property
    def method(self) -> str | None:
        """The canonical attribution method, or None for ``none``."""
        if self.attribution == "none":
            return None
        from breakhis.score.attribution import canonical_method  # torch: not for --help

        return canonical_method(self.attribution)

    @property
    def max_tile_bytes(self) -> int:
        """``max_tile_mb`` in bytes."""
        return self.max_tile_mb * 2**20
