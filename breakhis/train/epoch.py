"""The pure pieces of a training epoch, with explicit arguments and no Ray: optimizer,
learning-rate schedule, loss, one pass over the training batches, evaluation, early
stopping, the epoch kept and the decision (temperature, threshold) fitted on validation.
breakhis.train.loop puts them together on each Ray Train worker; the train benchmark's
plain PyTorch loop runs the same ones."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from breakhis.stats.calibration import choose_threshold, fit_temperature, probabilities
from breakhis.train.config import TrainConfig


@dataclass(frozen=True)
class EpochStats:
    """What one pass over the training data did on this worker."""

    loss: float
    """Mean training loss per image."""
    images: int
    steps: int
    seconds: float
    first_batch_s: float = 0.0
    """Seconds from the start of the pass until the first batch was in hand (the iterator's
    start-up: a per-epoch cost)."""
    wait_s: float = 0.0
    """Seconds blocked on the iterator for every later batch (steady-state input stalls);
    the rest of ``seconds`` is the steps' own (user) time."""

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
    logits: np.ndarray | None = None
    """A subtype model's [N, 8] logits (None for a binary model); its ``margins`` are then
    logsumexp(malignant) - logsumexp(benign), the logit of P(malignant) (breakhis.subtypes)."""
    classes: np.ndarray | None = None
    """A subtype model's true subtype class per image (None for a binary model)."""

    @classmethod
    def concat(cls, parts: Sequence[Predictions]) -> Predictions:
        def joined(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(
            margins=np.concatenate([p.margins for p in parts]),
            probs=np.concatenate([p.probs for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            patient_ids=np.concatenate([p.patient_ids for p in parts]),
            logits=joined("logits"),
            classes=joined("classes"),
        )


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


def prepare_images(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    from breakhis.data.transforms import normalize

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
    trace: list[dict[str, Any]] | None = None,
    augment: Callable[[Mapping[str, torch.Tensor], torch.device], torch.Tensor] | None = None,
    recent: deque[torch.Tensor] | None = None,
) -> EpochStats:
    """One pass over ``batches`` (``image``: uint8 NCHW, ``label``: int64), one optimizer
    and scheduler step per batch. The caller puts ``model`` in train mode.

    ``augment`` (breakhis.data.device_augment.DeviceAugment) makes each batch's training tiles
    on ``device`` from its canonical tiles and draws; ``recent`` keeps the uint8 training
    tiles of the last steps (BatchNorm recalibration).

    ``trace``, when given, gets one dict per step: the batch's ``key`` column (the tiles'
    row keys, breakhis.data.ingest.row_key), its labels, the loss and every parameter group's
    learning rate of the step (one device sync per step: for audits, not for speed).

    Returns the EpochStats of this process. Raises FloatingPointError when the
    loss becomes NaN or infinite (a diverged run should stop, not checkpoint).
    """
    loss_sum = torch.zeros((), device=device)
    images = steps = 0
    started = time.perf_counter()
    waits = _TimedIterator(batches)
    for batch in waits:
        tiles = augment(batch, device) if augment is not None else batch["image"]
        if recent is not None and recent.maxlen:
            recent.append(tiles)
        x = prepare_images(tiles, device, channels_last)
        y = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trace is not None:
            trace.append(
                {
                    "keys": batch["key"].tolist() if "key" in batch else [],
                    "labels": y.tolist(),
                    "loss": float(loss),
                    "lr": [float(g["lr"]) for g in optimizer.param_groups],
                }
            )
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        images += int(y.shape[0])
        steps += 1
    total = float(loss_sum)  # one device sync per epoch, not per step
    seconds = time.perf_counter() - started
    if not math.isfinite(total):
        raise FloatingPointError(f"training loss is {total} after {steps} steps; lower --lr")
    return EpochStats(
        loss=total / max(images, 1),
        images=images,
        steps=steps,
        seconds=seconds,
        first_batch_s=waits.first_s,
        wait_s=waits.later_s,
    )


class _TimedIterator:
    """Iterate ``batches`` and time each wait for the next one: the first apart (the
    iterator's start-up), the later ones summed (input stalls of the steady state)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self._batches = iter(batches)
        self.first_s = 0.0
        self.later_s = 0.0
        self._count = 0

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self) -> Any:
        started = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            waited = time.perf_counter() - started
            if self._count == 0:
                self.first_s = waited
            else:
                self.later_s += waited
            self._count += 1


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
        x = prepare_images(torch.as_tensor(batch["image"]), device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
            logits = model(x)
        logits = logits.float()
        if logits.shape[1] != 2:
            parts.append(_subtype_predictions(logits, batch))
            continue
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


def _subtype_predictions(logits: torch.Tensor, batch: Mapping[str, Any]) -> Predictions:
    """Predictions of a subtype model's ``logits`` (float32, [N, 8]): the binary margin is
    the logit of P(malignant) = the sum of the malignant four's softmax (breakhis.subtypes);
    the batch carries the true ``subtype_class`` beside the binary ``label``."""
    from breakhis.subtypes import SUBTYPE_CLASS_NAMES, malignant_indices

    malignant = malignant_indices(SUBTYPE_CLASS_NAMES)
    benign = [i for i in range(logits.shape[1]) if i not in malignant]
    margins = torch.logsumexp(logits[:, malignant], 1) - torch.logsumexp(logits[:, benign], 1)
    margins_np = margins.cpu().numpy().astype(np.float64)
    return Predictions(
        margins=margins_np,
        probs=torch.sigmoid(margins.double()).cpu().numpy(),
        labels=np.asarray(batch["label"]).astype(np.int64),
        patient_ids=np.asarray(batch["patient_id"]).astype(str),
        logits=logits.cpu().numpy().astype(np.float64),
        classes=np.asarray(batch["subtype_class"]).astype(np.int64),
    )


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


MIN_DECISION_PATIENTS = 5
"""Validation patients of each class below which no temperature or threshold is fitted:
fitted on fewer (the paper-sized splits' ~5 validation patients, 2 of them benign), the
threshold ranged 0.23-0.92 across splits, a worse decision than argmax."""


def fit_decision(predictions: Predictions, rule: str) -> tuple[float, float, bool]:
    """``(temperature, threshold, fitted)`` for validation predictions.

    ``rule`` ``argmax`` gives ``(1.0, 0.5, False)``. Any other rule (breakhis.stats.calibration's
    THRESHOLD_RULES) fits the temperature that minimises the predictions' log-likelihood,
    then the threshold on the calibrated probabilities, when the predictions hold at least
    MIN_DECISION_PATIENTS patients of each class; with fewer it falls back to argmax
    (``fitted`` False).
    """
    if rule == "argmax" or min(patients_per_class(predictions)) < MIN_DECISION_PATIENTS:
        return 1.0, 0.5, False
    if predictions.logits is not None:
        # A subtype model: the temperature divides all eight logits, and P(malignant) stays
        # the sum of the malignant four at every temperature (breakhis.subtypes).
        from breakhis.stats.calibration import fit_subtype_temperature, subtype_probabilities

        temperature = fit_subtype_temperature(predictions.logits, predictions.labels)
        calibrated = subtype_probabilities(predictions.logits, temperature)
        return temperature, choose_threshold(calibrated, predictions.labels, rule), True
    temperature = fit_temperature(predictions.margins, predictions.labels)
    calibrated = probabilities(predictions.margins, temperature)
    return temperature, choose_threshold(calibrated, predictions.labels, rule), True


def patients_per_class(predictions: Predictions) -> tuple[int, int]:
    """Distinct (benign, malignant) patients among ``predictions`` (a patient's label is
    that of its images)."""
    pairs = set(zip(predictions.patient_ids.tolist(), predictions.labels.tolist(), strict=True))
    return (
        sum(1 for _, label in pairs if label == 0),
        sum(1 for _, label in pairs if label == 1),
    )
