"""The scoring job's pipeline, seen from the driver: the pending units of the plan through
breakhis.score.units.units_dataset, the model shipped once, progress logged.

The model actors get the artifact the driver read and checked (card and weights' bytes,
breakhis.model.artifact.Artifact) through Ray's object store, not its URI: an artifact replaced
while the job runs (a retrain, a sweep rewriting ``best/``) cannot reach an actor started
late (autoscaling, a restart), so one job scores with one model. Shipping rather than
reloading and comparing hashes: a refusal would fail a long job half-way for a change the
job can ignore, and one copy in the object store costs less than a read per actor. Each
actor still checks the hash of what it holds and stamps rows with it
(breakhis.score.units.UnitTilePredictor).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from breakhis import storage
from breakhis.raysession import ensure_ray
from breakhis.score.predict import actor_plan
from breakhis.score.tables import JOURNAL
from breakhis.score.units import Plan, UnitFormat, units_dataset

if TYPE_CHECKING:
    from breakhis.model.artifact import Artifact
    from breakhis.score.config import ScoreConfig

log = logging.getLogger(__name__)


def score_pending(
    config: ScoreConfig, artifact: Artifact, plan: Plan, token: str, plan_folder: str
) -> None:
    """Run the pipeline over the plan's pending units; the workers write the unit files
    and send back one summary row per unit (breakhis.score.units). Raises RuntimeError when
    a unit came back unwritten, and what the pipeline raised (a unit that failed after its
    retries: the job fails, to be rerun)."""
    import ray

    ensure_ray()
    card, predict = artifact.card, config.predict
    max_actors = actor_plan(predict.device, predict.num_actors, predict.cpus_per_actor)[0]
    largest = max(plan.pending["unit_rows"].to_pylist())
    unit_bytes = largest * math.prod(card.tile_geometry.eval_hw) * 3
    # Decoded units waiting for an actor: two per actor, at least 256 MB.
    buffer = config.max_buffer_mb * 2**20 or max(256 * 2**20, 2 * max_actors * unit_bytes)
    fmt = unit_format(config, card, token)
    ds = units_dataset(
        plan.pending,
        fmt=fmt,
        model_uri=config.model,
        artifact=ray.put(artifact),
        options=predict,
        overlay_root=storage.join(config.out, "overlays") if config.overlays else None,
        object_store_limit=buffer,
        plan_folder=plan_folder,
    )
    expected = set(plan.pending["name"].to_pylist())
    written: set[str] = set()
    with Progress(plan.pending_tiles, config.progress_interval_s) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for name, rows, errors in zip(
                batch["name"], batch["rows"], batch["errors"], strict=True
            ):
                written.add(str(name))
                progress.add(int(rows), int(errors))
    missing = sorted(expected - written)
    if missing:
        raise RuntimeError(
            f"{len(missing)} unit(s) were not written (e.g. {missing[:3]}); rerun to score them"
        )


def unit_format(config: ScoreConfig, card, token: str) -> UnitFormat:
    """What the job's files record besides the scores (its model and options); the unit
    files go to the journal (breakhis.score.tables.JOURNAL)."""
    predict = config.predict
    return UnitFormat(
        tiles_uri=storage.join(config.out, JOURNAL),
        token=token,
        model=config.model,
        model_id=card.model_id,
        model_version=card.version,
        method=predict.method,
        map_size=predict.map_size,
        threshold=predict.threshold,
        tta=predict.tta,
        image_size=card.image_size,
        geometry=card.tile_geometry,
        class_names=config.class_names_for(card),
        feature_dim=feature_dim(card.architecture, card.num_classes) if config.features else None,
    )


@functools.lru_cache(maxsize=8)
def feature_dim(architecture: str, num_classes: int) -> int:
    """Length of a tile's embedding for a model of ``architecture``: the input width of its
    classification head (breakhis.model.networks.embedding_layer)."""
    from breakhis.model.networks import build_model, embedding_layer

    model = build_model(architecture, num_classes=num_classes)
    return embedding_layer(model, architecture)[1]


class Progress:
    """Logs tiles done / total, tiles/s and an ETA every ``interval_s`` seconds (from a
    thread, so the log keeps its pace whatever the pipeline does) and once at the end."""

    def __init__(self, total: int, interval_s: float) -> None:
        self.total, self.interval_s = total, interval_s
        self.done = self.errors = self.units = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="score-progress", daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.log()

    def add(self, rows: int, errors: int) -> None:
        with self._lock:
            self.done += rows
            self.errors += errors
            self.units += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.log()

    def line(self) -> str:
        with self._lock:
            done, errors, units = self.done, self.errors, self.units
        elapsed = time.perf_counter() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "unknown"
        return (
            f"scored {done}/{self.total} tiles ({100 * done / max(1, self.total):.1f}%, "
            f"{units} units, {errors} errors), {rate:.1f} tiles/s, ETA {eta}"
        )

    def log(self) -> None:
        log.info("%s", self.line())
