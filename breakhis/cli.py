"""The ``breakhis`` console command: one subcommand per job.

    breakhis synth OUT [--scale F] [--seed S]
    breakhis prepare SRC DEST [--strict] [--folds K] ...
    breakhis demo [--data SRC] [--workdir DIR]

Each ``jobs/<name>.py`` calls ``main([name, *argv])``, so ``ray job submit``
and the console command run the same code with the same options. Heavy
imports (Ray, torch) happen inside the subcommands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

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


def init_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster (``RAY_ADDRESS`` or ``address``), or start a
    local instance when there is none."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, configure_logging=False)


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
        from breakhis.synth import synthesize

        summary = synthesize(
            args.out, scale=args.scale, seed=args.seed, width=args.width, height=args.height
        )
        print(summary.format_table() if hasattr(summary, "format_table") else summary)
        return 0

    return run


@command("prepare", "catalog SRC, check every image decodes, write shards + manifest to DEST")
def _prepare(p: argparse.ArgumentParser) -> Command:
    p.add_argument("src", help="BreakHis root (local folder or s3://bucket/prefix), any nesting")
    p.add_argument("dest", help="output root (local folder or s3://bucket/prefix)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail, naming every file, if a file name does not parse "
        "(default: skip such files and list them in rejects.parquet)",
    )
    p.add_argument("--folds", type=int, default=5, help="patient-grouped folds (default 5)")
    p.add_argument(
        "--repetitions",
        type=int,
        default=5,
        help="repetitions of the paper's random 70/30 patient split (default 5)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="share of patients tested in each repetition (default 0.3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    p.add_argument(
        "--shard-mb", type=float, default=128.0, help="target shard size in MB (default 128)"
    )
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=64,
        help="most rows per Parquet row group (default 64)",
    )
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)"
    )

    def run(args: argparse.Namespace) -> int:
        from breakhis.prepare import PrepareConfig, prepare

        config = PrepareConfig(
            src=args.src,
            dest=args.dest,
            strict=args.strict,
            folds=args.folds,
            repetitions=args.repetitions,
            test_fraction=args.test_fraction,
            seed=args.seed,
            shard_mb=args.shard_mb,
            row_group_rows=args.row_group_rows,
        )
        init_ray(args.ray_address)
        print(prepare(config).format_table())
        return 0

    return run


@command("demo", "run the whole pipeline end to end on generated (or given) data")
def _demo(p: argparse.ArgumentParser) -> Command:
    p.add_argument(
        "--data",
        default=None,
        help="a real BreakHis root to use instead of generated data (local or s3://)",
    )
    p.add_argument(
        "--workdir",
        default="demo-output",
        help="local folder for the demo's outputs (default demo-output)",
    )
    p.add_argument("--scale", type=float, default=0.05, help="size of the generated data set")
    p.add_argument("--seed", type=int, default=0, help="seed for data, splits and training")

    def run(args: argparse.Namespace) -> int:
        from breakhis.demo import DemoConfig, run_demo

        run_demo(DemoConfig(data=args.data, workdir=args.workdir, scale=args.scale, seed=args.seed))
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="breakhis",
        description="Ray-native pipeline for BreakHis histopathology: prepare, train, tune, "
        "score and explain benign-vs-malignant classifiers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (setup, help_text) in _COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_run=setup(sub_parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Returns the exit status: 0 on success, 2 for bad
    input (with a one-line message naming what was wrong), 1 otherwise."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args._run(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        # Bad input: say what was wrong, not a traceback from deep inside Ray.
        print(f"breakhis {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
