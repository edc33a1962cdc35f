"""What runs on each Ray Train worker: ``train_loop_per_worker`` and the pure pieces of an
epoch (optimizer, schedule, loss, one epoch of training, evaluation, BatchNorm
recalibration, the epoch kept, the decision fitted on validation).

Per epoch: ``train_one_epoch`` on the worker's shard of the training data, BatchNorm
statistics recomputed over the epoch's last batches, ``validate_epoch`` on its shard of
the validation patients (predictions gathered, so every rank computes the same metrics
and takes the same early-stopping decision); rank 0 alone writes the checkpoint (a plain
dict: model, optimizer, scheduler, epoch, config, history).
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn

from breakhis import tracking
from breakhis.calibration import choose_threshold, fit_temperature, probabilities
from breakhis.metrics import classification_metrics
from breakhis.model import (
    build_model,
    recompute_batchnorm_stats,
    set_backbone_trainable,
    set_train_mode,
    split_parameters,
    training_batchnorms,
)
from breakhis.train_config import (
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_FILE,
    TrainConfig,
)

log = logging.getLogger(__name__)


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
                    batch_size=cfg.batch_size,
                    prefetch_batches=2,
                    drop_last=True,
                    # Streaming (uncached): a read block holds a few patients; the buffer
                    # mixes many in each batch.
                    local_shuffle_buffer_size=config.get("shuffle_buffer") or None,
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
