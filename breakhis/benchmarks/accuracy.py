"""Benchmark of the job's accuracy: ``breakhis train`` + ``breakhis evaluate`` against a plain
PyTorch reference loop, on the same patient-disjoint splits, with the same seeds.

    breakhis benchmark accuracy --workdir bench-accuracy      # the shared real data when present
    breakhis benchmark accuracy --data /path/to/BreaKHis_v1 --variants job,refit --seeds 0,1
    breakhis benchmark accuracy --reference notebook --splits 0 --seeds 0 --epochs 1
    breakhis benchmark accuracy --arch smallcnn --image-size 32 --epochs 1 --splits 0,1

``--data`` is a folder of BreakHis PNGs (any nesting; prepared into the workdir first with
``breakhis.data.prepare``) or a prepared DEST. By default it is the shared real data beside the
repository: the ``../shared/realdata`` folder when it holds both ``breakhis-sample`` and
``breakhis-dev`` (257 images of 27 patients, prepared together), else the sample alone when
present, else generated data (``breakhis.synth.dataset`` at ``--scale``, ``--width`` x ``--height``).

For each of the paper's repetitions ``rep:K`` in ``--splits`` (70/30 random splits of the
patients, written into the manifest by prepare) and each seed in ``--seeds``, both sides train
the same architecture from random weights at the same image size, for the same epochs, with
the same batch size, AdamW peak learning rate and seed, and are scored on the same test
patients:

1. **the reference** (``--reference``, breakhis/benchmarks/reference_loop.py): a plain loop in
   this process, no Ray, none of the job's training code. ``strong`` (the default): aspect
   kept (height S), random S x S crops, flips and quarter turns, the centre crop at test,
   class-weighted cross-entropy, AdamW with weight decay 1e-4 and OneCycleLR; ``notebook``:
   the weaker loop a notebook would write (squashed to S x S, flips only, plain
   cross-entropy, constant lr). Both train on every training patient, keep the last epoch
   and take the argmax;
2. **each variant of the job** (``--variants``): ``breakhis.train.job.run_training`` with the
   options above, one worker (one process and one batch per step, the reference's optimizer
   budget), no early stopping, and everything else at the job's defaults (the point is the
   job as a user gets it: validation patients carved from the training ones, class-weighted
   loss, cosine schedule, augmentation, PreciseBN, the decision threshold chosen on
   validation), then ``breakhis.evaluate.job.run_evaluation`` of its artifact. A variant is a
   named set of TrainConfig overrides (VARIANTS).

Figures per split, seed and side: the paper's image- and patient-level recognition rates
(breakhis.stats.metrics), balanced accuracy, ROC-AUC and seconds; their mean +- sample std over
the (split, seed) pairs; the paired differences variant - reference of the four figures, with
their mean, sample std and 95% t-interval over the pairs (pairs of one split share its test
patients, so the interval is optimistic when seeds outnumber splits). The target: each
variant's mean is at least the reference's on both rates. ``benchmark-accuracy.json`` and
``benchmark-accuracy.md`` in the workdir hold them.

Resumable: each run (one side, one split, one seed) is saved to ``WORKDIR/results/`` as soon
as it finishes (breakhis/benchmarks/run_store.py); a rerun with the same options loads the
runs already done and trains the others, so a long comparison survives a stop and spans
sessions. Adding a seed, a split or a variant reuses every run already there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from breakhis import storage
from breakhis.benchmarks.accuracy_data import (
    PreparedData,
    check_repetitions,
    check_source,
    prepared,
)
from breakhis.benchmarks.accuracy_result import (
    REFERENCE,
    AccuracyBenchmarkResult,
    DataInfo,
    SideResult,
)
from breakhis.benchmarks.harness import device_name, save_result, start_local_ray
from breakhis.benchmarks.reference_recipes import RECIPES, ReferenceOptions, check_recipe
from breakhis.benchmarks.run_store import RunKey, RunStore
from breakhis.model.architectures import ARCH_CHOICES, check_arch

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "job": {},
    # The ablation of issue 23, one change from the defaults each (docs/training.md).
    "square": {"geometry": "square"},
    "centre": {"eval_view": "centre"},
    "no-colour": {"colour_augment": False},
    "strength-0.5": {"augment_strength": 0.5},
    "no-augment": {"augment_strength": 0.0},
    "val-carve": {"val_fraction": 0.2},
    "fitted": {"val_fraction": 0.2, "threshold_rule": "balanced_accuracy"},
    # Were "no-precise-bn" and "no-dropout" against the defaults before 2026-12-07, which
    # had them on; the screen in docs/training.md turned both defaults off.
    "precise-bn": {"bn_recalibration_batches": 16},
    "dropout": {"dropout": 0.2},
    "old-job": {"bn_recalibration_batches": 16, "dropout": 0.2},
    "tta": {},  # the job's model, evaluated with dihedral test-time averaging (EVALUATION)
    "best": {"val_fraction": 0.2, "model_epoch": "best"},
    "refit": {"val_fraction": 0.2, "refit": True},
    "refit-best": {"val_fraction": 0.2, "refit": True, "model_epoch": "best"},
    # Issue 28: stain normalisation, fitted on the first training tile by tile id.
    "stain-macenko": {"stain_norm": "macenko"},
    "stain-reinhard": {"stain_norm": "reinhard"},
    # Issue 28: the eight-subtype model, its binary call the sum over the malignant four.
    "subtype": {"task": "subtype"},
}
"""Variants of the job: name -> TrainConfig overrides on top of the benchmark's options. A new
variant is one more entry here (its overrides are part of its runs' keys)."""

REPETITIONS = 5
"""The paper's repetitions: prepare writes ``rep0..rep4`` by default."""


@dataclass(frozen=True)
class AccuracyBenchmarkConfig:
    """Options of ``breakhis benchmark accuracy``."""

    workdir: str = "bench-accuracy"
    """Local folder for the prepared data, the job's runs, every run's result (results/, what
    a rerun resumes from) and the result files."""
    data: str | None = None
    """BreakHis PNGs (a folder, any nesting), a prepared DEST, or ``generated`` (generated
    data of --scale, --width, --height); default: ../shared/realdata beside the repository
    (breakhis-sample and breakhis-dev together) when both exist, else the sample, else
    generated."""
    splits: tuple[int, ...] = (0, 1, 2, 3, 4)
    """The paper's repetitions to run (rep:K of the manifest), comma-separated."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds, comma-separated: every (split, seed) pair runs both sides with that seed."""
    variants: tuple[str, ...] = field(default=("job",), metadata={"choices": tuple(VARIANTS)})
    """Variants of the job to compare with the reference, comma-separated (see VARIANTS)."""
    reference: str = field(default="strong", metadata={"choices": tuple(RECIPES)})
    """The reference loop: strong (aspect kept, crops, quarter turns, class weights,
    OneCycleLR) or notebook (squashed, flips, constant lr)."""
    arch: str = field(default="resnet18", metadata={"choices": ARCH_CHOICES})
    """Model architecture of both sides (random initial weights)."""
    image_size: int = 128
    """Side of the square model input in pixels."""
    epochs: int = 15
    """Training epochs of both sides."""
    batch_size: int = 32
    """Images per optimizer step on both sides."""
    lr: float = 1e-3
    """AdamW learning rate of both sides (the peak rate of a schedule)."""
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
        check_recipe(self.reference)
        _check_list("splits", self.splits, range(REPETITIONS), "0,1,2,3,4")
        _check_list("seeds", self.seeds, range(2**31), "0,1,2")
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
        for name in ("epochs", "width", "height"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (BatchNorm), got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"--scale must be in (0, 1], got {self.scale}")
        if self.cpus < 0:
            raise ValueError(f"--cpus must be >= 0, got {self.cpus}")


def _check_list(option: str, values: tuple[int, ...], accepted: range, example: str) -> None:
    """Raise ValueError naming ``--option`` when ``values`` is empty, repeats a value or has
    one outside ``accepted``."""
    given = ",".join(map(str, values))
    if not values:
        raise ValueError(f"--{option}: give at least one, e.g. {example}")
    bad = [v for v in values if v not in accepted]
    if bad:
        raise ValueError(
            f"--{option} {given}: {', '.join(map(str, bad))} not accepted; accepted: "
            f"comma-separated numbers in {accepted.start}..{accepted.stop - 1}, e.g. {example}"
        )
    if len(set(values)) != len(values):
        raise ValueError(f"--{option} {given}: a value is repeated")


# --- the job --------------------------------------------------------------------------------


def job_config(
    dest: str, runs: str, variant: str, k: int, seed: int, config: AccuracyBenchmarkConfig
) -> Any:
    """The TrainConfig of variant ``variant`` on rep:``k`` with ``seed`` (runs kept under
    ``runs``)."""
    from breakhis.train.config import TrainConfig

    return TrainConfig(
        data=dest,
        storage=runs,
        name=f"{variant}-rep{k}-seed{seed}",
        split=f"rep:{k}",
        arch=config.arch,
        weights="none",
        image_size=config.image_size,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        num_workers=1,
        patience=0,
        seed=seed,
        **VARIANTS[variant],
    )


EVALUATION: dict[str, dict[str, Any]] = {"tta": {"tta": True}}
"""Variants that change how the model is evaluated: name -> PredictOptions overrides."""


def run_job(train_config: Any, predict: dict[str, Any] | None = None) -> SideResult:
    """Train ``train_config`` (a TrainConfig of job_config), evaluate its artifact on the
    split's test patients (with ``predict``'s PredictOptions overrides, e.g. TTA), and
    return its SideResult (with ``error`` set, figures NaN, when
    the job refuses to train)."""
    from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
    from breakhis.evaluate.job import run_evaluation
    from breakhis.score.predict import PredictOptions
    from breakhis.train.config import CURVES_JSON, REFIT_DIR
    from breakhis.train.job import run_training

    started = time.perf_counter()
    try:
        trained = run_training(train_config)
    except ValueError as err:
        # What the job refuses before any worker starts (e.g. too few training images for
        # one batch once the validation patients are out) is a result of the benchmark: the
        # job, as a user gets it, cannot train on this split.
        log.warning("%s: the job refused to train: %s", train_config.name, err)
        nan = math.nan
        return SideResult(
            nan, nan, nan, nan, time.perf_counter() - started, 0, 0, 0, 0, 0, 0, nan, error=str(err)
        )
    evaluated = run_evaluation(
        EvaluateConfig(
            model=trained.artifact_uri,
            data=train_config.data,
            out=None,
            options=EvaluateOptions(
                predict=PredictOptions(attribution="none", **(predict or {})),
                bootstrap=1,
                cross_magnification=False,
            ),
        )
    )
    history = list(trained.history)
    train_patients = evaluated.split.train_patients
    if trained.refit_epochs:  # the model handed over is the refit's, on train + val
        history = json.loads(
            storage.read_bytes(storage.join(trained.run_uri, REFIT_DIR, CURVES_JSON))
        )["epochs"]
        train_patients += evaluated.split.val_patients
    return SideResult.from_metrics(
        evaluated.metrics,
        seconds=time.perf_counter() - started,
        train_patients=train_patients,
        val_patients=evaluated.split.val_patients,
        images_per_epoch=int(history[-1]["train_images"]) if history else 0,
        kept_epoch=trained.refit_epochs or trained.best_epoch,
        threshold=float(evaluated.options.predict.threshold),
        **subtype_figures(evaluated.subtype),
    )


def subtype_figures(report: dict[str, Any] | None) -> dict[str, float]:
    """A subtype model's eight-class figures for its SideResult (image accuracy, balanced
    accuracy, patient accuracy), from breakhis.subtypes.subtype_report's ``report``; none
    for a binary model."""
    if report is None:
        return {}
    patient = report["patient"]
    return {
        "subtype_accuracy": float(report["accuracy"]),
        "subtype_balanced_accuracy": report["balanced_accuracy"],
        "subtype_patient_accuracy": patient["accuracy"],
    }


# --- the runs -------------------------------------------------------------------------------

_NOT_IN_KEY = ("data", "storage", "name", "tracking_uri")
"""TrainConfig fields that say where a run reads and writes, not what it computes (the data
is in the key as its manifest's hash)."""


def _reference_options(config: AccuracyBenchmarkConfig, seed: int) -> ReferenceOptions:
    return ReferenceOptions(
        arch=config.arch,
        image_size=config.image_size,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=seed,
    )


def reference_key(config: AccuracyBenchmarkConfig, k: int, seed: int, manifest: str) -> RunKey:
    """The RunKey of the reference on rep:``k`` with ``seed``: its recipe and options."""
    options = asdict(_reference_options(config, seed))
    del options["seed"]
    recipe = {"loop": config.reference, **asdict(RECIPES[config.reference])}
    return RunKey(REFERENCE, k, seed, recipe=recipe, options=options, manifest=manifest)


_ADDED_OFF: dict[str, Any] = {
    "task": "binary",
    "stain_norm": "none",
    "stain_reference": None,
    "freeze_backbone": False,
}
"""TrainConfig fields added after runs were stored (issue 28), and the value at which they
change nothing: at that value a field is left out of the key, so the runs stored before it
existed, which computed exactly that, are still found."""


def job_key(train_config: Any, variant: str, k: int, seed: int, manifest: str) -> RunKey:
    """The RunKey of a variant's run: every TrainConfig field that changes the result (so a
    changed job default, or a changed variant, is a new run)."""
    options = {
        f: v
        for f, v in asdict(train_config).items()
        if f not in _NOT_IN_KEY and not (f in _ADDED_OFF and v == _ADDED_OFF[f])
    }
    recipe = {"variant": variant, "overrides": VARIANTS[variant]}
    if variant in EVALUATION:
        recipe["evaluation"] = EVALUATION[variant]
    return RunKey(variant, k, seed, recipe=recipe, options=options, manifest=manifest)


def _run_pair(
    config: AccuracyBenchmarkConfig,
    store: RunStore,
    data: PreparedData,
    runs: str,
    k: int,
    seed: int,
) -> dict[str, SideResult]:
    """The reference and every variant on rep:``k`` with ``seed``, by side; each loaded from
    ``store`` when done before, else run and saved. Raises RuntimeError when a variant scored
    other test tiles than the reference."""
    from breakhis.benchmarks.reference_loop import run_reference
    from breakhis.data.splits import SplitSpec, select_split

    patients = select_split(data.manifest, SplitSpec.parse(f"rep:{k}"))

    def reference() -> SideResult:
        log.info("rep:%d seed %d: the %s reference loop", k, seed, config.reference)
        options = _reference_options(config, seed)
        return run_reference(config.reference, data.tiles, patients.train, patients.test, options)

    out = {REFERENCE: store.get_or_run(reference_key(config, k, seed, data.hash), reference)}
    for variant in config.variants:
        train_config = job_config(data.dest, runs, variant, k, seed, config)
        key = job_key(train_config, variant, k, seed, data.hash)
        result = store.get_or_run(key, partial(run_job, train_config, EVALUATION.get(variant)))
        ref = out[REFERENCE]
        if not result.error and (result.test_images, result.test_patients) != (
            ref.test_images,
            ref.test_patients,
        ):
            raise RuntimeError(
                f"rep:{k} seed {seed}: {variant} scored {result.test_patients} patients / "
                f"{result.test_images} images, the reference {ref.test_patients} / "
                f"{ref.test_images}: the sides must see the same test tiles"
            )
        out[variant] = result
    return out


def run_accuracy_benchmark(config: AccuracyBenchmarkConfig) -> AccuracyBenchmarkResult:
    """Run the reference and every variant on every (split, seed) pair (module docstring),
    loading the runs a previous session finished; write ``benchmark-accuracy.json`` and
    ``benchmark-accuracy.md`` into the workdir and return the result.

    Starts a local Ray instance (``cpus`` CPUs) unless Ray is already initialised. Raises
    FileNotFoundError for a missing --data and ValueError for a prepared DEST without the
    asked repetitions, before any work; otherwise what prepare, training and evaluation raise.
    """
    source, kind = check_source(config.data, config.splits)
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    start_local_ray(config.cpus or os.cpu_count() or 1)
    dest = prepared(
        workdir, source, kind, scale=config.scale, width=config.width, height=config.height
    )
    data = PreparedData(dest)
    check_repetitions(data.manifest, config.splits, data.dest)
    store = RunStore(os.path.join(workdir, "results"))
    runs = os.path.join(workdir, "runs", time.strftime("%Y%m%d-%H%M%S"))

    pairs = [(k, seed) for k in config.splits for seed in config.seeds]
    sides: dict[str, list[SideResult]] = {REFERENCE: [], **{v: [] for v in config.variants}}
    for k, seed in pairs:
        for side, result in _run_pair(config, store, data, runs, k, seed).items():
            sides[side].append(result)
    log.info("runs: %d computed, %d resumed from %s", store.computed, store.resumed, store.folder)

    manifest = data.manifest
    outcome = AccuracyBenchmarkResult(
        date=time.strftime("%Y-%m-%d"),
        device=device_name(),
        config=asdict(config),
        data=DataInfo(
            source=source,
            kind=kind,
            dest=data.dest,
            images=manifest.num_rows,
            patients=len(set(manifest.column("patient_id").to_pylist())),
            manifest=data.hash,
        ),
        pairs=pairs,
        sides=sides,
        runs={
            "folder": str(store.folder),
            "job_runs": runs,
            "computed": store.computed,
            "resumed": store.resumed,
        },
    )
    save_result(config.workdir, "accuracy", outcome.to_dict(), outcome.format_table())
    return outcome
