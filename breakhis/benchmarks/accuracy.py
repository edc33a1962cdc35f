"""Benchmark of the job's accuracy: ``breakhis train`` + ``breakhis evaluate`` against a plain
PyTorch loop, on the same patient-disjoint splits.

    breakhis benchmark accuracy --workdir bench-accuracy       # the real sample when present
    breakhis benchmark accuracy --data /path/to/BreaKHis_v1 --variants job,refit
    breakhis benchmark accuracy --arch smallcnn --image-size 32 --epochs 1 --splits 0,1

``--data`` is a folder of BreakHis PNGs (any nesting; prepared into the workdir first with
``breakhis.prepare``) or a prepared DEST. By default it is the real sample at
``../shared/realdata/breakhis-sample`` beside the repository when that folder exists, else
generated data (``breakhis.synth`` at ``--scale``, ``--width`` x ``--height`` tiles).

For each of the paper's repetitions ``rep:K`` in ``--splits`` (70/30 random splits of the
patients, written into the manifest by prepare), both sides train the same architecture from
random weights at the same image size, for the same epochs, with the same batch size,
optimizer (AdamW) and learning rate, and are scored on the same test patients:

1. **the reference**: what a 40-line notebook does, in this process, no Ray. It trains on
   every training patient of the split (no validation), decodes each PNG with PIL, resizes it
   to S x S (bilinear), flips it at random horizontally and vertically, ``ToTensor`` and
   ImageNet ``Normalize``; torchvision's resnet18 with ``fc`` replaced by ``Linear(512, 2)``
   (other architectures from ``breakhis.model.build_model``); ``AdamW(lr)`` with torch's
   defaults, plain cross-entropy, shuffled batches (a ``DataLoader`` with its defaults), the
   last epoch kept, malignant at softmax >= 0.5;
2. **each variant of the job**: ``breakhis.train.run_training`` with the options above, one
   worker (one process and one batch per step, the reference's optimizer budget), no early
   stopping, and everything else at the job's defaults (the point is the job as a user gets
   it: validation patients carved from the training ones, class-weighted loss, cosine schedule,
   augmentation, PreciseBN, the decision threshold chosen on validation), then
   ``breakhis.evaluate.run_evaluation`` of its artifact. A variant is a named set of
   TrainConfig overrides (VARIANTS).

Figures per split and side: the paper's image- and patient-level recognition rates
(breakhis.metrics), balanced accuracy, ROC-AUC and seconds; their mean +- sample standard
deviation over the splits; the paired difference variant - reference of both rates per split,
with its mean +- std. The target: each variant's mean is at least the reference's on both rates.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from breakhis import storage
from breakhis.benchmarks.accuracy_result import (
    REFERENCE,
    AccuracyBenchmarkResult,
    DataInfo,
    SideResult,
)
from breakhis.benchmarks.harness import device_name, save_result, start_local_ray
from breakhis.model import check_arch

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "job": {},
    "best": {"model_epoch": "best"},
    "refit": {"refit": True},
    "refit-best": {"refit": True, "model_epoch": "best"},
}
"""Variants of the job: name -> TrainConfig overrides on top of the benchmark's options."""

REPETITIONS = 5
"""The paper's repetitions: prepare writes ``rep0..rep4`` by default."""

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "realdata" / "breakhis-sample"
"""The real BreakHis sample beside the repository (the default ``--data`` when present)."""

GENERATED = "generated"
"""The ``--data`` value that asks for generated data."""


