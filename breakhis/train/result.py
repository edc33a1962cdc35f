"""What a training run hands over: the model artifact of the epoch it keeps (or of the
refit), the training curves (``curves.json`` and ``curves.png``) and TrainResult."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray.train
import torch

from breakhis import storage
from breakhis.model.networks import build_model
from breakhis.train.config import (
    ARTIFACT_DIR,
    CHECKPOINT_FILE,
    CURVES_JSON,
    CURVES_PNG,
    VAL_METRICS,
    VALIDATED_DIR,
    TrainConfig,
)
from breakhis.train.epoch import kept_epoch

if TYPE_CHECKING:
    from breakhis.train.plan import RunPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_uri: str
    """STORAGE/NAME."""
    artifact_uri: str
    """The model artifact (load with breakhis.model.artifact.load_artifact)."""
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
        present = {k for row in self.history for k in row}
        keys = ["train_loss", *(k for k in VAL_METRICS if k in present or "subtype" not in k)]
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


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
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
    subtype = (
        ("val_subtype_balanced_accuracy",) if any("val_subtype_loss" in r for r in rows) else ()
    )
    for key in (
        "val_accuracy",
        "val_balanced_accuracy",
        "val_f1",
        "val_roc_auc",
        "val_patient_recognition_rate",
        *subtype,
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


def save_model(
    uri: str,
    weights: Mapping[str, torch.Tensor],
    config: TrainConfig,
    manifest_hash: str,
    epoch: int,
    metrics: Mapping[str, Any],
    stain: Any = None,
) -> Any:
    """Write the artifact of ``weights`` at ``uri``: the card records ``config``, the epoch,
    the validation ``metrics``, the temperature and threshold fitted with them, and the run's
    ``stain`` normaliser (a breakhis.data.stain.StainNormalizer, or None)."""
    from breakhis.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.subtypes import class_names

    if not metrics.get("val_decision_fitted"):
        metrics = {**metrics, "val_temperature": 1.0, "val_threshold": 0.5}
    names = class_names(config.task)
    net = build_model(config.arch, weights="none", dropout=config.dropout, num_classes=len(names))
    net.load_state_dict(weights)
    card = ModelCard(
        class_names=names,
        num_classes=len(names),
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
        # "" marks a fixed decision (argmax), as the card documents.
        threshold_rule=config.threshold_rule if metrics.get("val_decision_fitted") else "",
        stain=stain.to_dict() if stain is not None else {},
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
    state = read_checkpoint(result.checkpoint)
    write_curves(state["history"], plan.config.run_uri, plan.config.metric)
    artifact_uri = storage.join(config.run_uri, ARTIFACT_DIR)
    card = save_model(
        artifact_uri,
        state["model"],
        config,
        plan.manifest_hash,
        int(state["epoch"]),
        {**validated.best_metrics, "refit_epochs": int(state["epoch"])},
        stain=plan.stain,
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
    latest = read_checkpoint(result.checkpoint)
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
    state = read_checkpoint(best_ckpt) if best_ckpt.path != result.checkpoint.path else latest
    # With --refit this model only chose the epoch count: the refit's takes its place.
    artifact_uri = storage.join(config.run_uri, VALIDATED_DIR if config.refit else ARTIFACT_DIR)
    card = save_model(
        artifact_uri,
        state["model"],
        config,
        plan.manifest_hash,
        best_epoch,
        best_metrics,
        stain=plan.stain,
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
