"""Model artifact round trip (local and S3) and its integrity checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from breakhis import storage
from breakhis.artifact import ModelCard, load_artifact, read_card, save_artifact
from breakhis.model import build_model


def _card(**overrides) -> ModelCard:
    values = dict(
        architecture="smallcnn",
        image_size=32,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.1,
        magnification=200,
        config={"arch": "smallcnn", "lr": 0.001},
        manifest_hash="abc123",
        split="fold:0",
        epoch=3,
        metrics={"val_accuracy": 0.9, "val_roc_auc": float("nan")},
    )
    values.update(overrides)
    return ModelCard(**values)


def _round_trip(uri: str) -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn", dropout=0.1).eval()
    written = save_artifact(uri, model, _card())
    assert len(written.model_id) == 12 and written.created_at

    loaded, card = load_artifact(uri)
    assert card == written
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    assert card.class_names == ("benign", "malignant")
    assert card.metrics["val_accuracy"] == 0.9
    assert card.metrics["val_roc_auc"] is None  # NaN is not JSON; stored as null
    assert read_card(uri) == written


def test_round_trip_local(tmp_path: Path) -> None:
    _round_trip(str(tmp_path / "model"))
    text = (tmp_path / "model" / "model.json").read_text()
    assert json.loads(text)["architecture"] == "smallcnn"  # strict JSON, readable by anyone


def test_round_trip_s3(s3_prefix: str) -> None:
    _round_trip(f"{s3_prefix}/runs/x/model")


def test_modified_weights_are_detected(tmp_path: Path) -> None:
    uri = str(tmp_path / "model")
    save_artifact(uri, build_model("smallcnn"), _card())
    other = build_model("smallcnn")
    torch.save(other.state_dict(), tmp_path / "model" / "model.pt")
    with pytest.raises(ValueError, match="does not match model_id"):
        load_artifact(uri)


def test_missing_artifact_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model artifact"):
        load_artifact(str(tmp_path / "nothing"))
    uri = str(tmp_path / "model")
    save_artifact(uri, build_model("smallcnn"), _card())
    storage.delete(storage.join(uri, "model.pt"))
    with pytest.raises(FileNotFoundError, match="weights are missing"):
        load_artifact(uri)


def test_card_validation() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        _card(architecture="alexnet")
    with pytest.raises(ValueError, match="format version 99"):
        ModelCard.from_json(json.dumps({**json.loads(_card().to_json()), "version": 99}))
    with pytest.raises(ValueError, match="unknown field"):
        ModelCard.from_json(json.dumps({**json.loads(_card().to_json()), "colour": "red"}))
    assert math.isnan(_card().metrics["val_roc_auc"])


def test_card_must_match_the_model_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 classes"):
        save_artifact(
            str(tmp_path / "m"),
            build_model("smallcnn"),
            _card(num_classes=3, class_names=("a", "b", "c")),
        )
