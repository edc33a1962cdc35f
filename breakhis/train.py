"""Distributed fine-tuning on Ray Train (V2): DDP over Ray workers, data from Ray Data.

    breakhis train --data s3://bucket/breakhis-prepared --storage s3://bucket/runs \\
        --name rn50-fold0 --fold 0 --num-workers 8 --use-gpu
    ray job submit --working-dir . -- python jobs/train.py --data ... (same options)

What happens, in reading order:

1. ``run_training`` (the driver) validates everything it can before a worker
   starts: the config, the data and its split (patient-disjoint, with
   validation patients), the weights (built once here and shipped to the
   workers through the object store, so workers need neither internet nor
   the weights' storage), and, when the run already exists, that it is the
   same run. It builds the Ray datasets and hands them to a ``TorchTrainer``
   by name.
2. ``train_loop_per_worker`` runs on every worker: resume from the latest
   checkpoint if any, then per epoch ``train_one_epoch`` on its shard of the
   training data and ``evaluate`` on its shard of the validation patients;
   predictions are gathered so that every rank computes the same metrics and
   takes the same early-stopping decision. Rank 0 alone writes the checkpoint
   (a plain dict: model, optimizer, scheduler, epoch, config, history).
3. The driver picks the best checkpoint by ``metric``, writes the model
   artifact (breakhis.artifact) and the training curves (PNG and JSON) under
   ``STORAGE/NAME``.

Running again with the same ``storage`` and ``name`` continues from the latest
checkpoint (Ray Train V2 restores a run from its storage folder); a worker
that dies is restarted from the last checkpoint up to ``max_failures`` times.
The same TrainConfig serves a Ray Tune trial: call ``run_training`` from the
trial's function with ``callbacks=[TuneReportCallback()]`` and a per-trial name.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import logging
import math
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn

from breakhis import storage, tracking
from breakhis.calibration import THRESHOLD_RULES, choose_threshold, fit_temperature, probabilities
from breakhis.metrics import HIGHER_IS_BETTER, METRIC_NAMES, classification_metrics
from breakhis.model import (
    build_model,
    check_arch,
    recompute_batchnorm_stats,
    set_backbone_trainable,
    set_train_mode,
    split_parameters,
    training_batchnorms,
)
from breakhis.splits import SplitSpec

log = logging.getLogger(__name__)

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
VAL_METRICS: tuple[str, ...] = tuple(f"val_{name}" for name in METRIC_NAMES)

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
    "arch",
    "dropout",
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
    """Patient-disjoint split of the manifest: ``fold:K`` or ``rep:K``."""
    val_fraction: float = 0.2
    """Share of the training patients held out for validation (by patient, per class)."""
    magnification: int | None = None
    """Train on one magnification (40, 100, 200, 400) or all (None)."""
    image_size: int = 224
    """Side of the square model input in pixels."""
    augment_strength: float = 1.0
    """Training augmentation strength, 0 (none) to 1."""
    oversample: bool = False
    """Oversample the minority class in the training data (instead of or with class weights)."""
    cache: bool = True
    """Cache decoded tiles in the Ray object store between epochs."""
    arch: str = "resnet50"
    """Model architecture, one of breakhis.model.ARCHITECTURES."""
    weights: str = "imagenet"
    """Initial weights: ``imagenet``, ``none``, or a local path / s3:// URI of a state dict."""
    dropout: float = 0.2
    """Dropout before the two-class linear head."""
    epochs: int = 20
    """Total epochs of the run (a resumed run continues up to this number)."""
    batch_size: int = 64
    """Images per step on each worker."""
    optimizer: str = "adamw"
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
    metric: str = "val_loss"
    """Validation metric that chooses the model epoch with ``--model-epoch best`` and drives
    early stopping (see VAL_METRICS)."""
    model_epoch: str | None = None
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
    bn_recalibration_batches: int = 16
    """Training batches (each epoch's last) over which BatchNorm statistics are recomputed
    with the epoch's final weights before validating and checkpointing (PreciseBN); 0 keeps
    BatchNorm's running averages."""
    threshold_rule: str = "balanced_accuracy"
    """How the decision threshold is chosen on the validation patients each epoch and stored
    in the model: ``balanced_accuracy`` or ``accuracy`` (see breakhis.calibration)."""
    refit: bool = False
    """After choosing the epoch count on the validation patients, train again from the start
    on training and validation patients together for that many epochs, and hand over that
    model (with the temperature and threshold fitted on validation)."""
    seed: int = 0
    """Seed of the validation patients, weight init and dropout."""
    tracking_uri: str | None = None
    """MLflow tracking URI the run logs to (parameters, per-epoch metrics, curves, model
    card); default: MLFLOW_TRACKING_URI, else no tracking (see breakhis.tracking)."""

    def __post_init__(self) -> None:
        check_arch(self.arch)
        for name in ("data", "storage"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"--name {self.name!r}: use letters, digits and . _ = - (no slashes), "
                "e.g. rn50-fold0"
            )
        SplitSpec.parse(self.split, val_fraction=self.val_fraction, seed=self.seed)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"--val-fraction must be in (0, 1): every epoch is validated on held-out "
                f"patients; got {self.val_fraction}"
            )
        if self.magnification not in (None, 40, 100, 200, 400):
            raise ValueError(
                f"--magnification {self.magnification}: accepted 40, 100, 200, 400 (or all)"
            )
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in 16..1024, got {self.image_size}")
        if not 0.0 <= self.augment_strength <= 1.0:
            raise ValueError(f"--augment-strength must be in [0, 1], got {self.augment_strength}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"--optimizer {self.optimizer!r} unknown; accepted: {', '.join(OPTIMIZERS)}"
            )
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
        if self.metric not in VAL_METRICS:
            raise ValueError(
                f"--metric {self.metric!r} unknown; accepted: {', '.join(VAL_METRICS)}"
            )
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be >= -1, got {self.max_failures}")
        if self.bn_recalibration_batches < 0:
            raise ValueError(
                f"--bn-recalibration-batches must be >= 0, got {self.bn_recalibration_batches}"
            )
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
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(
                f"--threshold-rule {self.threshold_rule!r} unknown; accepted: "
                f"{', '.join(THRESHOLD_RULES)}"
            )
        tracking.check_uri(self.tracking_uri)
        if self.weights == "imagenet" and self.arch == "smallcnn":
            raise ValueError(
                "--weights imagenet: smallcnn has no ImageNet weights; use --weights none"
            )

    @property
    def pretrained(self) -> bool:
        """Whether the run starts from trained weights (not ``--weights none``)."""
        return self.weights != "none"

    @property
    def epochs_frozen(self) -> int:
        """``freeze_epochs`` as applied: when unset, 1 with pretrained weights and 0 from a
        random initialisation (nothing in a random backbone is worth keeping)."""
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
        return "max" if HIGHER_IS_BETTER[self.metric.removeprefix("val_")] else "min"

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


