"""Running a model artifact over tiles with Ray Data: the one inference engine of
``breakhis score`` and ``breakhis evaluate``.

Pipeline (streaming): the caller's source blocks (rows of breakhis.data.inputs.INPUT_SCHEMA
plus a ``unit`` column) -> ``decode_tiles`` (breakhis.data.tile_decode) reads and decodes
tiles in CPU tasks (half a
CPU each: reads from S3 wait on the network, and a resource request different from the
actors' keeps Ray from fusing decoding into the model actors) -> ``TilePredictor`` holds
the model in an actor pool (``ActorPoolStrategy``, one GPU per actor when the cluster has
GPUs), loads it once per actor, predicts (optionally with test-time augmentation) and
computes the attribution maps in the same actor. A bad tile becomes a row with an
``error``, never an exception; a transient storage error fails its task, which Ray retries
(RETRIES times, as it restarts an actor: never forever).

The decode (breakhis.data.imaging.decode_rgb: the whole tile, bilinear, to a square) and the
normalisation (breakhis.data.transforms.normalize with the card's mean and std) are the ones
training validates with, so a model sees a tile the same way in every job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from breakhis import faults, storage
from breakhis.data.geometry import TileGeometry
from breakhis.data.tile_decode import decode_tiles  # noqa: F401 (re-exported: evaluate uses it)
from breakhis.score.predict_config import PredictOptions

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

DECODE_CPUS = 0.5
"""CPUs Ray reserves per decode task (reads from S3 wait on the network)."""
RETRIES = 2
"""Retries of a decode task (its worker died, or a transient storage error outlasted the
read's own retries) and restarts of a model actor, each task of it retried as often:
bounded, so that a tile that kills its worker fails the job, never retries forever."""
_TTA_VIEWS = 8  # the dihedral group: 4 rotations by 90 degrees, each also flipped


# --------------------------------------------------------------------------- the model (actors)


class TilePredictor:
    """Ray Data callable class: the model, loaded once per actor, over batches of tiles.

    The model is ``artifact`` when given (a breakhis.model.artifact.Artifact or a Ray ObjectRef
    of one: the weights the driver checked), else read from ``model_uri``; ``model_id`` is
    the hash of the weights loaded. Returns per tile: uri, unit, ``prob`` (float32, NaN for a bad tile; the softmax
    of the logits over the model's temperature, summed over the malignant classes),
    ``prob_uncalibrated`` (at temperature 1), ``class_probs`` ([N, K] float32: every
    class's probability after the temperature, in the card's ``class_names`` order),
    ``target`` (int8 class explained, -1 without a map), ``map`` (S x S
    float32 in [-1, 1]), ``scale`` (float32 largest |value| of the raw map,
    NaN without a map), ``overlay`` (URI or "") and ``error``; with ``features``, also
    ``embedding`` ([N, D] float32, NaN for a bad tile): the input of the model's
    classification head (breakhis.model.networks.embedding_layer) from the forward pass that
    gave the probabilities (averaged over the views with TTA, as the probabilities are).
    """

    def __init__(
        self,
        *,
        model_uri: str,
        method: str | None,
        map_size: int,
        tta: bool,
        threshold: float,
        device: str,
        torch_threads: int,
        overlay_root: str | None,
        amp: bool = True,
        ig_steps: int,
        occlusion_window: int,
        lime_samples: int,
        lime_grid: int,
        artifact: Any = None,
        features: bool = False,
    ) -> None:
        import torch

        from breakhis.model.networks import embedding_layer, last_conv_layer

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: this actor sees no CUDA device")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.model, card, self.model_id = _load_model(model_uri, artifact, self.device)
        for param in self.model.parameters():
            param.requires_grad_(False)  # attributions need input gradients only
        # On a GPU, as in training: bf16 autocast on tensor cores, channels_last for cuDNN,
        # cuDNN picking its fastest kernels for the (fixed) batch shape.
        self.amp = amp and self.device.type == "cuda"
        self.pin_memory = self.device.type == "cuda"  # copy from page-locked memory
        self._local = threading.local()  # per calling thread: its page-locked buffer
        if self.amp:
            self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.layer = last_conv_layer(self.model, card.architecture)
        self.features = features
        if features:
            head, self.feature_dim = embedding_layer(self.model, card.architecture)
            head.register_forward_pre_hook(self._capture)
        self.mean, self.std = tuple(card.mean), tuple(card.std)
        # P(malignant) sums these classes' probabilities: [malignant] for a binary model,
        # the four carcinomas for a subtype one (breakhis.subtypes).
        self.malignant_classes = card.malignant_indices
        self.malignant = self.malignant_classes[-1]
        self.num_classes = card.num_classes
        self.temperature = float(card.temperature)
        self.method = method
        self.map_size = map_size
        self.tta = tta
        self.threshold = threshold
        self.overlay_root = overlay_root
        self.options = {
            "ig_steps": ig_steps,
            "occlusion_window": occlusion_window or None,
            "lime_samples": lime_samples,
            "lime_grid": lime_grid,
        }

    def _capture(self, _module, inputs) -> None:
        """Forward pre-hook of the head: keep its input while a pass of this thread captures
        (the probability pass only: attribution methods run the model again)."""
        captured = getattr(self._local, "embeddings", None)
        if captured is not None:
            captured.append(inputs[0].detach().flatten(1).float())

    def _inputs(self, images: np.ndarray):
        """The model's input for uint8 (N, H, W, 3) ``images`` on the device: one host copy
        at most (into a page-locked buffer this thread reuses, on CUDA), then uint8 crosses
        the bus (4x less than float32) and is normalised there."""
        import torch

        from breakhis.data.transforms import normalize

        if self.pin_memory:
            x = self._staging(images.shape)
            x.numpy()[...] = images  # the one host copy, into memory the GPU reads directly
        else:
            with warnings.catch_warnings():
                # Ray's batches are read-only; the uint8 tensor is only read (normalize).
                warnings.filterwarnings("ignore", message="The given NumPy array is not writ")
                x = torch.from_numpy(images)
        x = normalize(x.to(self.device, non_blocking=True).permute(0, 3, 1, 2), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.amp else x

    def _staging(self, shape: tuple[int, ...]):
        """A page-locked uint8 tensor of ``shape``, a view of this thread's reused buffer
        (grown when too small). Safe to overwrite on the next call: every call waits for its
        results (``.cpu()``), so the copy out of it has finished by then."""
        import torch

        size = int(np.prod(shape))
        buffer = getattr(self._local, "staging", None)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.uint8).pin_memory()
            self._local.staging = buffer
        return buffer[:size].view(shape)

    def _autocast(self):
        """bf16 autocast on CUDA when ``amp``; a no-op context otherwise."""
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def _probabilities(self, x):
        """``(calibrated, raw, classes)``: malignancy probabilities from the softmax of the
        logits divided by the model's temperature, and at temperature 1, and the [N, K]
        class probabilities after the temperature (each averaged over the TTA views). A
        subtype model's P(malignant) is the sum of its malignant classes' probabilities."""
        import torch

        views = _TTA_VIEWS if self.tta else 1
        calibrated = torch.zeros(x.shape[0], device=x.device)
        raw = torch.zeros(x.shape[0], device=x.device)
        classes = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        with torch.inference_mode(), self._autocast():
            for view in range(views):
                turned = torch.rot90(x, view % 4, dims=(2, 3)) if view % 4 else x
                if view >= 4:
                    turned = torch.flip(turned, dims=(3,))
                logits = self.model(turned).float()
                probs = torch.softmax(logits / self.temperature, dim=1)
                classes += probs
                if len(self.malignant_classes) == 1:  # binary: exactly as before
                    calibrated += probs[:, self.malignant]
                    raw += torch.softmax(logits, dim=1)[:, self.malignant]
                    continue
                calibrated += probs[:, self.malignant_classes].sum(dim=1)
                raw += torch.softmax(logits, dim=1)[:, self.malignant_classes].sum(dim=1)
        return calibrated / views, raw / views, classes / views

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from breakhis.score.attribution import attribute

        faults.before("score", batch["tile_id"])
        errors = np.asarray(batch["error"], dtype=object)
        ok = np.flatnonzero(errors == "")
        count = len(errors)
        prob = np.full(count, np.nan, dtype=np.float32)
        prob_raw = np.full(count, np.nan, dtype=np.float32)
        class_probs = np.full((count, self.num_classes), np.nan, dtype=np.float32)
        target = np.full(count, -1, dtype=np.int8)
        maps = np.zeros((count, self.map_size, self.map_size), dtype=np.float32)
        scale = np.full(count, np.nan, dtype=np.float32)
        overlays = np.full(count, "", dtype=object)
        scores = (prob, prob_raw, class_probs)
        map_out = (maps, scale, target, overlays)
        embedding = (
            np.full((count, self.feature_dim), np.nan, np.float32) if self.features else None
        )
        if len(ok):
            images = batch["image"]
            # No copy when every tile decoded (the usual batch): the rows are the input.
            images = np.ascontiguousarray(images if len(ok) == count else images[ok])
            x = self._inputs(images)
            if self.method == "gradcam" and not self.tta:
                # One forward pass for the predictions, the maps and the embeddings.
                with self._capturing(embedding, ok):
                    raw, explained = self._predict_with_gradcam(x, ok, scores)
                self._keep_maps(batch, images, raw, ok, explained, map_out)
                return self._rows(batch, scores, map_out, errors, embedding)
            with self._capturing(embedding, ok):
                calibrated, raw_prob, classes = self._probabilities(x)
            prob[ok] = calibrated.cpu().numpy()
            prob_raw[ok] = raw_prob.cpu().numpy()
            class_probs[ok] = classes.cpu().numpy()
            if self.method is not None:
                explained = self._explained(prob[ok], class_probs[ok])
                with self._autocast():
                    raw = attribute(
                        self.model,
                        x,
                        self.method,
                        explained,
                        layer=self.layer,
                        map_size=self.map_size,
                        **self.options,
                    ).numpy()
                self._keep_maps(batch, images, raw, ok, explained, map_out)
        return self._rows(batch, scores, map_out, errors, embedding)

    @contextlib.contextmanager
    def _capturing(self, embedding: np.ndarray | None, ok: np.ndarray) -> Iterator[None]:
        """Capture the head's inputs during the pass inside; on leaving, their mean over the
        pass's forward calls (one, or the TTA views) fills ``embedding`` at ``ok``. Nothing
        without ``features``."""
        if embedding is None:
            yield
            return
        captured: list = []
        self._local.embeddings = captured  # per calling thread, as the staging buffer
        try:
            yield
        finally:
            self._local.embeddings = None
        embedding[ok] = (sum(captured) / len(captured)).cpu().numpy()

    def _explained(self, p: np.ndarray, class_probs: np.ndarray) -> list[int]:
        """The class each tile's map explains: the one called at the threshold (binary), or
        for a subtype model the most probable class on the side of the call."""
        predicted = (p >= self.threshold).astype(np.int64)
        if len(self.malignant_classes) == 1:
            return [self.malignant if c else 1 - self.malignant for c in predicted]
        malignant = np.zeros(self.num_classes, dtype=bool)
        malignant[self.malignant_classes] = True
        side = np.where(predicted[:, None] == 1, malignant[None, :], ~malignant[None, :])
        return np.where(side, class_probs, -np.inf).argmax(axis=1).tolist()

    def _predict_with_gradcam(self, x, ok: np.ndarray, scores: tuple) -> tuple[np.ndarray, list]:
        """(raw Grad-CAM maps, the class each explains) from one forward pass; fills
        ``scores`` (prob, prob_raw, class_probs) at ``ok`` as _probabilities would."""
        import torch

        from breakhis.score.attribution import gradcam_with_logits

        prob, prob_raw, class_probs = scores
        malignant = self.malignant_classes
        explained: list[int] = []

        def choose(logits):
            with torch.no_grad():
                probs = torch.softmax(logits / self.temperature, dim=1)
                prob[ok] = probs[:, malignant].sum(dim=1).float().cpu().numpy()
                raw = torch.softmax(logits, dim=1)[:, malignant].sum(dim=1)
                prob_raw[ok] = raw.float().cpu().numpy()
                class_probs[ok] = probs.float().cpu().numpy()
            explained.extend(self._explained(prob[ok], class_probs[ok]))
            return explained

        with self._autocast():
            _, raw = gradcam_with_logits(self.model, x, self.layer, choose, map_size=self.map_size)
        return raw.numpy(), explained

    def _keep_maps(self, batch, images, raw, ok, explained, out) -> None:
        """Normalise the raw maps of the tiles at ``ok`` into ``out`` (maps, scale, target,
        overlays), record the class each explains and write their overlays."""
        maps, scale, target, overlays = out
        peak = np.abs(raw).reshape(len(ok), -1).max(axis=1)
        maps[ok] = raw / np.where(peak > 0, peak, 1.0)[:, None, None]
        scale[ok] = peak
        target[ok] = explained
        if self.overlay_root is not None:
            overlays[ok] = self._write_overlays(batch["tile_id"][ok], images, raw)

    @staticmethod
    def _rows(batch, scores: tuple, map_out: tuple, errors, embedding=None) -> dict:
        prob, prob_raw, class_probs = scores
        maps, scale, target, overlays = map_out
        features = {} if embedding is None else {"embedding": embedding}
        return {
            **features,
            "uri": batch["uri"],
            "unit": batch["unit"],
            "prob": prob,
            "prob_uncalibrated": prob_raw,
            "target": target,
            "map": maps,
            "scale": scale,
            "overlay": overlays,
            "error": errors,
            "class_probs": class_probs,
        }

    def _write_overlays(self, tile_ids, images: np.ndarray, raw: np.ndarray) -> list[str]:
        from breakhis.score.attribution import overlay_png

        uris = []
        for tile_id, image, attribution_map in zip(tile_ids, images, raw, strict=True):
            # A name, never a path: a tile id comes from the input ("../x" or "/x" in a
            # crafted shard would otherwise write outside the output).
            uri = storage.join(self.overlay_root, f"{storage.safe_name(str(tile_id))}.png")
            storage.write_bytes(uri, overlay_png(image, attribution_map))
            uris.append(uri)
        return uris


def _load_model(model_uri: str, artifact, device):
    """(model, card, hash of the weights loaded) from ``artifact`` (an Artifact or an
    ObjectRef of one) when given, else from ``model_uri``."""
    from breakhis.model.artifact import read_artifact

    if artifact is None:
        artifact = read_artifact(model_uri)
    elif not hasattr(artifact, "weights"):  # an ObjectRef: Ray resolves top-level ones only
        import ray

        artifact = ray.get(artifact)
    return artifact.load(device), artifact.card, artifact.weights_id


def actor_plan(device: str, num_actors: int, cpus_per_actor: int) -> tuple[int, float, str]:
    """(most actors, GPUs per actor, device) of a model actor pool on the current cluster.

    ``device`` is ``auto``, ``cpu`` or ``cuda``; ``num_actors`` 0 sizes the pool from the
    cluster: one actor per GPU, or on CPUs as many as fit while one CPU stays free for the
    decode tasks (the actors would starve them otherwise). Raises ValueError for ``cuda`` on a
    cluster without GPUs.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" or (device == "auto" and gpus > 0):
        if gpus == 0:
            raise ValueError("--device cuda: the Ray cluster has no GPU")
        return num_actors or gpus, 1.0, "cuda"
    cpus = int(resources.get("CPU", 1))
    return num_actors or max(1, (cpus - 1) // cpus_per_actor), 0.0, "cpu"


def predict_dataset(
    blocks: list[pa.Table],
    *,
    model_uri: str,
    geometry: TileGeometry,
    threshold: float,
    options: PredictOptions,
    overlay_root: str | None = None,
    object_store_limit: int | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline (module docstring) over ``blocks`` (tables with uri,
    tile_id, shard and unit columns) on the current Ray cluster: each output row is
    TilePredictor's (uri, unit, prob, prob_uncalibrated, target, map, scale, overlay,
    error). ``threshold`` decides the class each map explains (the one applied: the
    model's own unless the user gave one); ``overlay_root`` also writes overlay PNGs there;
    ``object_store_limit`` (bytes) bounds what this dataset holds in the object store.
    Raises ValueError for ``--device cuda`` on a cluster without GPUs.
    """
    import ray

    max_actors, gpus_per_actor, device = actor_plan(
        options.device, options.num_actors, options.cpus_per_actor
    )
    log.info("predicting with up to %d %s actor(s)", max_actors, device.upper())
    ds = ray.data.from_arrow(blocks)
    if object_store_limit:
        # A per-dataset copy of the context: the limit does not leak into other datasets.
        ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=object_store_limit
        )
    ds = decode_stage(
        ds,
        decode_tiles,
        {"geometry": geometry, "max_tile_bytes": options.max_tile_bytes},
        batch_size=options.decode_batch_size,
    )
    kwargs = predictor_kwargs(model_uri, threshold, device, options, overlay_root=overlay_root)
    return model_stage(
        ds,
        TilePredictor,
        kwargs,
        max_actors=max_actors,
        cpus_per_actor=options.cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        batch_size=options.batch_size,
        calls_per_actor=options.calls_per_actor,
    )


def decode_stage(ds, fn, fn_kwargs: dict, *, batch_size: int | None) -> ray.data.Dataset:
    """``ds`` through the decode function ``fn`` as Ray tasks of DECODE_CPUS, a task that
    meets a transient storage error retried (RETRIES times). The one decode stage of both
    pipelines: scoring's (breakhis.score.units) and evaluation's (predict_dataset)."""
    return ds.map_batches(
        fn,
        fn_kwargs=fn_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
        max_retries=RETRIES,
        retry_exceptions=[storage.TransientStorageError],  # a new list: Ray Data appends to it
    )


def model_stage(
    ds,
    predictor: type,
    constructor_kwargs: dict,
    *,
    max_actors: int,
    cpus_per_actor: int,
    gpus_per_actor: float,
    batch_size: int | None,
    calls_per_actor: int = 1,
) -> ray.data.Dataset:
    """``ds`` through a pool of model actors (``predictor``: TilePredictor or a callable class
    that wraps it, built with ``constructor_kwargs``), 1..``max_actors`` of them sized by
    actor_plan, each running up to ``calls_per_actor`` calls at once in threads. The one model
    stage of both pipelines, with one retry policy: an actor is restarted RETRIES times, and a
    call waits for its actor to come back."""
    import ray

    threads = (
        {"max_concurrent_calls_per_actor": calls_per_actor, "enable_true_multi_threading": True}
        if calls_per_actor > 1
        else {}
    )
    return ds.map_batches(
        predictor,
        fn_constructor_kwargs=constructor_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors, **threads),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
        max_restarts=RETRIES,  # Ray Data's default: forever
        # Unbounded task retries: a call waits for its actor to come back (a lost node), and
        # the bounded restarts end a job whose tile keeps killing it (the actor then dies
        # for good and every call fails at once).
        max_task_retries=-1,
    )


def predictor_kwargs(
    model_uri: str,
    threshold: float,
    device: str,
    options: PredictOptions,
    overlay_root: str | None = None,
    artifact: Any = None,
) -> dict:
    """TilePredictor's constructor arguments for ``options`` on ``device`` (actor_plan's);
    ``artifact``: the model itself (TilePredictor's docstring)."""
    return {
        "artifact": artifact,
        "model_uri": model_uri,
        "method": options.method,
        "map_size": options.map_size,
        "tta": options.tta,
        "threshold": threshold,
        "device": device,
        "torch_threads": options.torch_threads or options.cpus_per_actor,
        "overlay_root": overlay_root,
        "amp": options.amp,
        "ig_steps": options.ig_steps,
        "occlusion_window": options.occlusion_window,
        "lime_samples": options.lime_samples,
        "lime_grid": options.lime_grid,
    }
