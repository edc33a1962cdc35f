"""The console command and the job entry points: help for every option, clear errors."""

import argparse
import ast
import dataclasses
import importlib
import logging
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from breakhis import cli
from breakhis.options import field_docs

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "train": "breakhis.train.config:TrainConfig",
    "score": "breakhis.score.config:ScoreConfig",
    "evaluate": "breakhis.evaluate.config:EvaluateConfig",
    "protocol": "breakhis.protocol.config:ProtocolConfig",
    "tune": "breakhis.tune.config:SweepConfig",
    "demo": "breakhis.demo:DemoConfig",
    "export": "breakhis.model.export_config:ExportConfig",
}


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _flags(cls) -> set[str]:
    flags = set()
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            flags |= _flags(hints[item.name])
        else:
            flags.add("--" + item.name.replace("_", "-"))
    return flags


def test_top_level_help_lists_every_command(capsys):
    out = _help(capsys)
    for name in (
        "synth",
        "prepare",
        "train",
        "tune",
        "score",
        "evaluate",
        "protocol",
        "benchmark",
        "demo",
        "export",
    ):
        assert name in out


REFUSED = {"tune": {"--num-workers", "--use-gpu"}, "protocol": {"--split", "--magnification"}}
"""Options of a command's config that the command refuses (it sets them itself)."""
HEAVY = (
    "torch",
    "torchvision",
    "ray",
    "mlflow",
    "sklearn",
    "scipy",
    "pandas",
    "matplotlib",
    "captum",
    "boto3",
    "pyarrow.parquet",
    "pyarrow.compute",
    "pyarrow.dataset",
)
"""What ``--help`` must not import: each takes from 0.2 s (pyarrow.parquet) to several
seconds (torch). pyarrow's core (breakhis.storage's pyarrow.fs) and numpy are allowed."""
HELP_SECONDS = 3.0
"""A generous bound: a help takes about 0.4 s on a loaded 2-core machine (README.md)."""
_HELP_SCRIPT = """
import io, contextlib, sys, time
start = time.perf_counter()
from breakhis import cli
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        cli.main(sys.argv[1:])
    except SystemExit as done:
        assert done.code == 0, done.code
assert "usage: breakhis" in out.getvalue()
heavy = sorted(m for m in sys.modules if m in {heavy} or m.split(".")[0] in {heavy})
print(f"{{time.perf_counter() - start:.3f}}", *heavy)
"""


def _every_help() -> list[list[str]]:
    return [
        ["--help"],
        *([name, "--help"] for name in cli._COMMANDS),
        *(["benchmark", name, "--help"] for name in cli._BENCHMARKS),
    ]


@pytest.mark.parametrize("argv", _every_help(), ids=" ".join)
def test_help_is_fast_and_imports_no_heavy_library(argv):
    """Each ``--help`` in a fresh interpreter: under HELP_SECONDS from start to exit, and
    none of HEAVY imported (torch alone takes seconds and ~1 GB)."""
    script = _HELP_SCRIPT.format(heavy=repr(set(HEAVY)))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    seconds, *heavy = done.stdout.split()
    assert heavy == [], f"breakhis {' '.join(argv)} imports {heavy}"
    assert wall < HELP_SECONDS, f"breakhis {' '.join(argv)} took {wall:.2f} s ({seconds} s inside)"


