"""Command-line options made from the config dataclasses.

Every job's options are the fields of its frozen config dataclass, with the
field's docstring as help, so ``--help``, the config and its validation never
drift apart. Nested config dataclasses (``SweepConfig.train``) are flattened:
their fields become options too; a name already taken by the outer config is
prefixed with the nested field's name (``--train-seed``), and one nested deeper
(``ProtocolConfig.evaluation.predict``) takes that outer prefix
(``--evaluation-batch-size``).

Types: str, int, float, bool (``--flag`` / ``--no-flag``), ``X | None``
(``none`` or ``all`` gives None), ``tuple[X, ...]`` (comma-separated; or, for a
field declared with ``metadata={"repeatable": True}``, one item per use of the
option, e.g. ``--split-file a=x.txt --split-file b=y.txt``).

A field's metadata may also say ``choices`` (the values accepted, shown in ``--help``, None
typed ``all``; the config's own validation refuses the others, in one line) and ``aliases``
(older option names that still work, with a deprecation warning). A command refuses the
options it cannot honour (``refuse``): such an option is hidden from ``--help`` and, when
given, build_config raises ValueError saying why.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

_NONE_WORDS = ("none", "all")


@dataclass(frozen=True)
class Binding:
    """Where one command-line option goes in a (nested) config."""

    dest: str  # argparse destination
    path: tuple[str, ...]  # field names from the outer config down
    refused: str | None = None
    """Why the command refuses this option (None: it takes it)."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (first paragraph, one line)."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = inspect.cleandoc(after.value.value).split("\n\n")[0]
            docs[node.target.id] = " ".join(text.split())
    return docs


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        # str | SomeObject | None: the command line can only give the str form.
        scalar = [a for a in args if a in (str, int, float, bool)]
        return (scalar[0] if scalar else args[0]), optional
    return hint, False


def _parser_for(kind: Any, optional: bool) -> Callable[[str], Any]:
    origin = typing.get_origin(kind)
    if origin is tuple:
        item, item_optional = _unwrap_optional(typing.get_args(kind)[0])
        parse_item = _parser_for(item, item_optional)

        def parse_tuple(text: str) -> tuple:
            return tuple(parse_item(part.strip()) for part in text.split(",") if part.strip())

        return parse_tuple

    def parse(text: str) -> Any:
        if optional and text.lower() in _NONE_WORDS:
            return None
        try:
            return kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from err

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _choice_names(choices: tuple) -> list[str]:
    """How each choice is typed: None (a field's "every one" or automatic) as ``all``."""
    return ["all" if c is None else str(c) for c in choices]


def _choice_metavar(choices: tuple, many: bool) -> str:
    """``{a,b,c}`` (``{a,b,c}[,...]`` for a comma-separated tuple)."""
    return "{" + ",".join(_choice_names(choices)) + "}" + (",..." if many else "")


