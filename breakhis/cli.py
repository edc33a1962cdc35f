"""The ``breakhis`` console command: one subcommand per job.

    breakhis synth OUT [--scale F] [--seed S]
    breakhis prepare SRC DEST [--strict] [--folds K] [--split-file NAME=PATH] ...
    breakhis train --data DEST --storage URI --name NAME [--fold K | --split column:NAME] ...
    breakhis tune --data DEST --storage URI --name NAME --search-space YAML ...
    breakhis score --model URI --input URI --out URI [--attribution gradcam]
    breakhis evaluate --model URI --data DEST [--fold K] --out DIR
    breakhis protocol --data DEST --storage URI --name NAME [--magnifications ...]
    breakhis benchmark {ingest,train,tune,score,ceiling,gpu,accuracy}
    breakhis export --model URI --format torchscript|onnx [--out DIR]
    breakhis demo [--data SRC] [--workdir DIR]

Each ``jobs/<name>.py`` calls ``main([name, *argv])``, so ``ray job submit``
and the console command run the same code with the same options. Heavy
imports (Ray, torch) happen inside the subcommands so ``--help`` is fast.

Bad input (a missing or damaged file, an option out of range, a leaking split) ends
the command with one line on stderr and exit status 2, before any Ray start: each
job checks what it can on the driver first, and Ray starts only when work begins.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from breakhis.options import add_config_options, build_config
from breakhis.raysession import ensure_ray

log = logging.getLogger("breakhis")

Command = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], Command]
_COMMANDS: dict[str, tuple[Setup, str]] = {}


def command(name: str, help_text: str) -> Callable[[Setup], Setup]:
    """Register subcommand ``name``: the decorated function adds its options
    to a parser and returns the function that runs it."""

    def register(setup: Setup) -> Setup:
        _COMMANDS[name] = (setup, help_text)
        return setup

    return register


@command("synth", "write a generated BreakHis-shaped data set (official layout and names)")
def _synth(p: argparse.ArgumentParser) -> Command:
    p.add_argument("out", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument(
        "--scale",
        type=float,
        default=0.05,
        help="fraction of the real per-subtype image counts (0.05 gives ~400 images)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--width", type=int, default=700, help="image width in pixels")
    p.add_argument("--height", type=int, default=460, help="image height in pixels")

    def run(args: argparse.Namespace) -> int:
        from breakhis import storage
        from breakhis.synth.dataset import synthesize

        storage.check_reachable(args.out)
        summary = synthesize(
            args.out, scale=args.scale, seed=args.seed, width=args.width, height=args.height
        )
        print(summary.format_table() if hasattr(summary, "format_table") else summary)
        return 0

    return run


@command("demo", "run the whole pipeline end to end on generated (or given) data")
def _demo(p: argparse.ArgumentParser) -> Command:
    from breakhis.demo import DemoConfig

    bindings = add_config_options(p, DemoConfig)

    def run(args: argparse.Namespace) -> int:
        _deferred("breakhis.demo:run_demo")(build_config(DemoConfig, args, bindings))
        return 0

    return run


def _split_aliases(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("split shortcuts (instead of --split)")
    group.add_argument(
        "--fold",
        type=int,
        default=None,
        metavar="K",
        help="use the patient-grouped fold K (same as --split fold:K)",
    )
    group.add_argument(
        "--rep",
        type=int,
        default=None,
        metavar="K",
        help="use the paper's 70/30 repetition K (same as --split rep:K)",
    )


def _split_from_aliases(args: argparse.Namespace, dest: str = "split") -> None:
    if args.fold is not None and args.rep is not None:
        raise ValueError("give one of --fold and --rep, not both")
    if args.fold is not None:
        setattr(args, dest, f"fold:{args.fold}")
    elif args.rep is not None:
        setattr(args, dest, f"rep:{args.rep}")


def _deferred(target: str) -> Callable[[Any], Any]:
    """The function ``module:name``, imported only when called: the jobs' modules import
    torch and Ray, which ``--help`` must not wait for."""
    module, _, name = target.partition(":")

    def call(config: Any) -> Any:
        return getattr(importlib.import_module(module), name)(config)

    return call


def _job_command(
    p: argparse.ArgumentParser,
    cls: type,
    runner: Callable[[Any], Any],
    *,
    split_dest: str | None = None,
    needs_ray: bool = True,
    starts_ray: bool = False,
    positional: tuple[str, ...] = (),
    check: Callable[[Any], None] | None = None,
    refuse: dict[str, str] | None = None,
) -> Command:
    """Add the fields of the config dataclass ``cls`` to ``p`` as options (``positional``
    fields as positional arguments) and return the command that builds the config and
    prints the ``format_table()`` of what ``runner`` returns for it. ``check`` looks at
    the config before Ray starts (raising ValueError or FileNotFoundError for bad input).
    ``refuse``: fields of ``cls`` the command cannot honour, with the reason (options.py).
    ``starts_ray``: the runner checks its input and then connects to Ray itself
    (``--ray-address`` reaches it as RAY_ADDRESS), so the command does not start Ray
    before it."""
    bindings = add_config_options(p, cls, positional=positional, refuse=refuse)
    if split_dest:
        _split_aliases(p)
    if needs_ray:
        p.add_argument(
            "--ray-address",
            default=None,
            help="Ray cluster address (default: RAY_ADDRESS, else a local instance)",
        )

    def run(args: argparse.Namespace) -> int:
        if split_dest:
            _split_from_aliases(args, split_dest)
        cfg = build_config(cls, args, bindings)  # validates before Ray starts
        _check_s3_endpoint(cfg)
        if check is not None:
            check(cfg)
        if needs_ray and starts_ray:
            if args.ray_address:
                os.environ["RAY_ADDRESS"] = args.ray_address
        elif needs_ray:
            ensure_ray(args.ray_address)
        result = runner(cfg)
        print(result.format_table())
        return 0

    return run


def _s3_uris(value: object) -> Iterator[str]:
    """Every s3:// string in a config (nested dataclasses, lists and dicts included)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _s3_uris(getattr(value, item.name))
    elif isinstance(value, str) and value.startswith("s3://"):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _s3_uris(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _s3_uris(item)


def _check_s3_endpoint(config: object) -> None:
    """Fail in seconds, before Ray starts, when the S3 endpoint does not answer (every s3://
    URI goes to the one endpoint of the environment, so asking once is enough)."""
    from breakhis import storage

    first = next(_s3_uris(config), None)
    if first is not None:
        storage.check_reachable(first)


def _source_exists(config) -> None:
    from breakhis import storage

    if not storage.exists(config.src):  # before Ray starts: a typo costs no cluster
        raise FileNotFoundError(f"{config.src}: no such file or folder")


def _split_exists(config) -> None:
    """The training split of a sweep's TrainConfig is in its data's manifest and leaks no
    patient (each trial plans its own run; ``train`` checks in run_training)."""
    from breakhis.data.dest import PreparedDest
    from breakhis.data.splits import SplitSpec

    spec = SplitSpec.parse(config.split, val_fraction=config.val_fraction, seed=config.seed)
    PreparedDest.open(config.data).split(spec)  # LeakageError for a leaking manifest


def _train_inputs_exist(config) -> None:
    """The run's data and split, as run_training plans them (a light module: no torch or Ray
    is imported before a missing or leaking manifest is reported)."""
    from breakhis.train.plan import plan_data

    plan_data(config)


def _model_card_exists(config) -> None:
    """The model's card (breakhis.model.card: no torch) before the scoring job is imported;
    the job checks the weights."""
    from breakhis.model.card import read_card

    read_card(config.model)


def _sweep_inputs_exist(config) -> None:
    from breakhis.tune.config import resolve_space

    resolve_space(config)  # a missing or bad search-space file
    _split_exists(config.train)


@command("prepare", "catalog SRC, check every image decodes, write shards + manifest to DEST")
def _prepare(p: argparse.ArgumentParser) -> Command:
    from breakhis.data.prepare_config import PrepareConfig

    return _job_command(
        p,
        PrepareConfig,
        _deferred("breakhis.data.prepare:prepare"),
        positional=("src", "dest"),
        check=_source_exists,
        starts_ray=True,
    )


@command("train", "fine-tune a classifier with Ray Train (DDP) on one split of a prepared DEST")
def _train(p: argparse.ArgumentParser) -> Command:
    from breakhis.train.config import TrainConfig

    # run_training reads the manifest and checks the split again before it starts Ray.
    runner = _deferred("breakhis.train.job:run_training")
    return _job_command(
        p, TrainConfig, runner, split_dest="split", starts_ray=True, check=_train_inputs_exist
    )


@command("tune", "hyperparameter sweep with Ray Tune (ASHA) over full training runs")
def _tune(p: argparse.ArgumentParser) -> Command:
    from breakhis.tune.config import SweepConfig

    runner = _deferred("breakhis.tune.job:run_sweep")
    refuse = {
        "num_workers": "each trial's Train workers are --workers-per-trial (default: one per "
        "whole GPU of --gpus-per-trial, at least one)",
        "use_gpu": "trials train on GPUs when --gpus-per-trial is above 0",
    }
    return _job_command(
        p, SweepConfig, runner, split_dest="split", check=_sweep_inputs_exist, refuse=refuse
    )


@command("score", "batch-score tiles: predictions and attribution maps as Parquet, exactly once")
def _score(p: argparse.ArgumentParser) -> Command:
    from breakhis.score.config import ScoreConfig

    runner = _deferred("breakhis.score.job:run_scoring")
    return _job_command(p, ScoreConfig, runner, starts_ray=True, check=_model_card_exists)


@command("evaluate", "evaluate a model on its held-out patients and write the report")
def _evaluate(p: argparse.ArgumentParser) -> Command:
    from breakhis.evaluate.config import EvaluateConfig

    runner = _deferred("breakhis.evaluate.job:run_evaluation")
    return _job_command(
        p,
        EvaluateConfig,
        runner,
        split_dest="split",
        starts_ray=True,
        check=EvaluateConfig.check_inputs,
    )


@command("protocol", "the paper's protocol: train and evaluate one model per split, mean +- std")
def _protocol(p: argparse.ArgumentParser) -> Command:
    from breakhis.protocol.config import ProtocolConfig

    runner = _deferred("breakhis.protocol.job:run_protocol")
    refuse = {
        "split": "the protocol sets each run's split; use --scheme rep|fold with --splits "
        "K,... or --scheme column with --columns NAME,...",
        "magnification": "the protocol sets each run's magnification; use --magnifications "
        "(e.g. all,40,100,200,400)",
    }
    return _job_command(p, ProtocolConfig, runner, starts_ray=True, refuse=refuse)


_BENCHMARKS: dict[str, tuple[str, str]] = {
    "ingest": (
        "breakhis.benchmarks.ingest:IngestBenchmarkConfig",
        "Ray Data ingest vs a torch DataLoader (images/s, first and later epoch)",
    ),
    "train": (
        "breakhis.benchmarks.train:TrainBenchmarkConfig",
        "Ray Train epoch time vs a plain PyTorch loop",
    ),
    "tune": (
        "breakhis.benchmarks.tune:TuneBenchmarkConfig",
        "an N-trial sweep vs the same N runs one after another",
    ),
    "score": (
        "breakhis.benchmarks.score:ScoreBenchmarkConfig",
        "scoring job tiles/s vs a plain PyTorch loop, and peak memory vs input size",
    ),
    "ceiling": (
        "breakhis.benchmarks.ceiling:CeilingBenchmarkConfig",
        "host-side ceiling: training iterator and predictor images/s into a step that does "
        "nothing, vs an in-memory indexer",
    ),
    "gpu": (
        "breakhis.benchmarks.gpu:GpuBenchmarkConfig",
        "every GPU figure on one GPU: predictor, decode ceiling, train and score benchmarks",
    ),
    "accuracy": (
        "breakhis.benchmarks.accuracy:AccuracyBenchmarkConfig",
        "train + evaluate vs a plain PyTorch loop: the paper's rates on the same splits",
    ),
}
"""Benchmark name -> (its config class as module:name, help line). Each module's runner is
``run_<name>_benchmark``, imported when the benchmark runs."""


def benchmark_config(name: str) -> type:
    """The config class of benchmark ``name`` (imports its module)."""
    module, _, cls = _BENCHMARKS[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


@command("benchmark", "benchmarks, each against a baseline in the same run (speed, accuracy)")
def _benchmark(p: argparse.ArgumentParser, chosen: str | None = None) -> Command:
    """Every benchmark is listed; only the ``chosen`` one's options are built (its module
    is imported)."""
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (target, help_text) in _BENCHMARKS.items():
        bp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            cls = benchmark_config(name)
            bindings = add_config_options(bp, cls)
            runner = _deferred(f"{target.partition(':')[0]}:run_{name}_benchmark")
            bp.set_defaults(_bench=(cls, runner, bindings))

    def run(args: argparse.Namespace) -> int:
        cls, runner, bindings = args._bench
        result = runner(build_config(cls, args, bindings))
        print(result.format_table())
        return 0

    return run


@command(
    "export", "export a model artifact as TorchScript or ONNX, with its preprocessing contract"
)
def _export(p: argparse.ArgumentParser) -> Command:
    from breakhis.model.export_config import ExportConfig

    return _job_command(
        p, ExportConfig, _deferred("breakhis.model.export:export_model"), needs_ray=False
    )


def build_parser(
    chosen: str | None = None, benchmark: str | None = None
) -> argparse.ArgumentParser:
    """The argument parser. Only the ``chosen`` subcommand's options (and of ``benchmark``
    ``chosen``, only that benchmark's) are built: they import its config module. The
    others are listed with their help line."""
    parser = argparse.ArgumentParser(
        prog="breakhis",
        description="Ray-native pipeline for BreakHis histopathology: prepare, train, tune, "
        "score and explain benign-vs-malignant classifiers.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging for breakhis (other libraries' loggers stay at INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (setup, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            run = setup(sub_parser, benchmark) if name == "benchmark" else setup(sub_parser)
            sub_parser.set_defaults(_run=run)
    return parser


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser ``main`` uses for a command line (without the program name): the options
    of the command (and benchmark) it names, built."""
    words = [a for a in argv if not a.startswith("-")]
    chosen = words[0] if words and words[0] in _COMMANDS else None
    benchmark = words[1] if chosen == "benchmark" and len(words) > 1 else None
    return build_parser(chosen, benchmark if benchmark in _BENCHMARKS else None)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line (without the program name) as ``main`` does, running nothing.
    Exits through argparse (status 2) for arguments the command does not take."""
    return parser_for(argv).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Returns the exit status: 0 on success, 2 for bad
    input (with a one-line message naming what was wrong), 1 otherwise."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:
        # Only this package's loggers: botocore, urllib3 and friends at DEBUG print request
        # headers (signed URLs, tokens), so every other logger stays at the root's INFO.
        log.setLevel(logging.DEBUG)
    try:
        return args._run(args)
    except Exception as err:
        if not _is_bad_input(err):
            raise
        # Bad input: say what was wrong, not a traceback from deep inside Ray.
        print(f"breakhis {args.command}: error: {err}", file=sys.stderr)
        return 2


def _is_bad_input(err: Exception) -> bool:
    """True for what the user can fix: a bad value or file, a manifest that puts a patient
    on two sides of a split (LeakageError), an S3 endpoint that does not answer (the
    user's AWS_ENDPOINT_URL or network). Whoever raised the last two has imported
    breakhis.data.splits or breakhis.storage."""
    if isinstance(err, ValueError | FileNotFoundError | PermissionError):
        return True
    splits, storage = sys.modules.get("breakhis.data.splits"), sys.modules.get("breakhis.storage")
    if splits is not None and isinstance(err, splits.LeakageError):
        return True
    return storage is not None and isinstance(err, storage.S3UnreachableError)


if __name__ == "__main__":
    sys.exit(main())