NOT_BEFORE_THE_INPUT_CHECK = ("torch", "torchvision", "ray", "mlflow", "captum")
"""What a command must not import before it has refused a missing input (torch and Ray take
seconds: a typo in a path is reported in well under a second)."""
_BAD_INPUT_SCRIPT = """
import sys
from breakhis import cli
assert cli.main(sys.argv[1:]) == 2
print(*sorted({{m.split(".")[0] for m in sys.modules}} & {heavy}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "{x}/data", "--storage", "{x}/runs", "--name", "n"],
        ["tune", "--data", "{x}/data", "--storage", "{x}/runs", "--name", "n",
         "--search-space", "{x}/space.yaml", "--val-fraction", "0.2"],
        ["protocol", "--data", "{x}/data", "--storage", "{x}/runs", "--name", "n"],
        ["evaluate", "--model", "{x}/model", "--data", "{x}/data", "--out", "{x}/report"],
        ["score", "--model", "{x}/model", "--input", "{x}/tiles", "--out", "{x}/scores"],
    ],
    ids=lambda argv: argv[0],
)  # fmt: skip
def test_a_missing_input_is_refused_before_torch_or_ray_is_imported(tmp_path, argv):
    script = _BAD_INPUT_SCRIPT.format(heavy=repr(set(NOT_BEFORE_THE_INPUT_CHECK)))
    done = subprocess.run(
        [sys.executable, "-c", script, *(a.format(x=tmp_path) for a in argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"breakhis {argv[0]}: error: {tmp_path}/" in done.stderr, done.stderr
    assert done.stdout.split() == [], f"breakhis {argv[0]} imported {done.stdout.split()}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_field_is_an_option_with_help(capsys, name):
    out = _help(capsys, name)
    cls = _load(CONFIGS[name])
    for flag in _flags(cls) - REFUSED.get(name, set()):
        assert flag in out or flag.replace("--", "--train-") in out, (name, flag)
    docs = field_docs(cls)
    assert docs and all(docs.values())


@pytest.mark.parametrize(
    ("bench", "config"),
    [
        ("ingest", "breakhis.benchmarks.ingest:IngestBenchmarkConfig"),
        ("train", "breakhis.benchmarks.train:TrainBenchmarkConfig"),
        ("tune", "breakhis.benchmarks.tune:TuneBenchmarkConfig"),
        ("score", "breakhis.benchmarks.score:ScoreBenchmarkConfig"),
        ("gpu", "breakhis.benchmarks.gpu:GpuBenchmarkConfig"),
        ("accuracy", "breakhis.benchmarks.accuracy:AccuracyBenchmarkConfig"),
    ],
)
def test_benchmark_help_lists_every_option_of_its_config(capsys, bench, config):
    out = _help(capsys, "benchmark", bench)
    cls = _load(config)
    assert cli.benchmark_config(bench) is cls
    assert _flags(cls) and all(flag in out for flag in _flags(cls)), (bench, out)
    assert all(field_docs(cls).values())


@pytest.mark.parametrize("name", ["synth", "prepare"])
def test_positional_commands_help(capsys, name):
    assert "usage: breakhis " + name in _help(capsys, name)


def test_bad_option_value_names_the_option_and_what_is_accepted(capsys):
    code = cli.main(["train", "--data", "d", "--storage", "s", "--name", "n", "--arch", "alexnet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "alexnet" in err and "resnet50" in err
    assert "Traceback" not in err


def test_split_shortcuts(capsys):
    code = cli.main(
        ["train", "--data", "d", "--storage", "s", "--name", "n", "--fold", "1", "--rep", "2"]
    )
    assert code == 2
    assert "--fold and --rep" in capsys.readouterr().err


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["prepare", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert code == 2
    assert "nope: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("job", sorted(p.stem for p in (REPO / "jobs").glob("*.py")))
def test_job_entry_points_are_thin_and_match_a_command(job):
    text = (REPO / "jobs" / f"{job}.py").read_text()
    assert f'main(["{job}", *sys.argv[1:]])' in text
    assert job in cli._COMMANDS


def test_job_entry_point_runs_from_any_directory(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "prepare.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--shard-mb" in done.stdout


def test_verbose_is_debug_for_breakhis_only(tmp_path):
    # botocore at DEBUG prints every request's headers; -v must not turn that on.
    script = (
        "import logging, sys\n"
        "import boto3\n"
        "from breakhis import cli\n"
        f"code = cli.main(['-v', 'prepare', {str(tmp_path / 'nope')!r}, {str(tmp_path / 'out')!r}])\n"
        "logging.getLogger('breakhis.data.prepare').debug('breakhis-debug-line')\n"
        "boto3.client('s3', endpoint_url='http://127.0.0.1:9', region_name='us-east-1',\n"
        "             aws_access_key_id='k', aws_secret_access_key='s')\n"
        "print(code, *(logging.getLogger(n).getEffectiveLevel() for n in\n"
        "      ('botocore', 'boto3', 'urllib3', 's3transfer', 'ray', 'breakhis.storage')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    code, *levels = done.stdout.split()
    assert code == "2", done.stderr
    assert [int(v) for v in levels] == [logging.INFO] * 5 + [logging.DEBUG]
    assert "breakhis-debug-line" in done.stderr
    assert " DEBUG botocore" not in done.stderr and " DEBUG urllib3" not in done.stderr, (
        done.stderr[-2000:]
    )


def test_user_defined_splits_reach_every_job_config(tmp_path, monkeypatch, capsys):
    import breakhis.data.prepare
    import breakhis.evaluate.job
    import breakhis.protocol.job
    import breakhis.train.job
    import breakhis.train.plan
    from breakhis.evaluate.config import EvaluateConfig

    built = {}

    class Done:
        def format_table(self) -> str:
            return "done"

    def capture(name: str):
        def run(config):
            built[name] = config
            return Done()

        return run

    monkeypatch.setattr(breakhis.train.job, "run_training", capture("train"))
    # No data nor model here: the checks the commands run before importing a job pass.
    monkeypatch.setattr(breakhis.train.plan, "plan_data", lambda config: None)
    monkeypatch.setattr(EvaluateConfig, "check_inputs", lambda config: None)
    monkeypatch.setattr(breakhis.evaluate.job, "run_evaluation", capture("evaluate"))
    monkeypatch.setattr(breakhis.protocol.job, "run_protocol", capture("protocol"))
    monkeypatch.setattr(breakhis.data.prepare, "prepare", capture("prepare"))
    run = ["--data", str(tmp_path / "prepared"), "--storage", str(tmp_path), "--name", "n"]

    assert cli.main(["train", *run, "--split", "column:site_a"]) == 0
    assert built["train"].split == "column:site_a"
    evaluate = ["evaluate", "--model", "m", "--data", "d", "--out", "o"]
    assert cli.main([*evaluate, "--split", "column:site_a"]) == 0
    assert built["evaluate"].split == "column:site_a"
    assert cli.main(["protocol", *run, "--scheme", "column", "--columns", "site_a,b"]) == 0
    assert (built["protocol"].scheme, built["protocol"].columns) == ("column", ("site_a", "b"))
    (tmp_path / "src").mkdir()
    prepare = ["prepare", str(tmp_path / "src"), str(tmp_path / "dest")]
    assert cli.main([*prepare, "--split-file", "a=x,1.txt", "--split-file", "b=y.txt"]) == 0
    assert built["prepare"].split_file == ("a=x,1.txt", "b=y.txt")  # one entry per use
    capsys.readouterr()

    # A bad split name is one line and exit status 2, whichever job is given it.
    assert cli.main(["train", *run, "--split", "column:"]) == 2
    assert cli.main([*evaluate, "--split", "column:a b"]) == 2
    assert cli.main(["protocol", *run, "--split", "column:site_a"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "Traceback" not in "".join(lines)
    assert "column name ''" in lines[0] and "column name 'a b'" in lines[1]
    assert "the protocol sets each run's split" in lines[2]


# --- what --help shows, what a command refuses ------------------------------------------

BASE_ARGS = {
    "train": ["--data", "d", "--storage", "s", "--name", "n"],
    "tune": ["--data", "d", "--storage", "s", "--name", "n", "--val-fraction", "0.2"],
    "protocol": ["--data", "d", "--storage", "s", "--name", "n"],
    "score": ["--model", "m", "--input", "i", "--out", "o"],
    "evaluate": ["--model", "m", "--data", "d", "--out", "o"],
    "export": ["--model", "m"],
}
"""The required options of the commands whose choices are checked below."""


def _choice_options(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(flag, choices) of every option whose metavar lists its choices ({a,b,c})."""
    parser = cli.build_parser(argv[0], argv[1] if argv[0] == "benchmark" else None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[argv[0]]
    if argv[0] == "benchmark":
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[argv[1]]
    return [
        (a.option_strings[0], a.metavar[1:].split("}")[0].split(","))
        for a in parser._actions
        if isinstance(a.metavar, str) and a.metavar.startswith("{")
    ]


def test_help_shows_choices_and_boolean_defaults(capsys):
    out = " ".join(_help(capsys, "train").split())
    assert "--arch {resnet50,resnet18,vgg16,efficientnet_b0,smallcnn,timm:NAME}" in out
    assert "--geometry {aspect,square}" in out
    assert "--magnification {40,100,200,400,all}" in out
    assert "(default: --amp)" in out and "(default: --no-refit)" in out
    out = _help(capsys, "score")
    assert "--attribution {gradcam,integrated_gradients,ig,occlusion,lime,none}" in out
    assert "--device {auto,cpu,cuda}" in out
    assert "--magnifications {all,40,100,200,400},..." in _help(capsys, "protocol")


@pytest.mark.parametrize("command", sorted(BASE_ARGS))
def test_a_value_outside_the_choices_is_refused_in_one_line(capsys, command):
    """Every option with choices: a value outside them ends the command with status 2 and
    one line naming the option and the values it takes."""
    options = _choice_options([command])
    assert options, command
    for flag, choices in options:
        numeric = all(c.isdigit() or c == "all" for c in choices)
        bad = "7" if numeric else "bogus"
        code = cli.main([command, *BASE_ARGS[command], flag, bad])
        err = capsys.readouterr().err.strip()
        assert code == 2, (command, flag)
        assert len(err.splitlines()) == 1, (command, flag, err)
        assert bad in err and choices[0] in err, (command, flag, err)


@pytest.mark.parametrize(
    ("command", "given", "names"),
    [
        ("tune", ["--num-workers", "4"], "--workers-per-trial"),
        ("tune", ["--use-gpu"], "--gpus-per-trial"),
        ("tune", ["--no-use-gpu"], "--gpus-per-trial"),
        ("protocol", ["--split", "fold:0"], "--splits"),
        ("protocol", ["--magnification", "40"], "--magnifications"),
    ],
)
def test_options_a_command_cannot_honour_are_refused(capsys, command, given, names):
    code = cli.main([command, *BASE_ARGS[command], *given])
    err = capsys.readouterr().err.strip()
    flag = given[0].replace("--no-", "--")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"breakhis {command}: error: {flag}:")
    assert names in err
    shown = re.compile(rf"(?<![\w-]){flag}(?![\w-])")
    assert not shown.search(_help(capsys, command)), f"{flag} is refused: not in --help"


