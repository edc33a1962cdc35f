"""The search-space language of ``breakhis tune``: YAML files that name TrainConfig
options and how to sample them, parsed and checked before any trial starts.

Search-space files are YAML, one key per TrainConfig option to tune::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    batch_size: {choice: [32, 64]}
    arch: {grid: [resnet50, resnet18]}   # every value, num_samples times each
    label_smoothing: 0.1                 # a fixed value

Distributions: ``uniform`` / ``loguniform`` [low, high], ``quniform`` [low,
high, q], ``randint`` [low, high) (integers), ``choice`` and ``grid`` [values].

Every key must be an option of TUNABLE; each value is checked against TrainConfig's own
validation (check_search_space), alone and in pairs, so a bad file fails with a message
naming the file, the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from breakhis import storage
from breakhis.train.config import TrainConfig

_COMBINATION_LIMIT = 100_000

DISTRIBUTIONS: tuple[str, ...] = (
    "uniform",
    "loguniform",
    "quniform",
    "randint",
    "choice",
    "grid",
)
"""Accepted distribution names in a search-space file."""

TUNABLE: tuple[str, ...] = (
    "lr",
    "weight_decay",
    "batch_size",
    "freeze_epochs",
    "augment_strength",
    "label_smoothing",
    "dropout",
    "arch",
    "weights",
    "image_size",
    "optimizer",
    "momentum",
    "backbone_lr_scale",
    "warmup_epochs",
    "min_lr_scale",
    "oversample",
    "class_weighted",
    "patience",
)
"""TrainConfig options a search space may vary. The others are fixed for the whole sweep:
data, split, validation patients and metric (trials are compared on the same patients),
epochs (ASHA's budget) and resources."""

DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "weight_decay": {"loguniform": [1.0e-6, 1.0e-3]},
    "batch_size": {"choice": [32, 64]},
    "freeze_epochs": {"choice": [0, 1, 2]},
    "augment_strength": {"uniform": [0.25, 1.0]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "dropout": {"uniform": [0.0, 0.5]},
    "arch": {"choice": ["resnet50", "resnet18", "efficientnet_b0"]},
}
"""The search space used without ``--search-space`` (also in cluster/search_space.yaml);
with ``--weights none`` the keys of PRETRAINED_ONLY are left out of it."""
PRETRAINED_ONLY: tuple[str, ...] = ("freeze_epochs", "backbone_lr_scale")
"""Options that only mean something for a pretrained backbone."""


class SearchSpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


def _tunable_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {key: hints[key] for key in TUNABLE}


@dataclass(frozen=True)
class Param:
    """One key of a search space: a TrainConfig option and how to sample it."""

    key: str
    kind: str
    """``constant`` or one of DISTRIBUTIONS."""
    args: tuple[Any, ...]
    """The value (constant), the values (choice, grid) or the bounds (and q)."""

    def domain(self) -> Any:
        """The Ray Tune search domain (or the constant) for this key."""
        from ray import tune

        if self.kind == "constant":
            return self.args[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def corners(self) -> tuple[Any, ...]:
        """The values that bound what this key can take: every choice, or both ends."""
        if self.kind in ("constant", "choice", "grid"):
            return self.args
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        return self.args[:2]

    def to_yaml_value(self) -> Any:
        """This key as it would be written in a search-space file."""
        return self.args[0] if self.kind == "constant" else {self.kind: list(self.args)}


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: which options vary, and how."""

    params: tuple[Param, ...]
    source: str = "<search space>"
    """The file it came from (for messages)."""

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    @property
    def grid_size(self) -> int:
        """Trials per sample: the product of the grid keys' sizes (1 without grids)."""
        return math.prod(len(p.args) for p in self.params if p.kind == "grid")

    def to_tune(self) -> dict[str, Any]:
        """The Ray Tune param space of the varied options."""
        return {p.key: p.domain() for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        """The space as a search-space file's mapping (YAML/JSON-ready)."""
        return {p.key: p.to_yaml_value() for p in self.params}


def _coerce(value: Any, kind: type, where: str) -> Any:
    """``value`` as the option's type, or SearchSpaceError saying what is accepted."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SearchSpaceError(f"{where}: expected true or false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise SearchSpaceError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, bool):
        raise SearchSpaceError(f"{where}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SearchSpaceError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-4 as a string: only 1.0e-4 is a float there.
        try:
            return float(value)
        except ValueError:
            pass
    raise SearchSpaceError(f"{where}: expected a number, got {value!r}")


def _parse_param(key: str, spec: Any, kind: type, source: str) -> Param:
    where = f"search space {source}: key {key!r}"
    if isinstance(spec, list):
        raise SearchSpaceError(
            f"{where}: a bare list is ambiguous; write {{choice: [...]}} (sample one) or "
            "{grid: [...]} (try every value)"
        )
    if not isinstance(spec, Mapping):
        return Param(key, "constant", (_coerce(spec, kind, where),))
    if len(spec) != 1:
        raise SearchSpaceError(
            f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; "
            f"got {dict(spec)!r}"
        )
    dist, args = next(iter(spec.items()))
    if dist not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"{where}: unknown distribution {dist!r}; accepted: {', '.join(DISTRIBUTIONS)}"
        )
    where = f"{where} ({dist})"
    if not isinstance(args, list) or not args:
        raise SearchSpaceError(f"{where}: expected a non-empty list, got {args!r}")
    if dist in ("choice", "grid"):
        values = tuple(_coerce(v, kind, where) for v in args)
        if len(set(values)) != len(values):
            raise SearchSpaceError(f"{where}: values repeat: {list(values)}")
        return Param(key, dist, values)
    if kind not in (int, float):
        raise SearchSpaceError(f"{where}: {key} is not numeric; use choice or grid")
    if dist == "randint":
        if kind is not int or len(args) != 2:
            raise SearchSpaceError(f"{where}: expected [low, high) integers for {key}")
        low, high = (_coerce(v, int, where) for v in args)
        if high <= low:
            raise SearchSpaceError(f"{where}: high must exceed low (high is excluded)")
        return Param(key, dist, (low, high))
    if kind is int:
        raise SearchSpaceError(f"{where}: {key} is an integer option; use choice, grid or randint")
    expected = 3 if dist == "quniform" else 2
    if len(args) != expected:
        shape = "[low, high, q]" if dist == "quniform" else "[low, high]"
        raise SearchSpaceError(f"{where}: expected {shape}, got {args!r}")
    bounds = tuple(_coerce(v, float, where) for v in args)
    low, high = bounds[:2]
    if not low < high:
        raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high})")
    if dist == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform needs low > 0, got {low}")
    if dist == "quniform" and bounds[2] <= 0:
        raise SearchSpaceError(f"{where}: q must be > 0, got {bounds[2]}")
    return Param(key, dist, bounds)


def parse_search_space(mapping: Any, source: str = "<search space>") -> SearchSpace:
    """Validate a search-space mapping (a parsed YAML file) key by key.

    Returns the SearchSpace. Raises SearchSpaceError naming ``source`` and the
    key: unknown or fixed option, unknown distribution, wrong value type, bad
    bounds. Values are checked against the sweep's options by
    check_search_space().
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise SearchSpaceError(
            f"search space {source}: expected a mapping of option -> distribution, e.g. "
            f"'lr: {{loguniform: [1.0e-4, 1.0e-2]}}'; got {type(mapping).__name__}"
        )
    types = _tunable_types()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    params = []
    for key, spec in mapping.items():
        if not isinstance(key, str) or key not in types:
            if key in known:
                reason = (
                    f"{key!r} is fixed for the whole sweep (set it with "
                    f"--{str(key).replace('_', '-')})"
                )
            else:
                close = difflib.get_close_matches(str(key), TUNABLE, n=1)
                reason = f"unknown key {key!r}" + (
                    f" (did you mean {close[0]!r}?)" if close else ""
                )
            raise SearchSpaceError(
                f"search space {source}: {reason}; tunable keys: {', '.join(TUNABLE)}"
            )
        param = _parse_param(key, spec, types[key], source)
        if key == "weights":  # trials run in their own working directories
            paths = (v if v in ("imagenet", "none") else storage.absolute(v) for v in param.args)
            param = dataclasses.replace(param, args=tuple(paths))
        params.append(param)
    return SearchSpace(params=tuple(params), source=source)


def load_search_space(path: str | None) -> SearchSpace:
    """Read and validate a YAML search-space file (local path or s3:// URI);
    ``None`` gives DEFAULT_SEARCH_SPACE.

    Returns the SearchSpace. Raises FileNotFoundError naming a missing file and
    SearchSpaceError (a ValueError) naming the file and the offending key.
    """
    import yaml

    if path is None:
        return parse_search_space(DEFAULT_SEARCH_SPACE, "<default search space>")
    text = storage.read_bytes(path).decode()
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"search space {path}: not valid YAML: {err}") from err
    return parse_search_space(mapping, path)


def check_search_space(space: SearchSpace, base: TrainConfig) -> None:
    """Check that every value the space can sample makes a valid TrainConfig with
    the sweep's fixed options: each key's values (both ends of a range) alone,
    then every pair of keys, since options constrain each other (e.g. ``arch``
    smallcnn with ``weights`` imagenet).

    Returns None. Raises SearchSpaceError naming the key(s), the value(s) and
    what TrainConfig accepts.
    """
    values = base.to_dict()

    def attempt(overrides: dict[str, Any]) -> str | None:
        try:
            TrainConfig.from_dict({**values, **overrides})
        except ValueError as err:
            return str(err)
        return None

    for param in space.params:
        for value in param.corners():
            error = attempt({param.key: value})
            if error:
                raise SearchSpaceError(
                    f"search space {space.source}: key {param.key!r}: {value!r} is not "
                    f"usable with this sweep's options: {error}"
                )
    for first, second in itertools.combinations(space.params, 2):
        for a, b in itertools.product(first.corners(), second.corners()):
            error = attempt({first.key: a, second.key: b})
            if error:
                raise SearchSpaceError(
                    f"search space {space.source}: keys {first.key!r} = {a!r} and "
                    f"{second.key!r} = {b!r} cannot go together: {error}"
                )