@dataclass(frozen=True)
class EpochStats:
    """What one pass over the training data did on this worker."""

    loss: float
    """Mean training loss per image."""
    images: int
    steps: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Predictions:
    """The model's margins (malignant minus benign logit) and malignancy probabilities
    (their sigmoid, i.e. the softmax at temperature 1) for a set of images."""

    margins: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Predictions]) -> Predictions:
        return cls(
            margins=np.concatenate([p.margins for p in parts]),
            probs=np.concatenate([p.probs for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            patient_ids=np.concatenate([p.patient_ids for p in parts]),
        )


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_uri: str
    """STORAGE/NAME."""
    artifact_uri: str
    """The model artifact (load with breakhis.artifact.load_artifact)."""
    curves_uri: str
    """The training curves PNG (the JSON sits beside it)."""
    model_id: str
    best_epoch: int
    """The epoch whose model the run hands over (``--model-epoch``: the last, or the best
    by ``--metric``)."""
    best_metrics: dict[str, float]
    """Metrics reported at that epoch."""
    last_epoch: int
    stopped_early: bool
    history: tuple[dict[str, float], ...] = field(repr=False)
    """Every epoch's reported metrics, the resumed part included."""
    fit_seconds: float
    """Wall time of TorchTrainer.fit(), worker start-up included (both runs with refit)."""
    refit_epochs: int = 0
    """With --refit: epochs of the refit on training and validation patients (0: none)."""

    def format_table(self) -> str:
        """A plain-text summary for the terminal."""
        keys = ["train_loss", *VAL_METRICS]
        lines = [f"{'epoch':>5} " + " ".join(f"{k.removeprefix('val_')[:10]:>10}" for k in keys)]
        for row in self.history:
            mark = " *" if row["epoch"] == self.best_epoch else ""
            cells = " ".join(f"{row.get(k, float('nan')):>10.4f}" for k in keys)
            lines.append(f"{int(row['epoch']):>5} {cells}{mark}")
        lines.append(
            f"model epoch {self.best_epoch} of {self.last_epoch}"
            + (" (stopped early)" if self.stopped_early else "")
            + (
                f"; refit on training + validation patients for {self.refit_epochs} epochs"
                if self.refit_epochs
                else ""
            )
            + f"; model {self.model_id} at {self.artifact_uri}; curves at {self.curves_uri}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- pure pieces


def make_optimizer(
    config: TrainConfig, backbone: list[nn.Parameter], head: list[nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimizer with two parameter groups: backbone (``lr * backbone_lr_ratio``)
    and head (``lr``). Frozen parameters get no gradient, so the optimizer skips them."""
    groups = [
        {"params": backbone, "lr": config.lr * config.backbone_lr_ratio, "name": "backbone"},
        {"params": head, "lr": config.lr, "name": "head"},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_scale(step: int, *, total_steps: int, warmup_steps: int, min_scale: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine
    decay to ``min_scale`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule over ``config.epochs`` epochs."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def scale(step: int) -> float:
        return lr_scale(step, total_steps=total, warmup_steps=warmup, min_scale=config.min_lr_scale)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def make_loss(config: TrainConfig, class_weights: Sequence[float]) -> nn.CrossEntropyLoss:
    """Cross-entropy with the config's label smoothing and, if asked, class weights."""
    weight = torch.tensor(class_weights, dtype=torch.float32) if config.class_weighted else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def _prepare_images(
    images: torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    from breakhis.transforms import normalize

    images = normalize(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> EpochStats:
    """One pass over ``batches`` (``image``: uint8 NCHW, ``label``: int64), one optimizer
    and scheduler step per batch. The caller puts ``model`` in train mode.

    Returns the EpochStats of this process. Raises FloatingPointError when the
    loss becomes NaN or infinite (a diverged run should stop, not checkpoint).
    """
    loss_sum = torch.zeros((), device=device)
    images = steps = 0
    started = time.perf_counter()
    for batch in batches:
        x = _prepare_images(batch["image"], device, channels_last)
        y = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        images += int(y.shape[0])
        steps += 1
    total = float(loss_sum)  # one device sync per epoch, not per step
    seconds = time.perf_counter() - started
    if not math.isfinite(total):
        raise FloatingPointError(f"training loss is {total} after {steps} steps; lower --lr")
    return EpochStats(loss=total / max(images, 1), images=images, steps=steps, seconds=seconds)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Predictions:
    """Malignancy probabilities of ``model`` (put in eval mode here) for ``batches``
    (``image``: uint8 NCHW array or tensor, ``label``, ``patient_id``).

    Returns the Predictions of this process (empty arrays for no batches).
    """
    model.eval()
    parts: list[Predictions] = []
    for batch in batches:
        x = _prepare_images(torch.as_tensor(batch["image"]), device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            logits = model(x)
        logits = logits.float()
        margins = (logits[:, 1] - logits[:, 0]).cpu().numpy().astype(np.float64)
        probs = torch.softmax(logits, dim=1)[:, 1]
        parts.append(
            Predictions(
                margins=margins,
                probs=probs.cpu().numpy().astype(np.float64),
                labels=np.asarray(batch["label"]).astype(np.int64),
                patient_ids=np.asarray(batch["patient_id"]).astype(str),
            )
        )
    if not parts:
        empty = np.zeros(0)
        return Predictions(empty, empty, empty.astype(np.int64), empty.astype(str))
    return Predictions.concat(parts)


def early_stopping(
    history: Sequence[Mapping[str, float]], metric: str, mode: str, patience: int
) -> tuple[int, bool]:
    """``(best_epoch, stop)`` from the per-epoch history: the first epoch with the best
    ``metric`` (NaN counts as worst) and whether ``patience`` epochs have passed since."""
    if not history:
        return 0, False
    sign = 1.0 if mode == "max" else -1.0

    def score(row: Mapping[str, float]) -> float:
        value = row.get(metric, float("nan"))
        return -math.inf if value is None or math.isnan(value) else sign * value

    best = max(history, key=score)  # max() keeps the first of equal scores
    since = int(history[-1]["epoch"]) - int(best["epoch"])
    return int(best["epoch"]), patience > 0 and since >= patience


def kept_epoch(history: Sequence[Mapping[str, float]], cfg: TrainConfig) -> tuple[int, bool]:
    """``(epoch, stop)``: the epoch whose model the run hands over (``cfg.epoch_rule``: the
    last in ``history``, or the best by ``cfg.metric``) and whether early stopping ends the
    run there (see early_stopping). ``(0, False)`` for an empty history."""
    best, stop = early_stopping(history, cfg.metric, cfg.metric_mode, cfg.patience)
    if cfg.epoch_rule == "last" and history:
        return int(history[-1]["epoch"]), stop
    return best, stop


def fit_decision(predictions: Predictions, rule: str) -> tuple[float, float]:
    """``(temperature, threshold)`` fitted on validation predictions: the temperature
    that minimises their log-likelihood, then the threshold on the calibrated
    probabilities by ``rule`` (see breakhis.calibration)."""
    temperature = fit_temperature(predictions.margins, predictions.labels)
    calibrated = probabilities(predictions.margins, temperature)
    return temperature, choose_threshold(calibrated, predictions.labels, rule)


# --------------------------------------------------------------------------- worker loop


def validate_epoch(
    net: nn.Module,
    shard: Any,
    cfg: TrainConfig,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Validate ``net`` (the unwrapped module: no gradient sync, and validation shards may
    differ in size) on this rank's ``shard`` and gather every rank's predictions, so all
    ranks compute the same metrics and take the same early-stopping decision.

    Returns ``val_<metric>`` for every metric, plus ``val_temperature`` and
    ``val_threshold`` fitted on these predictions (fit_decision).
    """
    local = evaluate(
        net,
        shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", prefetch_batches=2),
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
    )
    predictions = Predictions.concat(_all_gather(local))
    val = classification_metrics(predictions.labels, predictions.probs, predictions.patient_ids)
    temperature, threshold = fit_decision(predictions, cfg.threshold_rule)
    return {
        **{f"val_{k}": float(v) for k, v in val.items()},
        "val_temperature": temperature,
        "val_threshold": threshold,
    }


def _remember_images(
    batches: Iterable[Mapping[str, torch.Tensor]], recent: deque[torch.Tensor]
) -> Iterator[Mapping[str, torch.Tensor]]:
    """Yield ``batches`` unchanged, keeping the images of the last ones in ``recent``."""
    for batch in batches:
        if recent.maxlen:
            recent.append(batch["image"])
        yield batch


def recalibrate_batchnorm(
    net: nn.Module,
    images: Sequence[torch.Tensor],
    *,
    device: torch.device,
    channels_last: bool = False,
) -> int:
    """Recompute the training BatchNorm layers' statistics of ``net`` (the unwrapped
    module, in its training modes) over ``images`` (uint8 NCHW batches), then average
    them over the data-parallel ranks so every rank validates and checkpoints the
    same model. See breakhis.model.recompute_batchnorm_stats for why.

    Returns the number of batches this rank used (0 changes nothing).
    """
    import torch.distributed as dist

    layers = training_batchnorms(net)
    used = recompute_batchnorm_stats(
        net, (_prepare_images(x, device, channels_last) for x in images), layers
    )
    if used and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank runs the same number of steps (equal shards), so all take part.
        world = dist.get_world_size()
        for layer in layers:
            for buffer in (layer.running_mean, layer.running_var):
                dist.all_reduce(buffer)
                buffer.div_(world)
    return used


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_in_sync(net: nn.Module, epoch: int) -> None:
    """Raise when the ranks' weights differ: DDP must keep them identical, and a
    silent divergence would make rank 0's checkpoint a model no rank trained."""
    with torch.no_grad():
        total = float(sum(p.double().sum() for p in net.parameters()))
    values = _all_gather(total)
    if max(values) - min(values) > 1e-6 * max(1.0, abs(total)):
        raise RuntimeError(f"epoch {epoch}: model weights differ across workers: {values}")


def _wrap(net: nn.Module, *, compile_model: bool) -> nn.Module:
    """DDP over the parameters that train now (frozen ones are left out of the buckets)."""
    model = ray.train.torch.prepare_model(net, move_to_device=False)
    return torch.compile(model) if compile_model else model


def _save_checkpoint(folder: str, state: dict[str, Any], config: TrainConfig, epoch: int) -> None:
    torch.save(state, f"{folder}/{CHECKPOINT_FILE}")
    with open(f"{folder}/{CHECKPOINT_CONFIG_FILE}", "w") as out:
        json.dump({"epoch": epoch, "config": config.to_dict()}, out, indent=2)


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state saved in a Ray Train checkpoint, read straight from its storage.

    Not ``checkpoint.as_directory()``: on a remote checkpoint, every worker of a node
    shares one download folder and a worker that takes the lock after another's
    download has finished downloads again, in place, while the other is still
    reading (seen as "PytorchStreamReader failed reading file data/31" on resume
    from S3). Reading the bytes into memory gives each worker its own copy.

    Returns the dict ``_save_checkpoint`` wrote (model, optimizer, scheduler,
    history, epoch). Raises FileNotFoundError naming the checkpoint when it
    holds no checkpoint file.
    """
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"checkpoint {checkpoint.path} holds no {CHECKPOINT_FILE}; "
            "it was not written by this training job"
        ) from err
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (see the module docstring).

    ``config`` is what run_training builds: ``train`` (TrainConfig as a dict),
    ``class_weights``, ``steps_per_epoch``, ``initial_state`` (an object
    ref to the model's starting state dict) and ``tracking`` (the MLflow run
    rank 0 logs each epoch to, or None).
    """
    cfg = TrainConfig.from_dict(config["train"])
    validate: bool = config.get("validate", True)
    class_weights: list[float] = config["class_weights"]
    steps_per_epoch: int = config["steps_per_epoch"]
    initial_state = config["initial_state"]
    tracked: tracking.TrackedRun | None = config.get("tracking")

    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (on_gpu and cfg.amp) else None
    channels_last = on_gpu and cfg.channels_last
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed * 1000 + rank)

    net = build_model(cfg.arch, weights="none", dropout=cfg.dropout)
    net.load_state_dict(ray.get(initial_state))
    backbone, head = split_parameters(net, cfg.arch)
    optimizer = make_optimizer(cfg, backbone, head)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    loss_fn = make_loss(cfg, class_weights).to(device)

    history: list[dict[str, float]] = []
    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        if rank == 0:
            log.info("resuming %s at epoch %d of %d", cfg.name, start_epoch, cfg.epochs)
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    # Optimizer state loaded on CPU must live beside its parameters.
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                param_state[key] = value.to(device)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if validate else None
    model: nn.Module | None = None
    frozen: bool | None = None
    _, stop = early_stopping(history, cfg.metric, cfg.metric_mode, cfg.patience)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stop:
            break
        epoch_started = time.perf_counter()
        if frozen != (epoch <= cfg.epochs_frozen):
            frozen = epoch <= cfg.epochs_frozen
            set_backbone_trainable(net, cfg.arch, trainable=not frozen)
            # DDP registers the parameters that require grad when it is built, so a
            # change of what trains needs a new wrapper (the old one must go first).
            model = None
            gc.collect()
            model = _wrap(net, compile_model=cfg.compile)
        assert model is not None
        set_train_mode(net, cfg.arch, backbone_frozen=bool(frozen))
        recent: deque[torch.Tensor] = deque(maxlen=cfg.bn_recalibration_batches)
        stats = train_one_epoch(
            model,
            _remember_images(
                train_shard.iter_torch_batches(
                    batch_size=cfg.batch_size, prefetch_batches=2, drop_last=True
                ),
                recent,
            ),
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )
        recalibrate_batchnorm(net, recent, device=device, channels_last=channels_last)
        recent.clear()
        val = {}
        if val_shard is not None:
            val = validate_epoch(
                net,
                val_shard,
                cfg,
                device=device,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
        _check_in_sync(net, epoch)
        all_stats = _all_gather(stats)
        images = sum(s.images for s in all_stats)
        row: dict[str, float] = {
            "epoch": epoch,
            "train_loss": sum(s.loss * s.images for s in all_stats) / max(images, 1),
            "lr": optimizer.param_groups[1]["lr"],
            "backbone_frozen": float(frozen),
            "train_images": images,
            "train_seconds": max(s.seconds for s in all_stats),
            "train_images_per_s": sum(s.images_per_s for s in all_stats),
            "train_images_per_s_per_worker": sum(s.images_per_s for s in all_stats)
            / len(all_stats),
            "epoch_seconds": time.perf_counter() - epoch_started,
            "torch_threads": torch.get_num_threads(),
            **val,
        }
        history.append(row)
        best_epoch, stop = kept_epoch(history, cfg)
        row["best_epoch"] = best_epoch
        if rank == 0:
            log.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, %s %.4f, patient rate %.3f "
                "(%.0f img/s)",
                epoch,
                cfg.epochs,
                row["train_loss"],
                row.get("val_loss", math.nan),
                cfg.metric,
                row.get(cfg.metric, math.nan),
                row.get("val_patient_recognition_rate", math.nan),
                row["train_images_per_s"],
            )
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                state = {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "config": cfg.to_dict(),
                    "history": history,
                }
                _save_checkpoint(folder, state, cfg, epoch)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")
        if tracked is not None and rank == 0:  # once checkpointed; earlier epochs if missing
            tracking.log_epochs(tracked, history)
        if stop and rank == 0:
            log.info(
                "early stop after epoch %d: no better %s than epoch %d for %d epochs",
                epoch,
                cfg.metric,
                best_epoch,
                cfg.patience,
            )


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class RunPlan:
    """Everything run_training checked and built before starting workers."""

    config: TrainConfig
    datasets: dict[str, ray.data.Dataset]
    loop_config: dict[str, Any]
    manifest_hash: str
    resumed_from_epoch: int

    @property
    def validate(self) -> bool:
        """False for a refit: no validation patients, every epoch kept as trained."""
        return bool(self.loop_config.get("validate", True))


def _latest_checkpoint_config(config: TrainConfig) -> dict[str, Any] | None:
    """The train_config.json of the run's latest checkpoint, or None for a new run."""
    if not storage.exists(config.run_uri):
        return None
    path, fs = storage.for_ray(config.run_uri)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # a folder without a run snapshot: nothing to resume
        return None
    if result.checkpoint is None:
        return None
    ckpt = result.checkpoint
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{CHECKPOINT_CONFIG_FILE}") as stream:
        return json.loads(stream.read())


def check_resumable(config: TrainConfig) -> int:
    """The epoch a run under the same STORAGE/NAME reached (0 for a new run).

    Raises ValueError naming the options that differ from that run's when it
    was trained on other data, split or model (continuing it would mix two runs).
    """
    previous = _latest_checkpoint_config(config)
    if previous is None:
        return 0
    old = previous["config"]
    differ = [
        f"--{k.replace('_', '-')} {old.get(k)!r} (now {getattr(config, k)!r})"
        for k in RESUME_FIXED
        if old.get(k) != getattr(config, k)
    ]
    if differ:
        raise ValueError(
            f"{config.run_uri} holds a run trained with {', '.join(differ)}; resuming it would "
            "mix two runs. Use another --name, or the same options to continue it"
        )
    return int(previous["epoch"])


def _count_images(manifest: Any, patients: frozenset[str], magnification: int | None) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pc.is_in(manifest.column("patient_id"), pa.array(sorted(patients), pa.string()))
    if magnification is not None:
        mask = pc.and_(mask, pc.equal(manifest.column("magnification"), magnification))
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


def _check_batches(train_rows: int, config: TrainConfig) -> int:
    """Optimizer steps per epoch on each worker; raises ValueError when there is none."""
    steps = train_rows // config.num_workers // config.batch_size
    if steps < 1:
        raise ValueError(
            f"{train_rows} training images over {config.num_workers} worker(s) do not fill "
            f"one batch of --batch-size {config.batch_size}; lower it or use fewer workers"
        )
    return steps


def plan_run(
    config: TrainConfig, *, gpus_per_worker: float | None = None, validate: bool = True
) -> RunPlan:
    """Check everything that can be checked on the driver, and build the datasets.

    Returns the RunPlan. Raises FileNotFoundError for missing data, ValueError
    for a bad split, too little data for the batch size, an incompatible
    earlier run under the same name or weights that do not fit (WeightsError),
    and LeakageError for a split with a patient on two sides. Nothing has
    started on the workers when it raises.

    ``validate=False`` plans a refit: the validation patients join the training
    ones and no epoch is validated (see run_training).
    """
    from breakhis.ingest import IngestConfig, build_datasets
    from breakhis.prepare import read_manifest
    from breakhis.splits import check_no_leakage, select_split

    spec = SplitSpec.parse(
        config.split, val_fraction=config.val_fraction if validate else 0.0, seed=config.seed
    )
    manifest = read_manifest(config.data)
    patients = select_split(manifest, spec)  # raises LeakageError for a leaking split
    if validate and not patients.val:
        raise ValueError(
            f"split {spec} with --val-fraction {config.val_fraction} leaves no validation "
            "patient; raise --val-fraction"
        )
    # Counted from the manifest, so too small a data set fails before anything is decoded.
    _check_batches(_count_images(manifest, patients.train, config.magnification), config)
    resumed_from = check_resumable(config)

    torch.manual_seed(config.seed)
    net = build_model(config.arch, weights=config.weights, dropout=config.dropout)
    initial_state = ray.put({k: v.detach().cpu() for k, v in net.state_dict().items()})
    del net

    ingest = build_datasets(
        config.data,
        spec,
        IngestConfig(
            image_size=config.image_size,
            magnification=config.magnification,
            cache=config.cache,
            augment_strength=config.augment_strength,
            oversample=config.oversample,
            seed=config.seed,
        ),
    )
    check_no_leakage(train=ingest.split.train, val=ingest.split.val, test=ingest.split.test)
    if validate and ("val" not in ingest.datasets or ingest.num_rows.get("val", 0) == 0):
        raise ValueError(
            f"split {spec}: the validation patients have no image at this magnification"
        )
    steps_per_epoch = _check_batches(ingest.num_rows["train"], config)
    check_cluster_fits(config, ray.cluster_resources(), gpus_per_worker)
    datasets = {"train": ingest.datasets["train"].select_columns(["image", "label"])}
    if validate:
        datasets["val"] = ingest.datasets["val"].select_columns(["image", "label", "patient_id"])
    loop_config = {
        "validate": validate,
        "train": config.to_dict(),
        "class_weights": [float(w) for w in ingest.class_weights],
        "steps_per_epoch": steps_per_epoch,
        "initial_state": initial_state,
    }
    return RunPlan(
        config=config,
        datasets=datasets,
        loop_config=loop_config,
        manifest_hash=ingest.manifest_hash,
        resumed_from_epoch=resumed_from,
    )


DATA_CPUS = 1.0
"""CPUs a run needs beside its workers' reservations, for Ray Data's decode tasks."""


def check_cluster_fits(
    config: TrainConfig, resources: Mapping[str, float], gpus_per_worker: float | None = None
) -> None:
    """Fail before any worker starts when the cluster (``resources``, its total resources,
    as ``ray.cluster_resources()`` gives them) cannot hold the run's workers plus one CPU
    for Ray Data: the workers would start, take every CPU, and wait forever for data.
    With ``config.wait_for_resources`` it logs a warning instead (an autoscaler adds nodes).
    """
    needs = {"CPU": config.num_workers * config.cpus_per_worker + DATA_CPUS}
    if config.use_gpu:
        needs["GPU"] = config.num_workers * (1.0 if gpus_per_worker is None else gpus_per_worker)
    short = {k: (v, resources.get(k, 0.0)) for k, v in needs.items() if resources.get(k, 0.0) < v}
    if not short:
        return
    what = "; ".join(
        f"{need:g} {k} needed, the cluster has {have:g}" for k, (need, have) in short.items()
    )
    message = (
        f"the cluster is too small for this run ({what}): it needs --num-workers "
        f"{config.num_workers} x --cpus-per-worker {config.cpus_per_worker:g} CPUs"
        f"{' and one GPU each' if config.use_gpu else ''}, plus {DATA_CPUS:g} CPU for Ray "
        "Data's decode tasks. Lower --num-workers or --cpus-per-worker, add nodes, or pass "
        "--wait-for-resources on a cluster whose autoscaler adds them"
    )
    if not config.wait_for_resources:
        raise ValueError(message)
    log.warning("%s; waiting (--wait-for-resources)", message)


class EvalShardsDataConfig(ray.train.DataConfig):
    """Splits ``train`` into equal shards (DDP needs the same number of steps on every
    rank) and ``val`` into unequal ones, so that no validation image is dropped."""

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, ray.data.DataIterator]]:
        rest = {k: v for k, v in datasets.items() if k != "val"}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            if val.name is None:
                val.set_name("val")
            val.context.execution_options = self._resolve_execution_options("val")
            for shard, split in zip(out, val.streaming_split(world_size, equal=False), strict=True):
                shard["val"] = split
        return out


def make_trainer(
    plan: RunPlan,
    *,
    callbacks: Sequence[ray.train.UserCallback] = (),
    gpus_per_worker: float | None = None,
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for a RunPlan (not started); see run_training for the options."""
    config = plan.config
    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1.0 if gpus_per_worker is None else gpus_per_worker
    storage_path, filesystem = storage.for_ray(config.storage)
    by_metric = plan.validate and config.epoch_rule == "best"
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                # A refit has no validation metric, and with --model-epoch last the last
                # epoch is the model: keep the latest then.
                checkpoint_score_attribute=config.metric if by_metric else "epoch",
                checkpoint_score_order=config.metric_mode if by_metric else "max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=plan.datasets,
        dataset_config=EvalShardsDataConfig(),
    )


def _read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CHECKPOINT_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def write_curves(history: Sequence[Mapping[str, float]], run_uri: str, metric: str) -> str:
    """Save the per-epoch history as ``curves.json`` and a two-panel ``curves.png``
    (losses; validation metrics) under ``run_uri``. Returns the PNG's URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [dict(r) for r in history]
    payload = {"metric": metric, "epochs": rows}
    text = json.dumps(payload, indent=2, default=float).replace("NaN", "null")
    storage.write_bytes(storage.join(run_uri, CURVES_JSON), text.encode())

    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        left.plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    for key in (
        "val_accuracy",
        "val_balanced_accuracy",
        "val_f1",
        "val_roc_auc",
        "val_patient_recognition_rate",
    ):
        right.plot(epochs, [r.get(key) for r in rows], marker="o", label=key.removeprefix("val_"))
    right.set_xlabel("epoch")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylim(0, 1.02)
    right.set_title("validation (held-out patients)")
    frozen = [r["epoch"] for r in rows if r.get("backbone_frozen")]
    for axis in (left, right):
        if frozen:
            axis.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="0.9", label="backbone frozen")
        if rows:
            axis.axvline(rows[-1].get("best_epoch", epochs[-1]), color="0.5", linestyle="--")
        axis.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    uri = storage.join(run_uri, CURVES_PNG)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def _save_model(
    uri: str,
    weights: Mapping[str, torch.Tensor],
    config: TrainConfig,
    manifest_hash: str,
    epoch: int,
    metrics: Mapping[str, Any],
) -> Any:
    """Write the artifact of ``weights`` at ``uri``: the card records ``config``, the epoch,
    the validation ``metrics`` and the temperature and threshold fitted with them."""
    from breakhis.artifact import ModelCard, save_artifact
    from breakhis.transforms import IMAGENET_MEAN, IMAGENET_STD

    net = build_model(config.arch, weights="none", dropout=config.dropout)
    net.load_state_dict(weights)
    card = ModelCard(
        architecture=config.arch,
        image_size=config.image_size,
        mean=tuple(float(v) for v in IMAGENET_MEAN),
        std=tuple(float(v) for v in IMAGENET_STD),
        dropout=config.dropout,
        magnification=config.magnification,
        config=config.to_dict(),
        manifest_hash=manifest_hash,
        split=config.split,
        epoch=epoch,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        temperature=float(metrics.get("val_temperature", 1.0)),
        threshold=float(metrics.get("val_threshold", 0.5)),
        threshold_rule=config.threshold_rule,
    )
    return save_artifact(uri, net, card)


def finish_refit(
    config: TrainConfig,
    plan: RunPlan,
    result: ray.train.Result,
    fit_seconds: float,
    validated: TrainResult,
) -> TrainResult:
    """Write the refit's (``plan``) last checkpoint as the artifact of the run ``config``
    (STORAGE/NAME/model), with the validated run's metrics, temperature and threshold;
    returns the validated run's TrainResult pointing at it, with ``refit_epochs`` set.

    Raises RuntimeError when the refit produced no checkpoint.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"{plan.config.run_uri}: the refit finished without a checkpoint")
    state = _read_checkpoint(result.checkpoint)
    write_curves(state["history"], plan.config.run_uri, plan.config.metric)
    artifact_uri = storage.join(config.run_uri, ARTIFACT_DIR)
    card = _save_model(
        artifact_uri,
        state["model"],
        config,
        plan.manifest_hash,
        int(state["epoch"]),
        {**validated.best_metrics, "refit_epochs": int(state["epoch"])},
    )
    log.info(
        "refit model %s (%d epochs on training and validation patients) written to %s",
        card.model_id,
        int(state["epoch"]),
        artifact_uri,
    )
    return dataclasses.replace(
        validated,
        artifact_uri=artifact_uri,
        model_id=card.model_id,
        refit_epochs=int(state["epoch"]),
        fit_seconds=validated.fit_seconds + fit_seconds,
    )


def finish_run(plan: RunPlan, result: ray.train.Result, fit_seconds: float) -> TrainResult:
    """Write the artifact of the best checkpoint and the curves; returns the TrainResult.

    Raises RuntimeError when the run produced no checkpoint.
    """
    config = plan.config
    if result.checkpoint is None or not result.best_checkpoints:
        raise RuntimeError(f"{config.run_uri}: the run finished without a checkpoint")
    latest = _read_checkpoint(result.checkpoint)
    history = [dict(r) for r in latest["history"]]
    best_epoch, stopped = kept_epoch(history, config)
    candidates = [(c, m) for c, m in result.best_checkpoints if int(m["epoch"]) == best_epoch]
    if candidates:
        best_ckpt, best_metrics = candidates[0]
    elif history and best_epoch == int(history[-1]["epoch"]):
        best_ckpt, best_metrics = result.checkpoint, history[-1]
    else:  # the best epoch's checkpoint was pruned (e.g. --keep-checkpoints changed on resume)
        sign = 1 if config.metric_mode == "max" else -1
        best_ckpt, best_metrics = max(
            result.best_checkpoints, key=lambda cm: sign * float(cm[1][config.metric])
        )
        best_epoch = int(best_metrics["epoch"])
    state = _read_checkpoint(best_ckpt) if best_ckpt.path != result.checkpoint.path else latest
    # With --refit this model only chose the epoch count: the refit's takes its place.
    artifact_uri = storage.join(config.run_uri, VALIDATED_DIR if config.refit else ARTIFACT_DIR)
    card = _save_model(
        artifact_uri, state["model"], config, plan.manifest_hash, best_epoch, best_metrics
    )
    curves_uri = write_curves(history, config.run_uri, config.metric)
    log.info("model %s (epoch %d) written to %s", card.model_id, best_epoch, artifact_uri)
    return TrainResult(
        run_uri=config.run_uri,
        artifact_uri=artifact_uri,
        curves_uri=curves_uri,
        model_id=card.model_id,
        best_epoch=best_epoch,
        best_metrics=dict(best_metrics),
        last_epoch=int(history[-1]["epoch"]) if history else 0,
        stopped_early=stopped,
        history=tuple(history),
        fit_seconds=fit_seconds,
    )


def open_tracking(plan: RunPlan, parent_run_id: str | None = None) -> tracking.TrackedRun:
    """The MLflow run of ``plan`` (new, or the one the run's folder records): the whole
    config as parameters, tags ``split``, ``manifest_hash`` and ``run_uri``. Raises
    ValueError naming the tracking URI when its store cannot be used."""
    config = plan.config
    assert config.tracking_uri is not None
    return tracking.open_run(
        config.tracking_uri,
        config.run_uri,
        name=config.name,
        params=tracking.config_params(config.to_dict()),
        tags={
            "split": config.split,
            "manifest_hash": plan.manifest_hash,
            "run_uri": config.run_uri,
        },
        parent_run_id=parent_run_id,
    )


def run_training(
    config: TrainConfig,
    *,
    callbacks: Sequence[ray.train.UserCallback] = (),
    gpus_per_worker: float | None = None,
    parent_run_id: str | None = None,
) -> TrainResult:
    """Train (or resume) the run STORAGE/NAME on the current Ray cluster.

    ``callbacks`` go to the Train RunConfig, e.g. ``[TuneReportCallback()]``
    when called from a Ray Tune trial's function. ``gpus_per_worker``
    overrides the one GPU each worker reserves with ``use_gpu`` (a fraction
    lets a sweep pack several small trials on one GPU); it is ignored on CPU.
    With a tracking URI (``config.tracking_uri``, else MLFLOW_TRACKING_URI)
    the run is logged to MLflow (a child of ``parent_run_id`` when given; see
    breakhis.tracking), and a rerun continues the same MLflow run.
    Returns the TrainResult.
    Raises before any worker starts what plan_run raises (and ValueError for a
    tracking store that cannot be used); raises
    ray.train.TrainingFailedError when workers keep failing beyond
    ``max_failures``.
    """
    if config.use_gpu and gpus_per_worker is not None and not 0 < gpus_per_worker <= 1:
        raise ValueError(f"gpus_per_worker must be in (0, 1] with use_gpu, got {gpus_per_worker}")
    config = dataclasses.replace(config, tracking_uri=tracking.resolve_uri(config.tracking_uri))
    plan = plan_run(config, gpus_per_worker=gpus_per_worker)
    if plan.resumed_from_epoch:
        log.info("%s exists: continuing after epoch %d", config.run_uri, plan.resumed_from_epoch)
    tracked = None
    if config.tracking_uri is not None:
        tracked = open_tracking(plan, parent_run_id)
        plan = dataclasses.replace(plan, loop_config={**plan.loop_config, "tracking": tracked})
    try:
        validated = _fit(plan, callbacks=callbacks, gpus_per_worker=gpus_per_worker)
    except BaseException:
        if tracked is not None:
            tracking.fail(tracked)
        raise
    if tracked is not None:
        tracking.finish_training(tracked, validated)
    return validated


def _fit(
    plan: RunPlan,
    *,
    callbacks: Sequence[ray.train.UserCallback],
    gpus_per_worker: float | None,
) -> TrainResult:
    """Run the planned training (and with --refit, the refit); see run_training."""
    config = plan.config
    trainer = make_trainer(plan, callbacks=callbacks, gpus_per_worker=gpus_per_worker)
    started = time.perf_counter()
    result = trainer.fit()
    validated = finish_run(plan, result, time.perf_counter() - started)
    if not config.refit:
        return validated
    # The same recipe from the same initial weights, on every training patient, for the
    # epoch count chosen on validation. Not reported to Tune: the trial was judged on
    # validation already, and a second epoch 1 would confuse its schedulers.
    refit = dataclasses.replace(
        config,
        storage=config.run_uri,
        name=REFIT_DIR,
        epochs=validated.best_epoch,
        patience=0,
        refit=False,
    )
    log.info("refit: %d epochs on training and validation patients", validated.best_epoch)
    refit_plan = plan_run(refit, gpus_per_worker=gpus_per_worker, validate=False)
    started = time.perf_counter()
    refit_result = make_trainer(refit_plan, gpus_per_worker=gpus_per_worker).fit()
    return finish_refit(config, refit_plan, refit_result, time.perf_counter() - started, validated)
