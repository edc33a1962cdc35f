"""The model artifact: weights plus everything needed to use them, at one URI.

    save_artifact("s3://bucket/runs/rn50-fold0/model", model, card)
    model, card = load_artifact("s3://bucket/runs/rn50-fold0/model")

A directory (local or ``s3://``) holding

- ``model.pt``: the model's state dict (``torch.save``);
- ``model.json``: the ModelCard: architecture, classes, input size and
  normalisation (what a scorer must do to a tile), the training config, the
  manifest hash and split (which data the model saw), validation metrics,
  creation time and ``model_id``, a short hash of ``model.pt``'s bytes.

``model.json`` is written last, so a directory with it is complete; loading
checks the weights against ``model_id``.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import torch
from torch import nn

from breakhis import storage
from breakhis.model.card import (  # noqa: F401 - re-exported: the artifact's public names
    CARD_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ModelCard,
    _json_number,
    read_card,
    weights_id,
)
from breakhis.model.networks import build_model


def _state_bytes(model: nn.Module) -> bytes:
    # Unwrap DDP / torch.compile so the keys are those of build_model()'s module.
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_artifact(uri: str, model: nn.Module, card: ModelCard) -> ModelCard:
    """Write ``model.pt`` and then ``model.json`` under ``uri`` (local or s3://).

    Returns the card as written: ``model_id`` and ``created_at`` filled, NaN
    metrics as None.
    Raises ValueError when the model's output size differs from the card's
    classes; storage errors propagate from breakhis.storage.
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if head and head[-1].out_features != card.num_classes:
        raise ValueError(
            f"model has {head[-1].out_features} outputs, card says {card.num_classes} classes"
        )
    data = _state_bytes(model)
    card = replace(
        card,
        model_id=weights_id(data),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics={k: _json_number(v) for k, v in card.metrics.items()},
    )
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), data)
    storage.write_bytes(storage.join(uri, CARD_FILE), card.to_json().encode())
    return card


@dataclass(frozen=True)
class Artifact:
    """A model artifact read into memory: its card and its weights' bytes, checked against
    each other. What the scoring job ships to its model actors (through Ray's object store),
    so that every actor holds the weights the driver checked, whatever happens at the URI."""

    uri: str
    card: ModelCard
    weights: bytes

    @property
    def weights_id(self) -> str:
        """``model_id`` of these bytes: the first 12 hex digits of their SHA-256."""
        return weights_id(self.weights)

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model in eval mode on ``device``. Raises ValueError when the weights are not
        a state dict of the card's architecture."""
        weights_uri = storage.join(self.uri, WEIGHTS_FILE)
        try:
            state = torch.load(io.BytesIO(self.weights), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as err:
            raise ValueError(
                f"{weights_uri}: not a PyTorch state dict ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); the artifact is damaged"
            ) from err
        if not isinstance(state, dict):
            raise ValueError(f"{weights_uri}: not a PyTorch state dict ({type(state).__name__})")
        model = build_model(
            self.card.architecture,
            weights="none",
            dropout=self.card.dropout,
            num_classes=self.card.num_classes,
        )
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"{weights_uri}: weights do not fit {self.card.architecture}: {err}"
            ) from err
        return model.to(device).eval()


def read_artifact(uri: str) -> Artifact:
    """The card and weights of the artifact at ``uri``, read once.

    Raises FileNotFoundError when the artifact or its weights are missing, and ValueError
    when the card does not parse or the weights do not match the card's ``model_id`` (a
    partial copy or an edited file).
    """
    card = read_card(uri)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        data = storage.read_bytes(weights_uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{weights_uri}: the artifact's weights are missing") from err
    digest = weights_id(data)
    if digest != card.model_id:
        raise ValueError(
            f"{weights_uri}: weights hash {digest} does not match model_id {card.model_id} "
            f"in {CARD_FILE}; the artifact is incomplete or was modified"
        )
    return Artifact(uri, card, data)


def load_artifact(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load the artifact at ``uri``: the model in eval mode on ``device``, and its card.

    Raises FileNotFoundError when the artifact or its weights are missing, and
    ValueError when the card does not parse, the weights do not match the
    card's ``model_id`` (a partial copy or an edited file) or do not load.
    """
    artifact = read_artifact(uri)
    return artifact.load(device), artifact.card
