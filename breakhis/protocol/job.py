"""The paper's protocol end to end: one model per split, each evaluated on its own
held-out patients, reported as mean +- std over the splits.

    breakhis protocol --data s3://bucket/prepared --storage s3://bucket/runs --name rn50-paper
    breakhis protocol --data ... --storage ... --name rn50-per-mag --magnifications all,40,100,200,400
    breakhis protocol --data ... --storage ... --name rn50-site --scheme column --columns site_a
    ray job submit --working-dir . -- python jobs/protocol.py --data ... (same options)

Spanhol et al. (2016) split the patients at random 70/30 five times and report
the mean and standard deviation of the recognition rates over the five
repetitions, per magnification. ``scheme="rep"`` runs exactly that on the
manifest's ``rep0..rep4`` columns; ``scheme="fold"`` runs k-fold
cross-validation by patient instead; ``scheme="column"`` runs the user-defined
splits (``--columns``, by default every one ``breakhis prepare --split-file``
added), one split per manifest column. The protocol sets each run's split
itself, so ``--split`` is refused here. Each split trains the
magnification-independent model (``None`` in ``magnifications``, ``all`` on the command
line) and, with ``--magnifications all,40,100,200,400``, one model per magnification as well; every model is
evaluated on its split's test patients at all four magnifications, which gives
both the paper's per-magnification table and the cross-magnification matrix
(trained at one magnification, evaluated at each other).

Concurrency. Each run is ``train.run_training`` then ``evaluate.run_evaluation``
in a driver thread. A Ray Train V2 ``fit()`` only waits on its own controller
actor (which takes no CPU), so several fits from threads of one driver run side
by side, each with its own worker group, and Ray places their workers wherever
the cluster has room; the same holds for the evaluations' Ray Data pipelines.
The number of threads is what the cluster holds at once: a run takes
``num_workers x cpus_per_worker`` CPUs (and ``num_workers`` GPUs with
``use_gpu``) plus one CPU for its Ray Data decoding, so runs never starve
each other's data pipelines (all CPUs held by training workers would leave
none for the reads that feed them). On a 64-GPU cluster and 8-GPU runs, 8
splits train at once; on a laptop, one at a time. Ray Tune would add a trial
scheduler and experiment state this does not need: each run already resumes
from its own checkpoints (same STORAGE/NAME), and a finished run whose
artifact was written with the same options is not trained again, so running
the same command after a failure only redoes what is missing.

Outputs under STORAGE/NAME: one run folder per (split, magnification)
(``rep0-all``, ``rep0-40x``, ``column-heldout-all``, ...) holding the training job's checkpoints,
``model/`` artifact and curves, plus ``evaluation/`` (that run's full report);
and ``report/`` (or ``out``): the protocol's ``report.html`` and ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from breakhis import storage
from breakhis.data.dest import PreparedDest
from breakhis.data.splits import SplitSpec
from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
from breakhis.protocol.config import PER_MAGNIFICATION, ProtocolConfig  # noqa: F401 (re-exported)
from breakhis.protocol.result import ProtocolResult, ProtocolRun, aggregate, aggregate_subtypes
from breakhis.raysession import ensure_ray
from breakhis.train.config import ARTIFACT_DIR, TrainConfig
from breakhis.train.plan import DATA_CPUS

log = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"


@dataclass(frozen=True)
class RunPlan:
    """One training + evaluation of the protocol."""

    name: str
    split: str
    magnification: int | None
    train: TrainConfig

    @property
    def artifact_uri(self) -> str:
        return storage.join(self.train.run_uri, ARTIFACT_DIR)

    @property
    def evaluation_dir(self) -> str:
        return storage.join(self.train.run_uri, EVALUATION_DIR)


def run_name(scheme: str, split: int | str, magnification: int | None) -> str:
    """The run folder name, e.g. ``rep0-all``, ``fold3-40x`` or (``split`` a column name)
    ``column-heldout-all``."""
    stem = f"column-{split}" if scheme == "column" else f"{scheme}{split}"
    return f"{stem}-{'all' if magnification is None else f'{magnification}x'}"


def split_spec(scheme: str, split: int | str) -> SplitSpec:
    """The split ``split`` (an index, or a column name with ``column``) of a scheme."""
    if scheme == "column":
        return SplitSpec("column", column=str(split))
    return SplitSpec(scheme, int(split))


def available_splits(manifest_columns: Sequence[str], fold_count: int, scheme: str) -> list[int]:
    """Indices of the scheme's splits in a manifest (``fold_count``: folds in its fold column)."""
    if scheme == "fold":
        return list(range(fold_count))
    return sorted(int(c[3:]) for c in manifest_columns if c.startswith("rep") and c[3:].isdigit())