def test_score_takes_out_and_still_the_deprecated_output(caplog, capsys):
    args = cli.parse_args(["score", "--model", "m", "--input", "i", "--out", "o"])
    assert args.out == "o" and not caplog.records
    args = cli.parse_args(["score", "--model", "m", "--input", "i", "--output", "o"])
    assert args.out == "o"
    assert any("--output is deprecated" in r.getMessage() for r in caplog.records)
    assert "--out OUT, --output OUT" in _help(capsys, "score")


def _every_option() -> set[str]:
    flags: set[str] = set()

    def collect(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)

    for name in cli._COMMANDS:
        for bench in cli._BENCHMARKS if name == "benchmark" else [None]:
            collect(cli.build_parser(name, bench))
    return flags


def test_errors_name_only_options_that_exist():
    """Every ``--flag`` in the text of a ``raise`` in the package is an option of some
    command (the protocol once told users to pass a --per-magnification nobody took)."""
    flags = _every_option()
    named = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    unknown, seen = [], 0
    for path in sorted((REPO / "breakhis").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and node.exc is not None):
                continue
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    for flag in named.findall(part.value):
                        seen += 1
                        if flag not in flags:
                            unknown.append(f"{path.relative_to(REPO)}:{node.lineno} {flag}")
    assert seen > 50, "the scan should find the options the errors name"
    assert unknown == []
