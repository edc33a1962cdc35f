"""The model card (``model.json``) of a model artifact (breakhis.model.artifact): what the
model is, what it saw and how to feed it, read and checked without torch, so a command can
refuse a missing or damaged model before it imports torch."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from breakhis import storage
from breakhis.data.geometry import TileGeometry
from breakhis.data.stain import StainNormalizer
from breakhis.model.architectures import check_arch
from breakhis.names import CLASS_NAMES, MAGNIFICATIONS

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"


@dataclass(frozen=True)
class ModelCard:
    """What a model is and how to feed it; stored as ``model.json``."""

    architecture: str
    """One of breakhis.model.networks.ARCHITECTURES."""
    image_size: int
    """Side S of the input in pixels (its height; see ``tile_geometry``)."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted from RGB values scaled to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided out after the mean."""
    dropout: float = 0.2
    """Dropout of the head (needed to rebuild the same module)."""
    class_names: tuple[str, ...] = CLASS_NAMES
    """Name of each output index: 0 benign, 1 malignant; for a subtype model
    (``--task subtype``) the eight subtypes, benign four then malignant four
    (breakhis.subtypes.SUBTYPE_CLASS_NAMES). A card without it is a binary model's."""
    num_classes: int = 2
    """Number of logits."""
    magnification: int | None = None
    """The magnification the model was trained on, or None for all."""
    config: dict[str, Any] = field(default_factory=dict)
    """The training config (TrainConfig as a dict)."""
    manifest_hash: str = ""
    """breakhis.data.prepare.manifest_hash of the data the model was trained on."""
    split: str = ""
    """The split used, e.g. ``fold:0``."""
    epoch: int = 0
    """The epoch whose weights these are."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    """Validation metrics of that epoch (NaN stored as null)."""
    temperature: float = 1.0
    """Temperature dividing the logits before the softmax, fitted on the validation
    patients (breakhis.stats.calibration); 1.0 is the raw softmax."""
    threshold: float = 0.5
    """Calibrated malignancy probability at or above which a tile is called malignant,
    chosen on the validation patients; the default of scoring and evaluation."""
    threshold_rule: str = ""
    """How ``threshold`` was chosen (breakhis.stats.calibration.THRESHOLD_RULES), "" for fixed."""
    stain: dict[str, Any] = field(default_factory=dict)
    """The fitted stain normaliser's parameters (breakhis.data.stain.StainNormalizer.to_dict:
    method, reference and its parameters), applied to every tile before the model; {} for
    none."""

    @property
    def task(self) -> str:
        """``binary`` or ``subtype``, from ``class_names`` (breakhis.subtypes.task_of)."""
        from breakhis.subtypes import task_of

        return task_of(self.class_names)

    @property
    def malignant_indices(self) -> list[int]:
        """Output indices whose probabilities sum to P(malignant)."""
        from breakhis.subtypes import malignant_indices

        return malignant_indices(self.class_names)

    @property
    def tile_geometry(self) -> TileGeometry:
        """How tiles become this model's input (breakhis.data.geometry), from the training
        config; a model trained before 2026-12-07 (no ``geometry``) squashed its tiles."""
        return TileGeometry(
            size=self.image_size,
            geometry=str(self.config.get("geometry", "square")),
            view=str(self.config.get("eval_view", "whole")),
            stain=self.stain_normalizer,
        )

    @property
    def stain_normalizer(self) -> StainNormalizer | None:
        """The stain normaliser of ``stain``, or None."""
        return StainNormalizer.from_dict(self.stain) if self.stain else None

    created_at: str = ""
    """UTC time of saving, ISO 8601; filled by save_artifact()."""
    model_id: str = ""
    """First 12 hex digits of the SHA-256 of ``model.pt``; filled by save_artifact()."""
    version: int = FORMAT_VERSION
    """Format version of the artifact."""

    def __post_init__(self) -> None:
        # Every field, since a card comes from a file anyone may edit: its values reach
        # model building, scoring and the HTML report.
        _check_card(self)

    def to_json(self) -> str:
        """The card as JSON text (NaN metrics become null)."""
        data = asdict(self)
        data["metrics"] = {k: _json_number(v) for k, v in self.metrics.items()}
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=str)

    @classmethod
    def from_json(cls, text: str, *, source: str = "model.json") -> ModelCard:
        """Parse a card. Raises ValueError naming ``source`` for bad JSON, a newer
        format version, unknown fields, or a field of the wrong type or range (naming the
        field and what it accepts)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source}: artifact format version {version!r}; this code reads {FORMAT_VERSION}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}")
        for key in ("mean", "std", "class_names"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _check_card(card: ModelCard) -> None:
    """Raise ValueError naming the first field of ``card`` whose type or range is wrong."""

    def bad(name: str, accepted: str) -> ValueError:
        return ValueError(f"field {name!r}: expected {accepted}, got {getattr(card, name)!r}")

    if not isinstance(card.architecture, str):
        raise bad("architecture", "a string")
    check_arch(card.architecture)
    if not (_is_int(card.image_size) and 8 <= card.image_size <= 4096):
        raise bad("image_size", "an integer in 8..4096")
    for name in ("mean", "std"):
        values = getattr(card, name)
        if not (
            isinstance(values, tuple | list)
            and len(values) == 3
            and all(_is_number(v) for v in values)
        ):
            raise bad(name, "a list of 3 finite numbers, one per RGB channel")
    if not all(v > 0 for v in card.std):
        raise bad("std", "3 positive numbers")
    if not (_is_number(card.dropout) and 0.0 <= card.dropout < 1.0):
        raise bad("dropout", "a number in [0, 1)")
    if not (_is_int(card.num_classes) and card.num_classes >= 2):
        raise bad("num_classes", "an integer >= 2")
    if not (
        isinstance(card.class_names, tuple | list)
        and len(card.class_names) == card.num_classes
        and all(isinstance(n, str) and n for n in card.class_names)
        and len(set(card.class_names)) == len(card.class_names)
    ):
        raise bad("class_names", f"{card.num_classes} distinct non-empty strings (num_classes)")
    from breakhis.subtypes import task_of

    try:
        task_of(card.class_names)
    except ValueError as err:
        raise ValueError(f"field 'class_names': {err}") from err
    if card.magnification is not None and card.magnification not in MAGNIFICATIONS:
        raise bad("magnification", f"null or one of {', '.join(map(str, MAGNIFICATIONS))}")
    if not isinstance(card.config, dict):
        raise bad("config", "a JSON object")
    for name in ("manifest_hash", "split", "threshold_rule", "created_at"):
        if not isinstance(getattr(card, name), str):
            raise bad(name, "a string")
    if not (_is_int(card.epoch) and card.epoch >= 0):
        raise bad("epoch", "an integer >= 0")
    if not (
        isinstance(card.metrics, dict)
        and all(
            isinstance(k, str)
            and (v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)))
            for k, v in card.metrics.items()
        )
    ):
        raise bad("metrics", "a JSON object of metric name -> number or null")
    if not (_is_number(card.temperature) and card.temperature > 0):
        raise bad("temperature", "a positive number")
    if not (_is_number(card.threshold) and 0.0 < card.threshold < 1.0):
        raise bad("threshold", "a number in (0, 1)")
    if not (isinstance(card.model_id, str) and re.fullmatch(r"([0-9a-f]{12})?", card.model_id)):
        raise bad("model_id", '12 lower-case hex digits (or "" before saving)')
    if not isinstance(card.stain, dict):
        raise bad("stain", "a JSON object ({} for none)")
    if card.stain:
        try:
            StainNormalizer.from_dict(card.stain)
        except ValueError as err:
            raise ValueError(f"field 'stain': {err}") from err
    if not _is_int(card.version):
        raise bad("version", "an integer")


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_card(uri: str) -> ModelCard:
    """The ModelCard of the artifact at ``uri``, without loading weights.

    Raises FileNotFoundError naming the URI when there is no artifact there (or
    ``uri`` is a file), ValueError for a card that does not parse or has no ``model_id``.
    """
    card_uri = storage.join(uri, CARD_FILE)
    try:
        text = storage.read_bytes(card_uri).decode()
    except NotADirectoryError as err:
        raise FileNotFoundError(
            f"{uri}: a file, not a model artifact folder (give the folder holding "
            f"{CARD_FILE} and {WEIGHTS_FILE})"
        ) from err
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{card_uri}: no model artifact here (expected {CARD_FILE} and {WEIGHTS_FILE})"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{card_uri}: not UTF-8 text ({err})") from err
    card = ModelCard.from_json(text, source=card_uri)
    if not card.model_id:
        # "" is a card not yet saved; on storage it would let any weights pass load_artifact.
        raise ValueError(
            f"{card_uri}: field 'model_id': empty; a saved card holds the first 12 hex digits "
            f"of the SHA-256 of {WEIGHTS_FILE} (the card was written or edited by hand)"
        )
    return card


def weights_id(data: bytes) -> str:
    """The ``model_id`` of weights ``data``: the first 12 hex digits of their SHA-256."""
    return hashlib.sha256(data).hexdigest()[:12]