@dataclass(frozen=True)
class AccuracyBenchmarkConfig:
    """Options of ``breakhis benchmark accuracy``."""

    workdir: str = "bench-accuracy"
    """Local folder for the prepared data, the job's runs and the result files."""
    data: str | None = None
    """BreakHis PNGs (a folder, any nesting), a prepared DEST, or ``generated`` (generated
    data of --scale, --width, --height); default: the real sample at
    ../shared/realdata/breakhis-sample beside the repository when it exists, else generated."""
    splits: tuple[int, ...] = (0, 1, 2, 3, 4)
    """The paper's repetitions to run (rep:K of the manifest), comma-separated."""
    variants: tuple[str, ...] = ("job",)
    """Variants of the job to compare with the reference, comma-separated (see VARIANTS:
    job, refit)."""
    arch: str = "resnet18"
    """Model architecture of both sides (random initial weights)."""
    image_size: int = 128
    """Side of the square model input in pixels."""
    epochs: int = 15
    """Training epochs of both sides."""
    batch_size: int = 32
    """Images per optimizer step on both sides."""
    lr: float = 1e-3
    """AdamW learning rate of both sides (the job's peak rate)."""
    seed: int = 0
    """Seed of both sides; split rep:K uses seed + K."""
    scale: float = 0.05
    """Generated data only: fraction of BreakHis' 7,909 images."""
    width: int = 350
    """Generated data only: tile width in pixels."""
    height: int = 230
    """Generated data only: tile height in pixels."""
    cpus: int = 0
    """CPUs of the local Ray instance the benchmark starts; 0: all of this machine."""

    def __post_init__(self) -> None:
        check_arch(self.arch)
        if not self.splits:
            raise ValueError("--splits: give at least one repetition, e.g. 0,1,2,3,4")
        bad = [k for k in self.splits if not 0 <= k < REPETITIONS]
        if bad:
            raise ValueError(
                f"--splits {','.join(map(str, self.splits))}: no repetition "
                f"{', '.join(map(str, bad))}; accepted: comma-separated numbers in "
                f"0..{REPETITIONS - 1} (the manifest's rep0..rep{REPETITIONS - 1}), e.g. 0,1,2,3,4"
            )
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"--splits {','.join(map(str, self.splits))}: a split is repeated")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or unknown:
            raise ValueError(
                f"--variants {','.join(self.variants)}: unknown {', '.join(unknown) or '(none)'}; "
                f"accepted: comma-separated names among {', '.join(VARIANTS)}"
            )
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"--variants {','.join(self.variants)}: a variant is repeated")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in 16..1024, got {self.image_size}")
        for name in ("epochs", "batch_size", "width", "height"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"--scale must be in (0, 1], got {self.scale}")
        if self.cpus < 0:
            raise ValueError(f"--cpus must be >= 0, got {self.cpus}")


# --- data --------------------------------------------------------------------------------


def _is_prepared(uri: str) -> bool:
    return storage.exists(storage.join(uri, "manifest.parquet"))


def _check_source(config: AccuracyBenchmarkConfig) -> tuple[str, str]:
    """(source, kind) of the data to run on, checked before any work: ``kind`` is
    ``prepared``, ``raw`` or ``generated``. Raises FileNotFoundError for a --data that does
    not exist, ValueError for a prepared DEST without the asked repetitions."""
    if config.data is None:
        return (str(SAMPLE), "raw") if SAMPLE.is_dir() else (GENERATED, GENERATED)
    if config.data == GENERATED:
        return GENERATED, GENERATED
    if _is_prepared(config.data):
        from breakhis.prepare import read_manifest

        _check_repetitions(read_manifest(config.data), config.splits, config.data)
        return config.data, "prepared"
    if not storage.exists(config.data):
        raise FileNotFoundError(
            f"--data {config.data}: no such folder (accepted: a folder of BreakHis PNGs, a "
            f"prepared DEST, or {GENERATED})"
        )
    return config.data, "raw"


def _check_repetitions(manifest: pa.Table, splits: tuple[int, ...], where: str) -> None:
    missing = [k for k in splits if f"rep{k}" not in manifest.column_names]
    if missing:
        reps = sorted(c for c in manifest.column_names if c.startswith("rep"))
        raise ValueError(
            f"--splits: {where} has no repetition {', '.join(map(str, missing))}; its manifest "
            f"has {', '.join(reps) or 'none'}"
        )


def _prepared(config: AccuracyBenchmarkConfig, source: str, kind: str) -> str:
    """The prepared DEST of the data (preparing a raw folder or generated data into the
    workdir; needs Ray)."""
    from breakhis.prepare import PrepareConfig, prepare

    workdir = os.path.abspath(config.workdir)
    if kind == "prepared":
        return source
    if kind == GENERATED:
        root = os.path.join(
            workdir, f"data-{config.scale:g}-{config.width}x{config.height}-seed{config.seed}"
        )
        dest = os.path.join(root, "prepared")
        if not _is_prepared(dest):  # generated once, then reused
            from breakhis.synth import synthesize

            raw = os.path.join(root, "raw")
            synthesize(
                raw, scale=config.scale, seed=config.seed, width=config.width, height=config.height
            )
            prepare(PrepareConfig(src=raw, dest=dest))
        return dest
    # A raw folder is prepared every time: a re-run keeps the complete shards and notices a
    # changed folder.
    tag = hashlib.sha256(source.encode()).hexdigest()[:8]
    name = os.path.basename(source.rstrip("/")) or "data"
    dest = os.path.join(workdir, f"prepared-{name}-{tag}")
    prepare(PrepareConfig(src=source, dest=dest))
    return dest


