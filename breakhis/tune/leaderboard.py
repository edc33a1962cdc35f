"""A sweep's results: one leaderboard row per trial (its stop reason, best epoch and
metrics, searched options, model), ranked, written as Parquet and CSV; the best trial's
artifact copied; and SweepResult, what ``breakhis tune`` returns."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from breakhis import storage
from breakhis.train.config import TrainConfig
from breakhis.train.epoch import kept_epoch

if TYPE_CHECKING:
    from breakhis.tune.config import SweepConfig

STOP_REASONS: tuple[str, ...] = ("completed", "patience", "asha", "error")
"""Why a trial ended: all its epochs ran; the training run's own early stopping
(``patience``); ASHA stopped it at a rung; it failed."""

LEADERBOARD_PARQUET = "leaderboard.parquet"
LEADERBOARD_CSV = "leaderboard.csv"
_ARTIFACT_FILES = ("model.pt", "model.json")  # the card last: a folder with it is complete


@dataclass(frozen=True)
class SweepResult:
    """What a sweep produced."""

    experiment_uri: str
    """STORAGE/NAME (Tune's experiment, the trials' runs, the leaderboard)."""
    leaderboard_uri: str
    """The leaderboard as Parquet (the CSV sits beside it)."""
    best_trial_id: str
    best_artifact_uri: str
    """STORAGE/NAME/best: the best trial's model artifact."""
    metric: str
    mode: str
    searched: tuple[str, ...]
    """The options the space varied (leaderboard columns)."""
    rows: tuple[dict[str, Any], ...] = field(repr=False)
    """The leaderboard, best first."""
    wall_seconds: float
    """Wall time of Tuner.fit() in this call (a resumed sweep counts only this part)."""
    resumed: bool

    @property
    def trials_per_hour(self) -> float:
        return 3600.0 * len(self.rows) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def stop_counts(self) -> dict[str, int]:
        """Trials per stop reason."""
        return {r: sum(row["stop_reason"] == r for row in self.rows) for r in STOP_REASONS}

    def format_table(self) -> str:
        """The leaderboard for the terminal."""
        header = ["rank", "trial", "stop", "epochs", "best", self.metric, *self.searched]
        lines = []
        for row in self.rows:
            cells = [
                str(row["rank"]),
                row["trial_id"],
                row["stop_reason"],
                str(row["epochs_run"]),
                str(row["best_epoch"]),
                _format_value(row.get(self.metric)),
                *(_format_value(row.get(key)) for key in self.searched),
            ]
            lines.append(cells)
        widths = [max([len(h), *(len(c[i]) for c in lines)]) for i, h in enumerate(header)]
        text = [" ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
        text += [
            " ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines
        ]
        counts = ", ".join(f"{n} {r}" for r, n in self.stop_counts().items() if n)
        text.append(
            f"{len(self.rows)} trials ({counts}) in {self.wall_seconds:.0f} s "
            f"({self.trials_per_hour:.1f} trials/hour){' after resuming' if self.resumed else ''}"
        )
        text.append(
            f"best: {self.best_trial_id}, model at {self.best_artifact_uri}; "
            f"leaderboard at {self.leaderboard_uri}"
        )
        return "\n".join(text)


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _history(result: Any) -> list[dict[str, Any]]:
    """A trial's per-epoch rows (the last report of each epoch), in epoch order."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "epoch" not in frame.columns:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in frame.to_dict("records"):
        epoch = row.get("epoch")
        if epoch is not None and not (isinstance(epoch, float) and math.isnan(epoch)):
            by_epoch[int(epoch)] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _score(value: Any, mode: str) -> float:
    """Larger is better; NaN and missing rank last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value) if mode == "max" else -float(value)


def trial_row(
    result: Any, *, searched: Sequence[str], metric_keys: Sequence[str], config: SweepConfig
) -> dict[str, Any]:
    """One leaderboard row from a Tune Result (ranked later by leaderboard_rows()).

    The stop reason, from the epochs Tune saw: ``error`` when the trial failed;
    ``completed`` when it reported its last epoch; ``patience`` when its own
    early stopping ended it (its history says so); otherwise ``asha``: in a
    finished sweep only the scheduler ends a trial early (never at the last
    epoch). ``artifact_uri`` is set for trials that ran to their end: a run
    ASHA stopped may finish an epoch it had started, but the sweep dropped it.
    """
    train = TrainConfig.from_dict(result.config["train"])
    run_uri = storage.join(config.runs_uri, os.path.basename(result.path.rstrip("/")))
    trial_id = os.path.basename(run_uri).removeprefix("trial-")
    history = _history(result)
    best_epoch, patience_stop = kept_epoch(history, train)
    best = next((r for r in history if int(r["epoch"]) == best_epoch), {})
    epochs_run = int(history[-1]["epoch"]) if history else 0
    if result.error is not None:
        reason = "error"
    elif epochs_run >= train.epochs:
        reason = "completed"
    elif patience_stop:
        reason = "patience"
    else:
        reason = "asha"
    artifact = storage.join(run_uri, "model")
    has_artifact = reason in ("completed", "patience") and storage.exists(
        storage.join(artifact, "model.json")
    )
    row: dict[str, Any] = {
        "rank": 0,
        "trial_id": trial_id,
        "stop_reason": reason,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        **{key: _float_or_none(best.get(key)) for key in metric_keys},
        **{key: result.config["train"][key] for key in searched},
        "seconds": _float_or_none((result.metrics or {}).get("time_total_s")),
        "run_uri": run_uri,
        "artifact_uri": artifact if has_artifact else None,
        "error": str(result.error).strip().splitlines()[0] if result.error is not None else None,
        "config": json.dumps(train.to_dict(), sort_keys=True),
    }
    return row


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def leaderboard_rows(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> list[dict]:
    """The rows ranked by the best value of ``metric`` (errored and unscored trials
    last), ``rank`` filled in from 1."""
    ordered = sorted(
        rows,
        key=lambda r: (r["stop_reason"] == "error", -_score(r.get(metric), mode), r["trial_id"]),
    )
    return [{**row, "rank": i} for i, row in enumerate(ordered, start=1)]


def write_leaderboard(rows: Sequence[dict[str, Any]], experiment_uri: str) -> str:
    """Write the leaderboard as ``leaderboard.parquet`` and ``leaderboard.csv`` under
    ``experiment_uri``. Returns the Parquet file's URI."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(experiment_uri, LEADERBOARD_PARQUET)
    storage.write_bytes(uri, buffer.getvalue())
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    storage.write_bytes(storage.join(experiment_uri, LEADERBOARD_CSV), buffer.getvalue())
    return uri


def copy_artifact(source: str, dest: str) -> None:
    """Copy a model artifact folder (weights first, card last, so a reader of
    ``dest`` never sees a card without its weights). Raises FileNotFoundError
    naming a missing file."""
    storage.delete(storage.join(dest, "model.json"))
    for name in _ARTIFACT_FILES:
        storage.write_bytes(
            storage.join(dest, name), storage.read_bytes(storage.join(source, name))
        )