def plan_runs(config: ProtocolConfig, splits: Sequence[int | str]) -> list[RunPlan]:
    """One RunPlan per (split, magnification), splits first so that concurrent threads
    start on different splits. ``splits``: indices, or column names with ``column``."""
    plans = []
    for magnification in config.magnifications:
        for index in splits:
            name = run_name(config.scheme, index, magnification)
            split = str(split_spec(config.scheme, index))
            train = replace(
                config.train,
                storage=config.root,
                name=name,
                split=split,
                magnification=magnification,
            )
            plans.append(RunPlan(name, split, magnification, train))
    return plans


def concurrent_runs(
    train: TrainConfig, runs: int, resources: Mapping[str, float], max_concurrent: int = 0
) -> int:
    """How many runs to start at once on a cluster with ``resources`` (ray.cluster_resources()).

    ``max_concurrent`` > 0 is taken as given; otherwise each run needs its
    training workers' CPUs plus one for its data pipeline (and its workers' GPUs
    with ``use_gpu``). Returns a number in 1..runs.
    """
    if runs < 1:
        return 1
    if max_concurrent > 0:
        return min(max_concurrent, runs)
    per_run = train.num_workers * train.cpus_per_worker + DATA_CPUS
    fit = math.floor(resources.get("CPU", 0) / per_run)
    if train.use_gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0) / train.num_workers))
    return max(1, min(fit, runs))


# --------------------------------------------------------------------------- the job


def _finished_artifact(plan: RunPlan) -> bool:
    """True when the run's artifact exists and was trained with exactly these options."""
    from breakhis.model.artifact import read_card

    try:
        card = read_card(plan.artifact_uri)
    except (FileNotFoundError, ValueError):
        return False
    return card.config == plan.train.to_dict()


def _run_one(plan: RunPlan, options: EvaluateOptions) -> ProtocolRun:
    """Train (unless finished before) and evaluate one run; runs in a driver thread."""
    from breakhis.evaluate.job import run_evaluation
    from breakhis.train.job import run_training

    started = time.time()
    reuse = _finished_artifact(plan)
    if reuse:
        log.info("%s: artifact with the same options exists, not training again", plan.name)
        artifact = plan.artifact_uri
    else:
        log.info("%s: training (%s, %s)", plan.name, plan.split, _mag_text(plan.magnification))
        artifact = run_training(plan.train).artifact_uri
    result = run_evaluation(
        EvaluateConfig(
            model=artifact,
            data=plan.train.data,
            out=plan.evaluation_dir,
            split=plan.split,
            options=options,
            task=plan.train.task,
        )
    )
    finished = time.time()
    headline = result.predictions[result.predictions["headline"]]
    log.info(
        "%s: patient rate %.3f, image rate %.3f (%d test patients)",
        plan.name,
        result.metrics["patient_recognition_rate"],
        result.metrics["image_recognition_rate"],
        result.split.test_patients,
    )
    return ProtocolRun(
        name=plan.name,
        split=plan.split,
        magnification=plan.magnification,
        artifact_uri=artifact,
        report_html=storage.join(plan.evaluation_dir, "report.html"),
        metrics=dict(result.metrics),
        per_magnification={m: dict(v) for m, v in result.per_magnification.items()},
        test_patients=int(headline["patient_id"].nunique()),
        test_images=int(len(headline)),
        trained=not reuse,
        started=started,
        finished=finished,
        subtype=result.subtype,
    )


def _mag_text(magnification: int | None) -> str:
    return "all magnifications" if magnification is None else f"{magnification}X"


