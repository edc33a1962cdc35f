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
2. ``train_loop_per_worker`` (breakhis.train.loop) runs on every worker: resume from
   the latest checkpoint if any, then per epoch train on its shard of the training
   data, recompute BatchNorm statistics, validate on its shard of the validation
   patients and fit the temperature and threshold there; rank 0 alone writes the
   checkpoint.
3. The driver takes the epoch ``--model-epoch`` names (the last, or the best by
   ``metric``), writes the model artifact (breakhis.model.artifact) and the training curves
   (PNG and JSON) under ``STORAGE/NAME``; with ``--refit`` it then trains again on the
   training and validation patients for that many epochs and hands over that model.

The options are breakhis.train.config.TrainConfig.
Running again with the same ``storage`` and ``name`` continues from the latest
checkpoint (Ray Train V2 restores a run from its storage folder); a worker
that dies is restarted from the last checkpoint up to ``max_failures`` times.
The same TrainConfig serves a Ray Tune trial: call ``run_training`` from the
trial's function with ``callbacks=[TuneReportCallback()]`` and a per-trial name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch

from breakhis import storage
from breakhis.data.stain_fit import fit_run_stain
from breakhis.model.networks import build_model
from breakhis.raysession import ensure_ray
from breakhis.train import tracking
from breakhis.train.config import (
    CHECKPOINT_CONFIG_FILE,
    REFIT_DIR,
    RESUME_FIXED,
    TrainConfig,
)
from breakhis.train.loop import train_loop_per_worker
from breakhis.train.plan import (
    DATA_CPUS,
    DataPlan,
    RunPlan,
    check_batches,
    plan_data,
    subtype_counts,
)
from breakhis.train.result import TrainResult, finish_refit, finish_run

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- driver


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
    # An option added since that run was written ran as its default then (e.g. --task).
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    old = {**{k: defaults[k] for k in RESUME_FIXED}, **previous["config"]}
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


def _ingest_config(config: TrainConfig, stain: Any = None) -> Any:
    """The run's options for breakhis.data.ingest (an IngestConfig), with its fitted stain
    normaliser (breakhis.data.stain_fit) when it has one."""
    from breakhis.data.ingest_config import IngestConfig

    return IngestConfig(
        stain=stain,
        image_size=config.image_size,
        magnification=config.magnification,
        cache=config.cache,
        augment_strength=config.augment_strength,
        colour_augment=config.colour_augment,
        oversample=config.oversample,
        seed=config.seed,
        geometry=config.geometry,
        eval_view=config.eval_view,
    )


def plan_run(
    config: TrainConfig,
    *,
    gpus_per_worker: float | None = None,
    validate: bool | None = None,
    data: DataPlan | None = None,
) -> RunPlan:
    """Check everything that can be checked on the driver, and build the datasets.

    ``data`` is the run's plan_data (planned here when None). Returns the RunPlan.
    Raises what plan_data raises, ValueError for an incompatible earlier run under
    the same name or weights that do not fit (WeightsError), and ValueError when the
    validation patients have no image. Nothing has started on the workers when it
    raises.

    ``validate`` (default: the config holds validation patients out) False plans a run
    without validation (``--val-fraction 0``, or a refit: the validation patients join
    the training ones); no epoch is validated.
    """
    from breakhis.data.ingest import build_datasets

    validate = config.validates if validate is None else validate
    data = plan_data(config, validate=validate) if data is None else data
    resumed_from = check_resumable(config)

    from breakhis.subtypes import class_names

    torch.manual_seed(config.seed)
    net = build_model(
        config.arch,
        weights=config.weights,
        dropout=config.dropout,
        num_classes=len(class_names(config.task)),
    )
    initial_state = ray.put({k: v.detach().cpu() for k, v in net.state_dict().items()})
    del net

    stain = fit_run_stain(config, data.dest, data.patients.train)
    ingest = build_datasets(
        data.dest,
        data.spec,
        _ingest_config(config, stain),
        # The trainer never sees the test patients: their tiles are not decoded.
        sides=("train", "val") if validate else ("train",),
        patients=data.patients,
        # The workers crop, flip, turn and jitter the canonical tiles on their device.
        augment_on_device=True,
    )
    if validate and ("val" not in ingest.datasets or ingest.num_rows.get("val", 0) == 0):
        raise ValueError(
            f"split {data.spec}: the validation patients have no image at this magnification"
        )
    steps_per_epoch = check_batches(ingest.num_rows["train"], config)
    check_cluster_fits(config, ray.cluster_resources(), gpus_per_worker)
    datasets, weights = _run_datasets(config, ingest, data, validate)
    loop_config = {
        "validate": validate,
        "train": config.to_dict(),
        "class_weights": weights,
        "steps_per_epoch": steps_per_epoch,
        "initial_state": initial_state,
        "shuffle_buffer": ingest.shuffle_buffer,  # rows; 0: cached, already shuffled
    }
    return RunPlan(
        config=config,
        datasets=datasets,
        loop_config=loop_config,
        manifest_hash=ingest.manifest_hash,
        resumed_from_epoch=resumed_from,
        data=data,
        stain=stain,
    )