def _read_tiles(dest: str) -> pa.Table:
    """tile_id, patient_id, label and PNG bytes of every prepared tile."""
    import pyarrow.parquet as pq

    from breakhis.ingest import shard_paths

    fs, paths = shard_paths(dest)
    columns = ["tile_id", "patient_id", "label", "png"]
    return pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths])


# --- the reference: a plain PyTorch loop ---------------------------------------------------


def _reference_model(arch: str):
    import torch.nn as nn
    import torchvision

    from breakhis.model import build_model

    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Linear(net.fc.in_features, 2)
        return net
    return build_model(arch, weights="none")


def _decode(png: bytes, size: int):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB").resize((size, size), Image.BILINEAR)


def _train_reference(
    dataset: list, *, arch: str, epochs: int, batch_size: int, lr: float, seed: int
) -> tuple[Any, int]:
    """The reference loop's training (module docstring) on ``dataset`` ((PIL image, label)
    pairs). Returns (model, images stepped through per epoch)."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from tqdm import tqdm

    from breakhis.transforms import IMAGENET_MEAN, IMAGENET_STD

    train_tf = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([train_tf(image) for image, _ in batch]), torch.tensor(
            [label for _, label in batch]
        )

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(dataset) % batch_size == 1,  # BatchNorm cannot train on one image
    )
    model = _reference_model(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in tqdm(range(epochs), desc="reference", unit="epoch", leave=False):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    return model, len(dataset) - (len(dataset) % batch_size if loader.drop_last else 0)


def _reference_probs(model: Any, images: list, batch_size: int) -> np.ndarray:
    """The model's probability of malignancy for each image, in eval mode."""
    import torch
    from torchvision import transforms as T

    from breakhis.transforms import IMAGENET_MEAN, IMAGENET_STD

    test_tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    model.eval()
    probs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([test_tf(image) for image in images[i : i + batch_size]])
            probs.append(torch.softmax(model(x), dim=1)[:, 1].numpy())
    return np.concatenate(probs)


