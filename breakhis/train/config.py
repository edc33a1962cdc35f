"""The options of a training run: TrainConfig (one shape for a single run and a Ray Tune
trial, validated when built, turned into a plain dict only at the Ray boundary) and the
names of what a run writes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from breakhis import storage
from breakhis.data.geometry import EVAL_VIEWS, GEOMETRIES, check_geometry
from breakhis.data.split_spec import SplitSpec
from breakhis.data.stain import STAIN_METHODS, check_stain
from breakhis.model.architectures import ARCH_CHOICES, check_arch, is_timm
from breakhis.names import MAGNIFICATIONS
from breakhis.stats.calibration import THRESHOLD_RULES
from breakhis.stats.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from breakhis.subtypes import SUBTYPE_HIGHER_IS_BETTER, SUBTYPE_METRIC_NAMES, TASKS
from breakhis.train import tracking

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
DECISION_RULES: tuple[str, ...] = ("argmax", *THRESHOLD_RULES)
"""Accepted values of --threshold-rule: ``argmax`` (threshold 0.5, temperature 1), or a
rule that fits both on the validation patients (when they are enough: see
breakhis.train.epoch.fit_decision)."""
VAL_METRICS: tuple[str, ...] = tuple(
    f"val_{name}" for name in (*METRIC_NAMES, *SUBTYPE_METRIC_NAMES)
)

MODEL_EPOCH_RULES: tuple[str, ...] = ("last", "best")
"""Accepted values of --model-epoch."""
"""Metrics accepted for ``TrainConfig.metric`` (checkpoint ranking and early stopping)."""
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_CONFIG_FILE = "train_config.json"
ARTIFACT_DIR = "model"
VALIDATED_DIR = "validated-model"
"""With --refit: the artifact of the validated run (the refit's is ARTIFACT_DIR)."""
REFIT_DIR = "refit"
"""With --refit: the refit's Ray Train run, inside the run's folder."""
CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"
# Options that define what a run learns from; a rerun under the same name must keep them.
RESUME_FIXED: tuple[str, ...] = (
    "data",
    "split",
    "val_fraction",
    "seed",
    "magnification",
    "image_size",
    "geometry",
    "arch",
    "dropout",
    "freeze_backbone",
    "stain_norm",
    "stain_reference",
    "task",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (also the shape of a Ray Tune trial's config)."""

    data: str
    """Prepared data root (``breakhis prepare`` DEST), local path or s3:// URI."""
    storage: str
    """Where runs are kept (checkpoints, artifact, curves), local path or s3:// URI."""
    name: str
    """Run name: the run lives at STORAGE/NAME; the same name resumes it."""
    split: str = "fold:0"
    """Patient-disjoint split of the manifest: ``fold:K``, ``rep:K`` or ``column:NAME`` (a
    manifest column of train/val/test per patient; with --val-fraction > 0 its val
    patients, if any, are the validation patients instead of a share of train; with 0
    they train too)."""
    val_fraction: float = 0.0
    """Share of the training patients held out for validation (by patient, per class); 0
    (the default) trains on every training patient and validates nothing: the model is the
    last epoch's and the decision argmax. Needed by --patience, --model-epoch best,
    --refit and a fitted --threshold-rule."""
    magnification: int | None = field(default=None, metadata={"choices": (*MAGNIFICATIONS, None)})
    """Train on one magnification (40, 100, 200, 400) or all (None)."""
    image_size: int = 224
    """Side S of the model input in pixels: the height of the aspect-kept tile and the
    side of the training crops (see breakhis.data.geometry)."""
    geometry: str = field(default="aspect", metadata={"choices": GEOMETRIES})
    """``aspect``: resize keeping the tile's aspect ratio to height S, train on random S x S
    crops; ``square``: squash the whole tile to S x S (the old recipe)."""
    eval_view: str = field(default="whole", metadata={"choices": EVAL_VIEWS})
    """What validation, evaluation and scoring feed the model (aspect geometry): ``whole``
    (the whole S x W tile) or ``centre`` (its centre S x S crop)."""
    stain_norm: str = field(default="none", metadata={"choices": STAIN_METHODS})
    """Stain normalisation of every tile before it reaches the model (breakhis.data.stain):
    ``none``, ``macenko`` or ``reinhard``, fitted on --stain-reference and stored in the
    model artifact, so evaluation, scoring and the exported model apply the same."""
    stain_reference: str | None = None
    """What --stain-norm is fitted on: a local path or s3:// URI of an image, or of a folder
    of images (its first 64 by name, pooled); default: the run's first training tile by
    tile id (at the magnification it trains on), as the run decodes it."""
    augment_strength: float = 1.0
    """Training augmentation strength, 0 (none) to 1."""
    colour_augment: bool = True
    """Stain, brightness and contrast jitter at --augment-strength (--no-colour-augment:
    crops, flips and quarter turns only)."""
    oversample: bool = False
    """Oversample the minority class in the training data (instead of or with class weights)."""
    cache: bool | None = None
    """Cache decoded tiles in the Ray object store between epochs (--no-cache: stream from the
    shards every epoch, with bounded memory); default: cache when they fit in the object
    store."""
    arch: str = field(default="resnet50", metadata={"choices": ARCH_CHOICES})
    """Model architecture: a torchvision one, ``smallcnn``, or ``timm:NAME``, any model of
    the timm library (e.g. timm:vit_small_patch16_224; a foundation model's architecture,
    its weights given by --weights)."""
    weights: str = "imagenet"
    """Initial weights: ``imagenet`` (torchvision's download), ``none`` (random), or a local
    path / s3:// URI of a state dict (torch.save or .safetensors; for timm:NAME one saved by
    timm); nothing is downloaded for timm models."""
    freeze_backbone: bool = False
    """Linear probing: the backbone stays frozen for the whole run (its normalisation layers
    in eval mode) and only the two-class head trains; --no-freeze-backbone fine-tunes
    (after --freeze-epochs)."""
    dropout: float = 0.0
    """Dropout before the two-class linear head (0 by the ablation in docs/training.md)."""
    task: str = field(default="binary", metadata={"choices": TASKS})
    """``binary``: benign vs malignant (two classes); ``subtype``: the eight tumour types
    (benign four then malignant four), class-weighted over the eight, with P(malignant) the
    sum of the malignant four, so the binary metrics and decision come from the same model
    (breakhis.subtypes)."""
    epochs: int = 20
    """Total epochs of the run (a resumed run continues up to this number)."""
    batch_size: int = 64
    """Images per step on each worker."""
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS})
    """``adamw`` or ``sgd`` (with Nesterov momentum)."""
    lr: float = 1e-3
    """Peak learning rate of the head (and of the backbone times ``backbone_lr_scale``)."""
    backbone_lr_scale: float | None = None
    """Backbone learning rate as a fraction of ``lr`` once it is unfrozen; default 0.1 with
    pretrained weights, 1.0 with ``--weights none`` (a random backbone learns like the head)."""
    weight_decay: float = 1e-4
    """Weight decay (decoupled for AdamW)."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs before the cosine decay."""
    min_lr_scale: float = 0.01
    """Learning rate at the end of the cosine decay, as a fraction of the peak."""
    freeze_epochs: int | None = None
    """Epochs at the start with the backbone frozen (only the head trains); default 1 with
    pretrained weights, 0 with ``--weights none`` (nothing to keep in a random backbone)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss, 0 to <1."""
    class_weighted: bool = True
    """Weigh the loss by inverse class frequency of the training images."""
    metric: str = field(default="val_loss", metadata={"choices": VAL_METRICS})
    """Validation metric that chooses the model epoch with ``--model-epoch best`` and drives
    early stopping (see VAL_METRICS)."""
    model_epoch: str | None = field(default=None, metadata={"choices": MODEL_EPOCH_RULES})
    """Which epoch becomes the model: ``last`` (the end of the learning-rate schedule, as
    torchvision's reference recipes keep) or ``best`` by ``--metric`` on the validation
    patients; default ``best`` with early stopping (``--patience`` > 0), else ``last``."""
    keep_checkpoints: int = 2
    """Checkpoints kept: the best by ``metric`` with ``--model-epoch best``, else the
    latest."""
    patience: int = 0
    """Stop after this many epochs without improvement of ``metric``; 0 never stops early."""
    num_workers: int = 2
    """Ray Train workers (one GPU each with ``use_gpu``)."""
    use_gpu: bool = False
    """Train on GPUs: NCCL, bf16 autocast, channels_last; CPUs and gloo otherwise."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (the rest of the cluster feeds Ray Data)."""
    max_failures: int = 2
    """Worker failures to recover from (restart from the last checkpoint); -1 no limit."""
    wait_for_resources: bool = False
    """On an autoscaling cluster, wait for nodes when the cluster is too small for the run
    now, instead of failing before any worker starts."""
    compile: bool = False
    """Compile the model with torch.compile (GPU runs; slow to start)."""
    amp: bool = True
    """bf16 autocast on GPU (no effect on CPU)."""
    channels_last: bool = True
    """channels_last memory format on GPU (no effect on CPU)."""
    bn_recalibration_batches: int = 0
    """Training batches (each epoch's last) over which BatchNorm statistics are recomputed
    with the epoch's final weights before validating and checkpointing (PreciseBN); 0 (the
    default, by the ablation in docs/training.md) keeps BatchNorm's running averages."""
    threshold_rule: str = field(default="argmax", metadata={"choices": DECISION_RULES})
    """The decision stored in the model: ``argmax`` (threshold 0.5, temperature 1), or the
    temperature and threshold fitted on the validation patients by ``balanced_accuracy``
    or ``accuracy`` (breakhis.stats.calibration) when they hold at least 5 patients of each
    class (else argmax, logged and recorded in the epoch's ``val_decision_fitted``)."""
    refit: bool = False
    """After choosing the epoch count on the validation patients, train again from the start
    on training and validation patients together for that many epochs, and hand over that
    model (with the temperature and threshold fitted on validation)."""
    seed: int = 0
    """Seed of the validation patients, weight init and dropout."""
    trace_dir: str | None = None
    """Write an audit trace of the run to this folder (local path or s3:// URI): the
    initial weights (``initial_state.pt``) and, per epoch and worker, every step's tile
    row keys, labels, loss and learning rates (``epoch_NNNN_rank_R.json``); costs one
    device sync per step. Used by the faithfulness test (tests/test_faithful.py)."""
    tracking_uri: str | None = None
    """MLflow tracking URI the run logs to (parameters, per-epoch metrics, curves, model
    card); default: MLFLOW_TRACKING_URI, else no tracking (see breakhis.train.tracking)."""

    def __post_init__(self) -> None:
        # One check per option, each with its own message (litgpt's style), grouped by what
        # they check.
        self._check_data_and_tiles()
        self._check_ranges()
        self._check_choices()
        tracking.check_uri(self.tracking_uri)
        self._check_needs_validation()
        self._check_weights()

    def _check_data_and_tiles(self) -> None:
        """The data, run name, split, tile geometry and stain normalisation."""
        check_arch(self.arch)
        for name in ("data", "storage"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"--name {self.name!r}: use letters, digits and . _ = - (no slashes), "
                "e.g. rn50-fold0"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        SplitSpec.parse(self.split, val_fraction=self.val_fraction, seed=self.seed)
        check_geometry(self.geometry, self.eval_view)
        check_stain(self.stain_norm)
        if self.stain_norm == "none" and self.stain_reference is not None:
            raise ValueError(
                "--stain-reference is what --stain-norm is fitted on: give --stain-norm "
                "macenko or reinhard with it"
            )
        if self.stain_norm != "none" and self.eval_view == "centre":
            # The normaliser sees the whole canonical tile; an exported model fed the centre
            # crop could not see what it was fitted to normalise.
            raise ValueError(
                f"--stain-norm {self.stain_norm} needs --eval-view whole (the tile is "
                "normalised whole, before any crop)"
            )

    def _check_ranges(self) -> None:
        """Numeric options within their ranges."""
        if self.magnification is not None and self.magnification not in MAGNIFICATIONS:
            raise ValueError(
                f"--magnification {self.magnification}: accepted "
                f"{', '.join(map(str, MAGNIFICATIONS))} (or all)"
            )
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in 16..1024, got {self.image_size}")
        if not 0.0 <= self.augment_strength <= 1.0:
            raise ValueError(f"--augment-strength must be in [0, 1], got {self.augment_strength}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        positive |= {"num_workers": self.num_workers, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("backbone_lr_scale", "min_lr_scale"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1]")
        for name in ("weight_decay", "momentum", "warmup_epochs", "freeze_epochs", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be >= -1, got {self.max_failures}")
        if self.bn_recalibration_batches < 0:
            raise ValueError(
                f"--bn-recalibration-batches must be >= 0, got {self.bn_recalibration_batches}"
            )

    def _check_choices(self) -> None:
        """Options with a list of accepted values, and the pairs that exclude each other."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"--optimizer {self.optimizer!r} unknown; accepted: {', '.join(OPTIMIZERS)}"
            )
        if self.metric not in VAL_METRICS:
            raise ValueError(
                f"--metric {self.metric!r} unknown; accepted: {', '.join(VAL_METRICS)}"
            )
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} unknown; accepted: {', '.join(TASKS)}")
        if self.metric.removeprefix("val_") in SUBTYPE_METRIC_NAMES and self.task != "subtype":
            raise ValueError(f"--metric {self.metric} needs --task subtype")
        if self.model_epoch not in (None, *MODEL_EPOCH_RULES):
            raise ValueError(
                f"--model-epoch {self.model_epoch!r} unknown; accepted: "
                f"{', '.join(MODEL_EPOCH_RULES)}"
            )
        if self.model_epoch == "last" and self.patience > 0:
            raise ValueError(
                f"--patience {self.patience} stops when --metric stops improving, and then the "
                "last epoch is not the model to keep: use --model-epoch best (or --patience 0)"
            )
        if self.threshold_rule not in DECISION_RULES:
            raise ValueError(
                f"--threshold-rule {self.threshold_rule!r} unknown; accepted: "
                f"{', '.join(DECISION_RULES)}"
            )

    def _check_weights(self) -> None:
        """Initial weights the architecture can take; freezing options that agree."""
        if self.weights == "imagenet" and self.arch == "smallcnn":
            raise ValueError(
                "--weights imagenet: smallcnn has no ImageNet weights; use --weights none"
            )
        if self.weights == "imagenet" and is_timm(self.arch):
            raise ValueError(
                f"--weights imagenet is torchvision's download; {self.arch} takes --weights "
                "none (random) or a local path / s3:// URI of a state dict saved by timm"
            )
        if self.freeze_backbone and self.freeze_epochs is not None:
            raise ValueError(
                "--freeze-backbone freezes the backbone for every epoch: leave "
                "--freeze-epochs unset with it"
            )

    def _check_needs_validation(self) -> None:
        """Refuse options that need validation patients when --val-fraction is 0."""
        if self.val_fraction > 0:
            return
        needs = {
            "--patience": self.patience > 0,
            "--model-epoch best": self.model_epoch == "best",
            "--refit": self.refit,
            f"--threshold-rule {self.threshold_rule}": self.threshold_rule != "argmax",
        }
        named = [name for name, asked in needs.items() if asked]
        if named:
            raise ValueError(
                f"{', '.join(named)} need(s) validation patients: set --val-fraction "
                "(e.g. 0.2), or leave it at 0 to train on every training patient"
            )

    @property
    def validates(self) -> bool:
        """Whether the run holds out validation patients (``val_fraction`` > 0)."""
        return self.val_fraction > 0

    @property
    def pretrained(self) -> bool:
        """Whether the run starts from trained weights (not ``--weights none``)."""
        return self.weights != "none"

    @property
    def epochs_frozen(self) -> int:
        """``freeze_epochs`` as applied: every epoch with --freeze-backbone; when unset, 1 with
        pretrained weights and 0 from a random initialisation (nothing in a random backbone
        is worth keeping)."""
        if self.freeze_backbone:
            return self.epochs
        if self.freeze_epochs is not None:
            return self.freeze_epochs
        return 1 if self.pretrained else 0

    @property
    def backbone_lr_ratio(self) -> float:
        """``backbone_lr_scale`` as applied: when unset, 0.1 with pretrained weights and
        1.0 from a random initialisation (a random backbone must learn as fast as the head)."""
        if self.backbone_lr_scale is not None:
            return self.backbone_lr_scale
        return 0.1 if self.pretrained else 1.0

    @property
    def epoch_rule(self) -> str:
        """``model_epoch`` as applied: when unset, ``best`` with early stopping and ``last``
        without (a fixed schedule's end is what it was tuned for; choosing an epoch on a few
        validation patients is noisy, and the paper-sized splits have few)."""
        if self.model_epoch is not None:
            return self.model_epoch
        return "best" if self.patience > 0 else "last"

    @property
    def metric_mode(self) -> str:
        """``"max"`` or ``"min"``: which way ``metric`` improves."""
        higher = {**HIGHER_IS_BETTER, **SUBTYPE_HIGHER_IS_BETTER}
        return "max" if higher[self.metric.removeprefix("val_")] else "min"

    @property
    def run_uri(self) -> str:
        """STORAGE/NAME: the run's folder."""
        return storage.join(self.storage, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (for Ray, JSON and Tune)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict, e.g. a Tune trial's config. Raises ValueError naming
        unknown keys and whatever __post_init__ raises."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)