def _run_datasets(
    config: TrainConfig, ingest: Any, data: DataPlan, validate: bool
) -> tuple[dict[str, ray.data.Dataset], list[float]]:
    """The datasets the workers get and the loss's class weights. Training rows: the
    canonical tile, its label, its key and its augmentation draws (the workers augment on
    their device); validation rows: tile, label, patient. A --task subtype run's training
    ``label`` is the subtype class (0..7), its validation rows carry ``subtype_class`` beside
    the binary ``label``, and its weights are n / (8 n_c) over the training images as the
    model sees them (an oversampled class's tiles, by benign/malignant, counted as often)."""
    from breakhis.data.transforms import AUG_COLOUR, AUG_GEOMETRY, TrainTransform

    label = "subtype_class" if config.task == "subtype" else "label"
    train_columns = ["image", label, "key", AUG_GEOMETRY]
    if TrainTransform(
        strength=config.augment_strength, colour=config.colour_augment
    ).changes_colour:
        train_columns.append(AUG_COLOUR)
    train = ingest.datasets["train"].select_columns(train_columns)
    datasets = {"train": train.rename_columns({label: "label"}) if label != "label" else train}
    if validate:
        columns = ["image", "label", "patient_id"]
        columns += ["subtype_class"] if config.task == "subtype" else []
        datasets["val"] = ingest.datasets["val"].select_columns(columns)
    if config.task != "subtype":
        return datasets, [float(w) for w in ingest.class_weights]
    from breakhis.subtypes import SUBTYPE_CLASS_NAMES, binary_labels, class_weights

    counts = subtype_counts(data.dest.manifest, data.patients.train, config.magnification)
    copies = ingest.oversample_factor
    labels = binary_labels(range(len(SUBTYPE_CLASS_NAMES)))
    seen = [n * copies[int(label)] for n, label in zip(counts, labels, strict=True)]
    log.info(
        "subtype training images: %s",
        ", ".join(f"{name} {n}" for name, n in zip(SUBTYPE_CLASS_NAMES, counts, strict=True)),
    )
    return datasets, [float(w) for w in class_weights(seen)]


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
    rank) and ``val`` into unequal ones, so that no validation image is dropped; every
    dataset keeps its order (``preserve_order``), so that a seed fixes the batches."""

    def _resolve_execution_options(self, dataset_name: str) -> Any:
        options = super()._resolve_execution_options(dataset_name)
        # Without it blocks come out in the order their tasks finish, and the same seed
        # gives other batches on every run (issue 23: a seeded run moved by 0.2).
        options.preserve_order = True
        return options

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
    breakhis.train.tracking), and a rerun continues the same MLflow run.
    Returns the TrainResult. Connects to Ray (breakhis.raysession.ensure_ray) only
    after plan_data's checks.
    Raises before any worker starts what plan_run raises (and ValueError for a
    tracking store that cannot be used); raises
    ray.train.TrainingFailedError when workers keep failing beyond
    ``max_failures``.
    """
    if config.use_gpu and gpus_per_worker is not None and not 0 < gpus_per_worker <= 1:
        raise ValueError(f"gpus_per_worker must be in (0, 1] with use_gpu, got {gpus_per_worker}")
    config = dataclasses.replace(config, tracking_uri=tracking.resolve_uri(config.tracking_uri))
    data = plan_data(config)  # the manifest is read and the split selected once, before Ray
    ensure_ray()
    plan = plan_run(config, gpus_per_worker=gpus_per_worker, data=data)
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
    dest = plan.data.dest if plan.data is not None else None
    refit_data = plan_data(refit, validate=False, dest=dest)
    refit_plan = plan_run(refit, gpus_per_worker=gpus_per_worker, validate=False, data=refit_data)
    started = time.perf_counter()
    refit_result = make_trainer(refit_plan, gpus_per_worker=gpus_per_worker).fit()
    return finish_refit(config, refit_plan, refit_result, time.perf_counter() - started, validated)
