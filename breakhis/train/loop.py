"""What runs on each Ray Train worker: ``train_loop_per_worker``, with validation over
the worker's shard, BatchNorm recalibration, checkpoints and reports; the pure pieces of
an epoch (optimizer, schedule, loss, one pass of training, evaluation, the epoch kept)
are breakhis.train.epoch's.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn

from breakhis import storage
from breakhis.data.device_augment import DeviceAugment
from breakhis.data.geometry import TileGeometry
from breakhis.data.transforms import max_shift
from breakhis.model.networks import (
    build_model,
    recompute_batchnorm_stats,
    set_backbone_trainable,
    set_train_mode,
    split_parameters,
    training_batchnorms,
)
from breakhis.stats.metrics import classification_metrics
from breakhis.train import tracking
from breakhis.train.config import (
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_FILE,
    TrainConfig,
)
from breakhis.train.epoch import (
    EpochStats,
    Predictions,
    early_stopping,
    evaluate,
    fit_decision,
    kept_epoch,
    make_loss,
    make_optimizer,
    make_scheduler,
    prepare_images,
    train_one_epoch,
)
from breakhis.train.prefetch import DeviceTransfer, EpochPrefetcher, lookahead_batches

log = logging.getLogger(__name__)


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

    Returns ``val_<metric>`` for every metric (a subtype model's binary ones from
    P(malignant), and its breakhis.subtypes.SUBTYPE_METRIC_NAMES), plus ``val_temperature``,
    ``val_threshold`` and ``val_decision_fitted`` (1.0 when they were fitted, 0.0 for
    argmax) from these predictions (fit_decision).
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
    temperature, threshold, fitted = fit_decision(predictions, cfg.threshold_rule)
    if predictions.logits is not None:  # --task subtype: the eight-class metrics too
        from breakhis.subtypes import epoch_metrics

        val = {**val, **epoch_metrics(predictions.classes, predictions.logits)}
    return {
        **{f"val_{k}": float(v) for k, v in val.items()},
        "val_temperature": temperature,
        "val_threshold": threshold,
        "val_decision_fitted": float(fitted),
    }


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
    same model. See breakhis.model.networks.recompute_batchnorm_stats for why.

    Returns the number of batches this rank used (0 changes nothing).
    """
    import torch.distributed as dist

    layers = training_batchnorms(net)
    used = recompute_batchnorm_stats(
        net, (prepare_images(x, device, channels_last) for x in images), layers
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


def _resume(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[list[dict[str, float]], int]:
    """Load the latest checkpoint of the run, if any, into ``net``, ``optimizer`` and
    ``scheduler``. Returns (history so far, first epoch to train)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return [], 1
    state = load_checkpoint_state(checkpoint)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return list(state["history"]), int(state["epoch"]) + 1


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    # Optimizer state loaded on CPU must live beside its parameters.
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                param_state[key] = value.to(device)


def _epoch_row(
    epoch: int,
    all_stats: Sequence[EpochStats],
    lr: float,
    frozen: bool,
    seconds: float,
    val: Mapping[str, float],
) -> dict[str, float]:
    """What an epoch reports: the training statistics of every worker, summed (images,
    throughput) or worst (seconds), and the validation metrics."""
    images = sum(s.images for s in all_stats)
    return {
        "epoch": epoch,
        "train_loss": sum(s.loss * s.images for s in all_stats) / max(images, 1),
        "lr": lr,
        "backbone_frozen": float(frozen),
        "train_images": images,
        "train_seconds": max(s.seconds for s in all_stats),
        "train_first_batch_s": max(s.first_batch_s for s in all_stats),
        "train_wait_s": max(s.wait_s for s in all_stats),
        "train_images_per_s": sum(s.images_per_s for s in all_stats),
        "train_images_per_s_per_worker": sum(s.images_per_s for s in all_stats) / len(all_stats),
        "epoch_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        **val,
    }


def _report(row: dict[str, float], state: dict[str, Any] | None, cfg: TrainConfig) -> None:
    """Report the epoch's ``row`` to Ray Train, with the checkpoint of ``state`` (world
    rank 0 only; None on the other ranks)."""
    epoch = int(row["epoch"])
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if state is not None:
            _save_checkpoint(folder, state, cfg, epoch)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")


def _log_epoch(cfg: TrainConfig, row: Mapping[str, float]) -> None:
    if "val_loss" not in row:  # no validation patients (--val-fraction 0, or a refit)
        log.info(
            "epoch %d/%d: train loss %.4f, lr %.3g (%.0f img/s)",
            row["epoch"],
            cfg.epochs,
            row["train_loss"],
            row["lr"],
            row["train_images_per_s"],
        )
        return
    log.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, %s %.4f, patient rate %.3f (%.0f img/s)",
        row["epoch"],
        cfg.epochs,
        row["train_loss"],
        row.get("val_loss", math.nan),
        cfg.metric,
        row.get(cfg.metric, math.nan),
        row.get("val_patient_recognition_rate", math.nan),
        row["train_images_per_s"],
    )


@dataclass
class _Worker:
    """What one worker trains with (built by _setup from run_training's config)."""

    cfg: TrainConfig
    rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    history: list[dict[str, float]]
    start_epoch: int
    shuffle_buffer: int = 0
    """Rows of the local shuffle buffer the training batches come through; 0: none."""
    augment: DeviceAugment | None = None
    """Makes the training tiles of a batch on the device from its canonical tiles and draws."""

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """What _save_checkpoint writes after ``epoch``."""
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "history": self.history,
        }


def _setup(config: dict[str, Any]) -> _Worker:
    """Seed, build the model from the driver's initial state, the optimizer, scheduler
    and loss, and resume from the run's latest checkpoint if there is one."""
    cfg = TrainConfig.from_dict(config["train"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    channels_last = on_gpu and cfg.channels_last
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed * 1000 + rank)

    from breakhis.subtypes import class_names

    num_classes = len(class_names(cfg.task))
    net = build_model(cfg.arch, weights="none", dropout=cfg.dropout, num_classes=num_classes)
    net.load_state_dict(ray.get(config["initial_state"]))
    backbone, head = split_parameters(net, cfg.arch)
    optimizer = make_optimizer(cfg, backbone, head)
    scheduler = make_scheduler(optimizer, cfg, config["steps_per_epoch"])
    history, start_epoch = _resume(net, optimizer, scheduler)
    if start_epoch > 1 and rank == 0:
        log.info("resuming %s at epoch %d of %d", cfg.name, start_epoch, cfg.epochs)
    if cfg.trace_dir and start_epoch == 1 and rank == 0:
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        storage.write_bytes(storage.join(cfg.trace_dir, "initial_state.pt"), buffer.getvalue())
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    _optimizer_to(optimizer, device)
    return _Worker(
        cfg=cfg,
        rank=rank,
        device=device,
        amp_dtype=torch.bfloat16 if (on_gpu and cfg.amp) else None,
        channels_last=channels_last,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=make_loss(cfg, config["class_weights"]).to(device),
        history=history,
        start_epoch=start_epoch,
        shuffle_buffer=int(config.get("shuffle_buffer") or 0),
        augment=DeviceAugment(
            size=cfg.image_size,
            max_shift=max_shift(cfg.augment_strength, cfg.image_size)
            if cfg.geometry == "square"
            else 0,
        ),
    )


def _canonical_hw(cfg: TrainConfig) -> tuple[int, int]:
    """(height, width) of the uint8 tiles the training batches carry."""
    return TileGeometry(size=cfg.image_size, geometry=cfg.geometry).canonical_hw


def training_batches(
    shard: ray.data.DataIterator,
    *,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    device: torch.device | str = "auto",
) -> Iterable[dict[str, torch.Tensor]]:
    """The torch batches of one epoch of a worker's training ``shard``, as the job takes them
    (the ceiling benchmark iterates the same): full batches only, through a local shuffle
    buffer of ``shuffle_buffer`` rows (0: none) seeded by ``seed`` and ``epoch``, on
    ``device`` ("auto": Ray Train's device of the calling worker; name it when calling from
    another thread, as EpochPrefetcher does).

    Without Ray's prefetch (``prefetch_batches=0``): its window yields a block only after
    fetching the next one, so a pool reached the worker one pool late (the first batch of a
    two-pool epoch came when the whole epoch was made: 0.48 s against 0.30 s in the ceiling
    benchmark). The caller looks ahead instead (EpochPrefetcher, lookahead_batches)."""
    return shard.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        prefetch_batches=0,
        drop_last=True,
        # A read block (streaming) holds a few patients, a cached block is a fixed part of
        # the data: the buffer mixes many blocks in each batch, seeded anew each epoch.
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=(seed * 100_003 + epoch) if shuffle_buffer else None,
    )


def _run_epoch(
    w: _Worker,
    model: nn.Module,
    frozen: bool,
    batches: Iterable[Mapping[str, torch.Tensor]],
    val_shard: Any | None,
    epoch: int,
    started: float,
) -> dict[str, float]:
    """Train one epoch on ``batches`` (this worker's shard of the epoch), recompute BatchNorm
    statistics, validate (when there is a validation shard) and gather every worker's
    statistics. Returns the epoch's row (see _epoch_row)."""
    cfg, net = w.cfg, w.net
    set_train_mode(net, cfg.arch, backbone_frozen=frozen)
    recent: deque[torch.Tensor] = deque(maxlen=cfg.bn_recalibration_batches)
    trace: list[dict[str, Any]] | None = [] if cfg.trace_dir else None
    stats = train_one_epoch(
        model,
        batches,
        optimizer=w.optimizer,
        scheduler=w.scheduler,
        loss_fn=w.loss_fn,
        device=w.device,
        amp_dtype=w.amp_dtype,
        channels_last=w.channels_last,
        trace=trace,
        augment=w.augment,
        recent=recent,
    )
    if trace is not None:
        name = f"epoch_{epoch:04d}_rank_{w.rank}.json"
        storage.write_bytes(storage.join(cfg.trace_dir, name), json.dumps(trace).encode())
    recalibrate_batchnorm(net, recent, device=w.device, channels_last=w.channels_last)
    recent.clear()
    val = {}
    if val_shard is not None:
        val = validate_epoch(
            net,
            val_shard,
            cfg,
            device=w.device,
            amp_dtype=w.amp_dtype,
            channels_last=w.channels_last,
        )
    _check_in_sync(net, epoch)
    lr = w.optimizer.param_groups[1]["lr"]
    seconds = time.perf_counter() - started
    return _epoch_row(epoch, _all_gather(stats), lr, frozen, seconds, val)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (see the module docstring).

    ``config`` is what run_training builds: ``train`` (TrainConfig as a dict),
    ``class_weights``, ``steps_per_epoch``, ``initial_state`` (an object
    ref to the model's starting state dict) and ``tracking`` (the MLflow run
    rank 0 logs each epoch to, or None).
    """
    w = _setup(config)
    cfg = w.cfg
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("validate", True) else None
    _, stop = early_stopping(w.history, cfg.metric, cfg.metric_mode, cfg.patience)
    if stop or w.start_epoch > cfg.epochs:
        return
    # Each epoch's first batches are fetched while the previous epoch ends (breakhis.train.
    # prefetch): Ray Data's per-epoch start no longer waits in front of the first step.
    # On a GPU the prefetch thread copies the batches on a stream of its own (DeviceTransfer).
    on_gpu = w.device.type == "cuda"
    prefetcher = EpochPrefetcher(
        lambda e: training_batches(
            train_shard,
            batch_size=cfg.batch_size,
            shuffle_buffer=w.shuffle_buffer,
            seed=cfg.seed,
            epoch=e,
            device="cpu" if on_gpu else w.device,
        ),
        first=w.start_epoch,
        last=cfg.epochs,
        depth=lookahead_batches(cfg.batch_size * 3 * math.prod(_canonical_hw(cfg))),
        transfer=DeviceTransfer(w.device) if on_gpu else None,
    )
    try:
        _train_epochs(w, config, prefetcher, val_shard)
    finally:
        prefetcher.close()


def _train_epochs(
    w: _Worker,
    config: dict[str, Any],
    prefetcher: EpochPrefetcher,
    val_shard: Any | None,
) -> None:
    """train_loop_per_worker's epochs, from w.start_epoch until the last or an early stop."""
    cfg, rank = w.cfg, w.rank
    tracked: tracking.TrackedRun | None = config.get("tracking")
    model: nn.Module | None = None
    frozen: bool | None = None
    stop = False
    for epoch in range(w.start_epoch, cfg.epochs + 1):
        if stop:
            break
        started = time.perf_counter()
        if frozen != (epoch <= cfg.epochs_frozen):
            frozen = epoch <= cfg.epochs_frozen
            set_backbone_trainable(w.net, cfg.arch, trainable=not frozen)
            # DDP registers the parameters that require grad when it is built, so a
            # change of what trains needs a new wrapper (the old one must go first).
            model = None
            gc.collect()
            model = _wrap(w.net, compile_model=cfg.compile)
        assert model is not None
        batches = prefetcher.batches(epoch)
        row = _run_epoch(w, model, bool(frozen), batches, val_shard, epoch, started)
        w.history.append(row)
        best_epoch, stop = kept_epoch(w.history, cfg)
        row["best_epoch"] = best_epoch
        if rank == 0:
            _log_epoch(cfg, row)
        _report(row, w.checkpoint_state(epoch) if rank == 0 else None, cfg)
        if tracked is not None and rank == 0:  # once checkpointed; earlier epochs if missing
            tracking.log_epochs(tracked, w.history)
        if stop and rank == 0:
            log.info(
                "early stop after epoch %d: no better %s than epoch %d for %d epochs",
                epoch,
                cfg.metric,
                best_epoch,
                cfg.patience,
            )