def run_reference(
    tiles: pa.Table,
    train_patients: frozenset[str],
    test_patients: frozenset[str],
    *,
    arch: str,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> SideResult:
    """Train the reference loop (module docstring) on the tiles of ``train_patients`` and
    score it on those of ``test_patients``. Returns its SideResult."""
    import torch

    from breakhis.metrics import classification_metrics

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)

    def rows(patients: frozenset[str]) -> pa.Table:
        return tiles.filter(pc.is_in(tiles.column("patient_id"), pa.array(sorted(patients))))

    train, test = rows(train_patients), rows(test_patients)
    train_images = [_decode(png, image_size) for png in train.column("png").to_pylist()]
    dataset = list(zip(train_images, train.column("label").to_pylist(), strict=True))
    model, images_per_epoch = _train_reference(
        dataset, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    test_images = [_decode(png, image_size) for png in test.column("png").to_pylist()]
    probs = _reference_probs(model, test_images, batch_size)
    labels = test.column("label").to_pylist()
    m = classification_metrics(labels, probs, test.column("patient_id").to_pylist())
    return SideResult.from_metrics(
        m,
        seconds=time.perf_counter() - started,
        train_patients=len(train_patients),
        val_patients=0,
        images_per_epoch=images_per_epoch,
        kept_epoch=epochs,
        threshold=0.5,
    )


# --- the job --------------------------------------------------------------------------------


def _job_config(dest: str, runs: str, variant: str, k: int, config: AccuracyBenchmarkConfig) -> Any:
    """The TrainConfig of variant ``variant`` on rep:``k`` (runs kept under ``runs``)."""
    from breakhis.train_config import TrainConfig

    return TrainConfig(
        data=dest,
        storage=runs,
        name=f"{variant}-rep{k}",
        split=f"rep:{k}",
        arch=config.arch,
        weights="none",
        image_size=config.image_size,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        num_workers=1,
        patience=0,
        seed=config.seed + k,
        **VARIANTS[variant],
    )


def run_job(
    dest: str, runs: str, variant: str, k: int, config: AccuracyBenchmarkConfig
) -> SideResult:
    """Train variant ``variant`` of the job on rep:``k`` of ``dest`` (runs kept under
    ``runs``), evaluate its artifact on the test patients, and return its SideResult."""
    from breakhis.evaluate import run_evaluation
    from breakhis.evaluate_config import EvaluateConfig, EvaluateOptions
    from breakhis.predict import PredictOptions
    from breakhis.train import run_training
    from breakhis.train_config import CURVES_JSON, REFIT_DIR

    started = time.perf_counter()
    train_config = _job_config(dest, runs, variant, k, config)
    try:
        trained = run_training(train_config)
    except ValueError as err:
        # What the job refuses before any worker starts (e.g. too few training images for
        # one batch once the validation patients are out) is a result of the benchmark: the
        # job, as a user gets it, cannot train on this split.
        log.warning("rep:%d, %s: the job refused to train: %s", k, variant, err)
        nan = math.nan
        return SideResult(
            nan, nan, nan, nan, time.perf_counter() - started, 0, 0, 0, 0, 0, 0, nan, error=str(err)
        )
    evaluated = run_evaluation(
        EvaluateConfig(
            model=trained.artifact_uri,
            data=dest,
            out=None,
            options=EvaluateOptions(
                predict=PredictOptions(attribution="none"), bootstrap=1, cross_magnification=False
            ),
        )
    )
    m = evaluated.metrics
    history = list(trained.history)
    train_patients = evaluated.split.train_patients
    if trained.refit_epochs:  # the model handed over is the refit's, on train + val
        history = json.loads(
            storage.read_bytes(storage.join(trained.run_uri, REFIT_DIR, CURVES_JSON))
        )["epochs"]
        train_patients += evaluated.split.val_patients
    return SideResult.from_metrics(
        m,
        seconds=time.perf_counter() - started,
        train_patients=train_patients,
        val_patients=evaluated.split.val_patients,
        images_per_epoch=int(history[-1]["train_images"]) if history else 0,
        kept_epoch=trained.refit_epochs or trained.best_epoch,
        threshold=float(evaluated.options.predict.threshold),
    )


def _run_split(
    config: AccuracyBenchmarkConfig,
    manifest: pa.Table,
    tiles: pa.Table,
    dest: str,
    runs: str,
    k: int,
) -> dict[str, SideResult]:
    """The reference and every variant on rep:``k``, by side. Raises RuntimeError when a
    variant scored other test tiles than the reference."""
    from breakhis.splits import SplitSpec, select_split

    patients = select_split(manifest, SplitSpec.parse(f"rep:{k}"))
    log.info("rep:%d: reference loop on %d training patients", k, len(patients.train))
    reference = run_reference(
        tiles,
        patients.train,
        patients.test,
        arch=config.arch,
        image_size=config.image_size,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed + k,
    )
    out = {REFERENCE: reference}
    for variant in config.variants:
        log.info("rep:%d: job, variant %s", k, variant)
        result = run_job(dest, runs, variant, k, config)
        if not result.error and (result.test_images, result.test_patients) != (
            reference.test_images,
            reference.test_patients,
        ):
            raise RuntimeError(
                f"rep:{k}: the job scored {result.test_patients} patients / "
                f"{result.test_images} images, the reference {reference.test_patients} / "
                f"{reference.test_images}: the sides must see the same test tiles"
            )
        out[variant] = result
    return out


def run_accuracy_benchmark(config: AccuracyBenchmarkConfig) -> AccuracyBenchmarkResult:
    """Run the reference and every variant on every split (module docstring); write
    ``benchmark-accuracy.json`` and ``benchmark-accuracy.md`` into the workdir and return
    the result.

    Starts a local Ray instance (``cpus`` CPUs) unless Ray is already initialised. Raises
    FileNotFoundError for a missing --data and ValueError for a prepared DEST without the
    asked repetitions, before any work; otherwise what prepare, training and evaluation raise.
    """
    from breakhis.prepare import read_manifest

    source, kind = _check_source(config)
    os.makedirs(config.workdir, exist_ok=True)
    start_local_ray(config.cpus or os.cpu_count() or 1)
    dest = _prepared(config, source, kind)
    manifest = read_manifest(dest)
    _check_repetitions(manifest, config.splits, dest)
    tiles = _read_tiles(dest)
    runs = os.path.join(os.path.abspath(config.workdir), "runs", time.strftime("%Y%m%d-%H%M%S"))

    sides: dict[str, list[SideResult]] = {REFERENCE: [], **{v: [] for v in config.variants}}
    for k in config.splits:
        for side, result in _run_split(config, manifest, tiles, dest, runs, k).items():
            sides[side].append(result)

    outcome = AccuracyBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(),
        config=asdict(config) | {"runs": runs},
        data=DataInfo(
            source=source,
            kind=kind,
            dest=dest,
            images=manifest.num_rows,
            patients=len(set(manifest.column("patient_id").to_pylist())),
        ),
        splits=[f"rep:{k}" for k in config.splits],
        sides=sides,
    )
    save_result(config.workdir, "accuracy", outcome.to_dict(), outcome.format_table())
    return outcome
