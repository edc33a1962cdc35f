"""Every command in README.md and docs/*.md runs, as far as it can be checked without a
cluster or data: each ``breakhis ...`` line of a shell block parses with the package's own
parser, and each ``ray job submit ...`` line is accepted by Ray's own CLI (its click command
and the runtime-env check it runs before contacting anyone), its entry point included.

What counts as a command: a fenced block marked ``bash``, ``sh``, ``shell`` or ``console``;
lines ending in ``\\`` joined to the next; ``# ...`` comments dropped; a line cut into simple
commands at ``;``, ``&&``, ``||``, ``|`` and ``&``; ``VAR=value`` words before a command left
out. Blocks without a language (program output) are not commands.

Placeholders: a ``...`` word stands for something the text shows elsewhere. After an option
that takes a value it is that value (checked as ``x``); anywhere else it stands for options
(dropped), and since those may include required ones, a command with such a ``...`` is parsed
without insisting on required options. Every option written out must still exist and take the
value written.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from breakhis import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
OPERATORS = {";", "&&", "||", "|", "&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
JOB_COMMAND = re.compile(r'main\(\[\s*"([a-z_-]+)"')


@dataclass(frozen=True)
class Command:
    """One simple command of a shell block, and where it is."""

    where: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def shell_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the opening fence, lines) of every shell block of a Markdown text."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i].strip())
        if not fence:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i].strip()):
            body.append(lines[i])
            i += 1
        i += 1
        if fence.group(1) in SHELL:
            yield start, body


def simple_commands(path: Path) -> Iterator[Command]:
    """Every simple command of the shell blocks of ``path`` (module docstring)."""
    for start, body in shell_blocks(path.read_text()):
        logical: list[tuple[int, str]] = []
        for offset, line in enumerate(body):
            if logical and logical[-1][1].endswith("\\"):
                number, text = logical[-1]
                logical[-1] = (number, text[:-1] + " " + line.strip())
            else:
                logical.append((start + 1 + offset, line.strip()))
        for number, text in logical:
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words: list[str] = []
            for word in [*lexer, ";"]:
                if word in OPERATORS:
                    while words and ASSIGNMENT.match(words[0]):
                        words.pop(0)
                    if words:
                        where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                        yield Command(f"{where}:{number}", tuple(words))
                    words = []
                else:
                    words.append(word)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def _takes_a_value(parser: argparse.ArgumentParser, flag: str) -> bool:
    for sub in _subparsers(parser):
        for action in sub._actions:
            if flag in action.option_strings:
                return action.nargs != 0
    return False


def check_breakhis(argv: list[str]) -> None:
    """Parse ``breakhis ARGV`` as the console command would, running nothing; ``...`` as the
    module docstring says. Raises AssertionError naming what argparse refused."""
    parser = cli.parser_for([a for a in argv if a != "..."])
    words: list[str] = []
    elided = False
    for word in argv:
        if word != "...":
            words.append(word)
        elif words and words[-1].startswith("-") and _takes_a_value(parser, words[-1]):
            words.append("x")
        else:
            elided = True
    if elided:
        for sub in _subparsers(parser):
            for action in sub._actions:
                if action.option_strings:
                    action.required = False
    messages: list[str] = []
    for sub in _subparsers(parser):
        sub.error = messages.append  # type: ignore[method-assign]  (argparse exits otherwise)
        sub.exit_on_error = False
    try:
        parser.parse_args(words)
    except (argparse.ArgumentError, SystemExit, TypeError) as err:
        messages.append(str(err))
    assert not messages, f"breakhis {shlex.join(argv)}: {messages[0]}"


def check_ray_job_submit(argv: list[str], cwd: Path) -> None:
    """``ray job submit ARGV`` through Ray's own click command and its runtime-env parsing
    (files relative to ``cwd``), then the entry point ``python jobs/<job>.py ...`` through
    check_breakhis. Raises AssertionError (or Ray's error) for what Ray or the job refuses."""
    import click
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit

    cut = argv.index("--") if "--" in argv else len(argv)
    argv = [a for a in argv[:cut] if a != "..."] + argv[cut:]  # Ray's own options: elided
    try:
        context = submit.make_context("submit", list(argv))
    except click.ClickException as err:
        raise AssertionError(f"ray job submit refuses {shlex.join(argv)}: {err}") from err
    params = context.params
    runtime_env = params["runtime_env"]
    try:
        parse_runtime_env_args(
            runtime_env=str(cwd / runtime_env) if runtime_env else None,
            runtime_env_json=params["runtime_env_json"],
            working_dir=params["working_dir"],
        )
    except (ValueError, OSError) as err:
        raise AssertionError(f"ray job submit refuses {shlex.join(argv)}: {err}") from err
    entry = list(params["entrypoint"])
    if entry[:1] == ["python"] and len(entry) > 1 and entry[1].startswith("jobs/"):
        script = cwd / entry[1]
        assert script.is_file(), f"ray job submit runs {entry[1]}, which does not exist"
        job = JOB_COMMAND.search(script.read_text())
        assert job, f"{entry[1]} calls no breakhis.cli.main([COMMAND, ...])"
        check_breakhis([job.group(1), *entry[2:]])


def _commands() -> list[Command]:
    return [c for path in DOCS for c in simple_commands(path)]


def _is_breakhis(command: Command) -> bool:
    return Path(command.words[0]).name == "breakhis"


def _is_ray_job_submit(command: Command) -> bool:
    return command.words[:3] == ("ray", "job", "submit")


def test_the_docs_hold_commands_to_check():
    commands = _commands()
    assert {p.name for p in DOCS} >= {
        "README.md",
        "architecture.md",
        "benchmarks.md",
        "cluster-and-security.md",
        "data-and-splits.md",
        "evaluation.md",
        "scoring.md",
        "training.md",
    }
    assert sum(map(_is_breakhis, commands)) >= 20
    assert sum(map(_is_ray_job_submit, commands)) >= 10


@pytest.mark.parametrize("command", [c for c in _commands() if _is_breakhis(c)], ids=str)
def test_every_breakhis_command_in_the_docs_parses(command):
    check_breakhis(list(command.words[1:]))


@pytest.mark.parametrize("command", [c for c in _commands() if _is_ray_job_submit(c)], ids=str)
def test_every_ray_job_submit_in_the_docs_is_accepted_by_ray(command):
    check_ray_job_submit(list(command.words[3:]), REPO)


def test_the_checks_refuse_what_ray_and_breakhis_refuse(tmp_path):
    """The checks can fail: the README's old MLflow line (both runtime-env options), an
    option nobody takes, a job script that is not there."""
    both = (
        "ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . "
        '--runtime-env-json \'{"env_vars": {"MLFLOW_TRACKING_URI": "http://m:5000"}}\' -- '
        "python jobs/tune.py --data s3://b/prepared --storage s3://b/sweeps --name s ..."
    )
    with pytest.raises(AssertionError, match="Only one of --runtime_env and --runtime-env-json"):
        check_ray_job_submit(shlex.split(both)[3:], REPO)
    with pytest.raises(AssertionError, match="--per-magnification"):
        check_breakhis(
            ["protocol", "--data", "d", "--storage", "s", "--name", "n", "--per-magnification"]
        )
    with pytest.raises(AssertionError, match="required"):
        check_breakhis(["train", "--data", "d"])
    check_breakhis(["train", "...", "--tracking-uri", "sqlite:///runs/mlflow.db"])
    check_breakhis(["protocol", "--data", "...", "--storage", "...", "--name", "n"])
    with pytest.raises(AssertionError, match="does not exist"):
        check_ray_job_submit(["--working-dir", ".", "--", "python", "jobs/nope.py"], REPO)
    with pytest.raises(AssertionError, match="unrecognized arguments: --output-dir"):
        check_ray_job_submit(
            ["--working-dir", ".", "--", "python", "jobs/score.py", "--output-dir", "o"], REPO
        )


def test_commands_are_read_from_shell_blocks_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```\nbreakhis not-a-command\n```\n"
        "```bash\nX=1 breakhis train --data d \\\n    --storage s --name n  # a comment\n"
        "ray job list; ray job logs -f ID\n```\n"
        "```python\nbreakhis = 1\n```\n"
    )
    found = [c.words for c in simple_commands(page)]
    assert found == [
        ("breakhis", "train", "--data", "d", "--storage", "s", "--name", "n"),
        ("ray", "job", "list"),
        ("ray", "job", "logs", "-f", "ID"),
    ]