def _check_splits(config: ProtocolConfig, dest: PreparedDest) -> list[int | str]:
    """The splits to run: indices (``config.splits``, else all the manifest has) or with
    ``column`` column names (``config.columns``, else every user-defined one); raises
    ValueError for splits it lacks or a malformed split column, and LeakageError for a
    leaking one, before any training starts."""
    if config.scheme == "column":
        columns: list[int | str] = list(config.columns or dest.user_split_columns)
        if not columns:
            raise ValueError(
                f"{config.train.data}: the manifest has no user-defined split column; add one "
                "with `breakhis prepare SRC DEST --split-file NAME=patients.txt` or name one "
                "with --columns"
            )
        for name in columns:
            dest.split(split_spec("column", name))
        return columns
    manifest = dest.manifest
    folds = (
        int(max(manifest.column("fold").to_pylist())) + 1 if "fold" in manifest.column_names else 0
    )
    present = available_splits(manifest.column_names, folds, config.scheme)
    indices = list(config.splits) or present
    missing = sorted(set(indices) - set(present))
    if missing or not indices:
        raise ValueError(
            f"{config.train.data}: the manifest has {config.scheme} splits {present}, "
            f"not {missing or indices}"
        )
    for index in indices:
        dest.split(SplitSpec(config.scheme, index))
    return list(indices)


def _run_all(
    plans: Sequence[RunPlan], options: EvaluateOptions, concurrency: int
) -> list[ProtocolRun]:
    """Every plan, ``concurrency`` at a time. Raises RuntimeError naming every run that
    failed, after the others have finished (their work is kept)."""
    runs: list[ProtocolRun] = []
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="protocol") as pool:
        futures = {pool.submit(_run_one, plan, options): plan for plan in plans}
        for future, plan in futures.items():
            try:
                runs.append(future.result())
            except Exception as err:  # one failed split must not lose the others' work
                log.error("%s failed: %s", plan.name, err)
                failures.append(f"{plan.name}: {type(err).__name__}: {err}")
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(plans)} protocol run(s) failed (the others are kept; run "
            "the same command again to redo only these): " + "; ".join(failures)
        )
    return runs


def run_protocol(config: ProtocolConfig) -> ProtocolResult:
    """Train and evaluate one model per (split, magnification) on the current Ray cluster
    (started locally if none), as many at a time as it holds, and write the report.

    Returns the ProtocolResult. Raises FileNotFoundError for missing data,
    ValueError for splits the manifest lacks, LeakageError for a leaking
    manifest, and RuntimeError naming every run that failed (the others are
    kept: running the same command again redoes only the failed ones).
    """
    started = time.perf_counter()
    dest = PreparedDest.open(config.train.data)
    indices = _check_splits(config, dest)
    plans = plan_runs(config, indices)
    # Imported after the checks: a bad input is reported before Ray, torch and pandas load.
    import ray

    from breakhis.evaluate.data import describe_scheme
    from breakhis.protocol.report import write_protocol_report

    ensure_ray()
    concurrency = concurrent_runs(
        config.train, len(plans), ray.cluster_resources(), config.max_concurrent
    )
    log.info(
        "protocol %s: %d run(s) (%d split(s) x %d model(s)), %d at a time",
        config.train.name,
        len(plans),
        len(indices),
        len(config.magnifications),
        concurrency,
    )
    runs = _run_all(plans, config.evaluation, concurrency)
    summary, matrix = aggregate(runs, config.magnifications)
    result = ProtocolResult(
        subtype=aggregate_subtypes(runs) if config.train.task == "subtype" else None,
        name=config.train.name,
        data=config.train.data,
        root=config.root,
        scheme=config.scheme,
        config_splits=tuple(str(split_spec(config.scheme, i)) for i in indices),
        magnifications=tuple(config.magnifications),
        patients=len(dest.patients),
        protocol_description=describe_scheme(
            dest.manifest, config.scheme, tuple(str(i) for i in indices)
        ),
        train_config={
            k: v
            for k, v in config.train.to_dict().items()
            if k not in ("name", "split", "magnification")
        },
        runs=tuple(runs),
        summary=summary,
        cross_magnification=matrix,
        concurrency=concurrency,
        seconds=time.perf_counter() - started,
    )
    write_protocol_report(result, config.report_dir)
    return replace(result, report_dir=config.report_dir)