class _Store(argparse.Action):
    """Store the value; warn when it came through a deprecated alias of the option."""

    def __init__(self, *args: Any, deprecated: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deprecated = deprecated

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string in self.deprecated:
            log.warning(
                "%s is deprecated and will be removed; use %s",
                option_string,
                self.option_strings[0],
            )
        setattr(namespace, self.dest, values)


class _Repeated(argparse.Action):
    """Each use of the option adds one item to the tuple (a repeatable option)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, (*(getattr(namespace, self.dest) or ()), values))


def _is_config(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
    refuse: Mapping[str, str] | None = None,
) -> list[Binding]:
    """Add one option per field of ``cls`` (nested configs flattened).

    ``skip`` names fields (at any depth) the caller sets itself; ``required``
    marks fields that must be given; ``positional`` fields (top level) are
    positional arguments, in the order of the fields, instead of options. ``refuse`` maps
    fields (at any depth) the command cannot honour to the reason: their options are
    hidden, and build_config raises ValueError with the reason when one is given. Returns
    the bindings for build_config.
    """
    refuse = refuse or {}
    bindings: list[Binding] = []
    taken: set[str] = {a.dest for a in parser._actions}

    def visit(klass: type, path: tuple[str, ...], prefix: str) -> None:
        hints = typing.get_type_hints(klass)
        docs = field_docs(klass)
        nested = []
        for item in dataclasses.fields(klass):
            if item.name in skip or not item.init:
                continue
            kind, optional = _unwrap_optional(hints[item.name])
            if _is_config(kind):
                nested.append((item, kind))
                continue
            dest = item.name if item.name not in taken else f"{prefix}{item.name}"
            taken.add(dest)
            flag = "--" + dest.replace("_", "-")
            default = item.default if item.default is not dataclasses.MISSING else None
            help_text = docs.get(item.name, "")
            is_required = item.name in required or (
                item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
            )
            if item.name in refuse:
                action = argparse.BooleanOptionalAction if kind is bool else "store"
                parser.add_argument(
                    flag, dest=dest, default=None, action=action, help=argparse.SUPPRESS
                )
                bindings.append(Binding(dest, (*path, item.name), refused=refuse[item.name]))
                continue
            if not path and item.name in positional:
                parser.add_argument(dest, type=_parser_for(kind, optional), help=help_text)
            else:
                _add_option(parser, item, kind, optional, dest, help_text, default, is_required)
            bindings.append(Binding(dest, (*path, item.name)))
        for item, kind in nested:
            # A config nested in a nested config groups options, it is no namespace of its
            # own: its fields take the outer nested config's prefix when their name is taken.
            visit(kind, (*path, item.name), prefix if path else f"{item.name}_")

    visit(cls, (), "")
    return bindings


def _add_option(
    parser: argparse.ArgumentParser,
    item: dataclasses.Field,
    kind: Any,
    optional: bool,
    dest: str,
    help_text: str,
    default: Any,
    is_required: bool,
) -> None:
    """Add the option of one config field: repeatable, a --flag/--no-flag pair for a bool,
    or a valued option with its choices, default and deprecated spellings in the help."""
    flag = "--" + dest.replace("_", "-")
    if item.metadata.get("repeatable"):
        item_kind, item_optional = _unwrap_optional(typing.get_args(kind)[0])
        parser.add_argument(
            flag,
            dest=dest,
            action=_Repeated,
            type=_parser_for(item_kind, item_optional),
            default=default,
            help=f"{help_text} (repeatable)",
            metavar=item.metadata.get("metavar", dest.upper()),
        )
        return
    if kind is bool:  # an optional one: None (neither flag) is the automatic choice
        if default is not None:
            help_text = f"{help_text} (default: {flag if default else '--no-' + flag[2:]})"
        parser.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
        return
    if default is not None and not is_required:
        help_text = f"{help_text} (default: {_show(default)})"
    aliases = tuple("--" + a.replace("_", "-") for a in item.metadata.get("aliases", ()))
    if aliases:
        help_text = f"{help_text} ({', '.join(aliases)}: deprecated spelling)"
    choices = item.metadata.get("choices")
    many = typing.get_origin(kind) is tuple
    parser.add_argument(
        flag,
        *aliases,
        dest=dest,
        action=_Store,
        deprecated=aliases,
        type=_parser_for(kind, optional),
        default=default,
        required=is_required,
        help=help_text,
        metavar=dest.upper() if choices is None else _choice_metavar(choices, many),
    )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join("all" if v is None else str(v) for v in value)
    return str(value)


def build_config(cls: type, args: argparse.Namespace, bindings: list[Binding], **fixed: Any):
    """Build ``cls`` from parsed options (nested configs included).

    ``fixed`` gives values for fields the caller set itself (top level, or
    ``nested__field`` for a nested one). Raises what the configs' validation
    raises (ValueError naming the option).
    """
    for binding in bindings:
        if binding.refused and getattr(args, binding.dest) is not None:
            flag = "--" + binding.dest.replace("_", "-")
            raise ValueError(f"{flag}: {binding.refused}")
    values = {b.path: getattr(args, b.dest) for b in bindings if not b.refused}
    for key, value in fixed.items():
        values[tuple(key.split("__"))] = value

    def make(klass: type, path: tuple[str, ...]) -> Any:
        hints = typing.get_type_hints(klass)
        kwargs = {}
        for item in dataclasses.fields(klass):
            kind, _ = _unwrap_optional(hints[item.name])
            here = (*path, item.name)
            if _is_config(kind) and here not in values:
                kwargs[item.name] = make(kind, here)
            elif here in values:
                kwargs[item.name] = values[here]
        return klass(**kwargs)

    return make(cls, ())
