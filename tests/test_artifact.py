"""Model artifact round trip (local and S3) and its integrity checks."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from breakhis import storage
from breakhis.model.artifact import ModelCard, load_artifact, read_card, save_artifact
from breakhis.model.networks import build_model
from breakhis.subtypes import SUBTYPE_CLASS_NAMES


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
    with pytest.raises(ValueError, match="8 classes"):
        save_artifact(
            str(tmp_path / "m"),
            build_model("smallcnn"),
            _card(num_classes=8, class_names=SUBTYPE_CLASS_NAMES),
        )
    with pytest.raises(ValueError, match="class_names"):
        _card(num_classes=3, class_names=("a", "b", "c"))  # neither task's classes


def test_a_subtype_card_round_trips_and_loads_an_eight_class_model(tmp_path: Path) -> None:
    uri = str(tmp_path / "m")
    card = _card(num_classes=8, class_names=SUBTYPE_CLASS_NAMES)
    save_artifact(uri, build_model("smallcnn", num_classes=8), card)
    model, loaded = load_artifact(uri)
    assert loaded.task == "subtype" and loaded.class_names == SUBTYPE_CLASS_NAMES
    assert loaded.malignant_indices == [4, 5, 6, 7]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    assert _card().task == "binary" and _card().malignant_indices == [1]


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("image_size", 32.5, "an integer in 8..4096"),
        ("image_size", True, "an integer"),
        ("epoch", "<script>alert(1)</script>", "an integer >= 0"),
        ("epoch", -1, "an integer >= 0"),
        ("mean", [0.5, 0.5], "3 finite numbers"),
        ("std", [0.2, 0.0, 0.2], "3 positive numbers"),
        ("dropout", "0.1", "a number in [0, 1)"),
        ("temperature", "1.0", "a positive number"),
        ("threshold", True, "a number in (0, 1)"),
        ("magnification", 50, "null or one of 40, 100, 200, 400"),
        ("class_names", ["benign", "benign"], "distinct"),
        ("split", 0, "a string"),
        ("config", [], "a JSON object"),
        ("metrics", {"val_loss": "low"}, "metric name -> number or null"),
        ("model_id", "../../etc", "12 lower-case hex digits"),
    ],
)
def test_every_card_field_is_checked_naming_the_file_and_field(
    tmp_path: Path, field: str, value, accepted: str
) -> None:
    uri = str(tmp_path / "model")
    save_artifact(uri, build_model("smallcnn"), _card())
    card_file = tmp_path / "model" / "model.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), field: value}))
    with pytest.raises(ValueError) as info:
        read_card(uri)
    message = str(info.value)
    assert message.startswith(f"{card_file}: field {field!r}: expected ")
    assert accepted in message and repr(value).strip("[]") in message


def test_an_artifact_path_that_is_a_file_is_named(tmp_path: Path) -> None:
    a_file = tmp_path / "model.pt"
    a_file.write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match=f"{a_file}: a file, not a model artifact folder"):
        read_card(str(a_file))


def test_unreadable_weights_are_a_clear_error(tmp_path: Path) -> None:
    # Garbage whose hash the card records: the load itself must fail with the file's name,
    # not a torch traceback.
    uri = str(tmp_path / "model")
    save_artifact(uri, build_model("smallcnn"), _card())
    garbage = b"\x80\x02garbage" * 100
    card_file = tmp_path / "model" / "model.json"
    digest = hashlib.sha256(garbage).hexdigest()[:12]
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), "model_id": digest}))
    (tmp_path / "model" / "model.pt").write_bytes(garbage)
    with pytest.raises(ValueError, match="model.pt: not a PyTorch state dict"):
        load_artifact(uri)


def test_an_empty_model_id_does_not_skip_the_weights_check(tmp_path: Path) -> None:
    """``model_id: ""`` in a saved card used to turn the hash check off, so other weights of
    the same architecture loaded under the card's name."""
    uri = str(tmp_path / "model")
    save_artifact(uri, build_model("smallcnn"), _card())
    torch.manual_seed(1)
    other = tmp_path / "other"
    save_artifact(str(other), build_model("smallcnn"), _card())
    (tmp_path / "model" / "model.pt").write_bytes((other / "model.pt").read_bytes())
    card_file = tmp_path / "model" / "model.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), "model_id": ""}))
    for read in (read_card, load_artifact):
        with pytest.raises(ValueError, match=f"{card_file}: field 'model_id': empty"):
            read(uri)
