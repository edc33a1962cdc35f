"""Exported models (TorchScript, ONNX under onnxruntime) give the scoring job's
probabilities on real BreakHis tiles, preprocessed by their contract alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from breakhis.model.artifact import ModelCard, save_artifact
from breakhis.model.export import ExportConfig, export_model
from breakhis.model.networks import build_model

SIZE = 64
TILES = 6


def _artifact(root: Path) -> str:
    """A randomly initialised smallcnn artifact with a temperature and threshold that are
    not the defaults (so a graph that forgot either would fail)."""
    torch.manual_seed(0)
    net = build_model("smallcnn", weights="none", dropout=0.1).eval()
    card = ModelCard(
        architecture="smallcnn",
        image_size=SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.1,
        temperature=0.37,
        threshold=0.42,
        threshold_rule="balanced_accuracy",
    )
    uri = str(root / "model")
    save_artifact(uri, net, card)
    return uri


def _job_probabilities(model_uri: str, tiles: list[Path]) -> np.ndarray:
    """What the jobs compute for these tiles, from the package's own pieces: the decode
    (breakhis.data.imaging), the normalisation (breakhis.data.transforms) and the calibrated
    probability of the margin (breakhis.stats.calibration, shared by training, scoring and
    evaluation)."""
    from breakhis.data.imaging import decode_rgb
    from breakhis.data.transforms import normalize, to_chw
    from breakhis.model.artifact import load_artifact
    from breakhis.stats.calibration import probabilities

    net, card = load_artifact(model_uri)
    images = np.stack([to_chw(decode_rgb(t.read_bytes(), card.image_size)) for t in tiles])
    with torch.no_grad():
        logits = net(normalize(torch.from_numpy(images), card.mean, card.std)).double().numpy()
    malignant = card.class_names.index("malignant")
    return probabilities(logits[:, malignant] - logits[:, 1 - malignant], card.temperature)


def _inputs(contract: dict, tiles: list[Path]) -> np.ndarray:
    """The tiles as the contract asks: RGB, resized to its size, uint8 NCHW."""
    from PIL import Image

    spec = contract["input"]
    assert (spec["dtype"], spec["layout"], spec["channels"]) == ("uint8", "NCHW", "RGB")
    size = spec["image_size"]
    images = []
    for tile in tiles:
        with Image.open(tile) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=2.0)
        images.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(images))


def _malignant(contract: dict, probabilities: np.ndarray) -> np.ndarray:
    return probabilities[:, contract["class_names"].index("malignant")].astype(np.float64)


@pytest.fixture(scope="module")
def tiles(realdata_dir: Path) -> list[Path]:
    found = sorted(realdata_dir.glob("SOB_*.png"))
    benign = [t for t in found if t.name.startswith("SOB_B")][: TILES // 2]
    malignant = [t for t in found if t.name.startswith("SOB_M")][: TILES // 2]
    assert len(benign) + len(malignant) == TILES
    return benign + malignant


def test_torchscript_gives_the_jobs_probabilities(tiles: list[Path], tmp_path: Path) -> None:
    model_uri = _artifact(tmp_path)
    result = export_model(ExportConfig(model=model_uri, format="torchscript"))
    assert result.model_uri == f"{model_uri}/model.torchscript.pt"
    contract = json.loads(Path(result.contract_uri).read_text())
    assert result.contract_uri == f"{model_uri}/model.torchscript.json"
    assert (contract["temperature"], contract["threshold"]) == (0.37, 0.42)
    assert contract["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert (
        contract["class_names"] == ["benign", "malignant"]
        and contract["input"]["image_size"] == SIZE
    )

    scripted = torch.jit.load(result.model_uri)
    with torch.no_grad():
        probabilities, logits = scripted(torch.from_numpy(_inputs(contract, tiles)))
    expected = _job_probabilities(model_uri, tiles)
    np.testing.assert_allclose(_malignant(contract, probabilities.numpy()), expected, atol=1e-4)
    # Not the uncalibrated softmax: the temperature is applied in the graph.
    raw = torch.softmax(logits, dim=1)[:, 1].numpy()
    assert np.abs(raw - expected).max() > 1e-3
    # Batch size is free.
    with torch.no_grad():
        one, _ = scripted(torch.from_numpy(_inputs(contract, tiles[:1])))
    np.testing.assert_allclose(_malignant(contract, one.numpy()), expected[:1], atol=1e-4)


def test_onnx_under_onnxruntime_gives_the_jobs_probabilities(
    tiles: list[Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    model_uri = _artifact(tmp_path)
    out = tmp_path / "exported"
    result = export_model(ExportConfig(model=model_uri, format="onnx", out=str(out)))
    assert result.model_uri == str(out / "model.onnx")
    contract = json.loads((out / "model.onnx.json").read_text())
    assert contract["file"] == "model.onnx" and contract["model"]["source"] == model_uri

    session = ort.InferenceSession(result.model_uri, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [contract["input"]["name"]]
    expected = _job_probabilities(model_uri, tiles)
    for chosen, want in ((tiles, expected), (tiles[:1], expected[:1])):
        probabilities, _ = session.run(None, {"image": _inputs(contract, chosen)})
        np.testing.assert_allclose(_malignant(contract, probabilities), want, atol=1e-4)


def test_the_command_exports_and_bad_options_name_what_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from breakhis import cli

    model_uri = _artifact(tmp_path)
    out = tmp_path / "out"
    assert (
        cli.main(["export", "--model", model_uri, "--format", "torchscript", "--out", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "model.torchscript.json",
        "model.torchscript.pt",
    ]
    assert "exported as torchscript" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--format 'tflite' unknown; accepted: torchscript, onnx"):
        ExportConfig(model=model_uri, format="tflite")
    assert cli.main(["export", "--model", str(tmp_path / "missing")]) == 2
    assert "no model artifact here" in capsys.readouterr().err


def test_an_aspect_kept_model_exports_with_its_whole_tile_input(
    tiles: list[Path], tmp_path: Path
) -> None:
    """A model trained with --geometry aspect (the default) takes the whole S x W tile; its
    contract says so, and tiles resized as the contract says give the jobs' probabilities."""
    import onnxruntime as ort
    from PIL import Image

    from breakhis.data.imaging import decode_rgb
    from breakhis.data.transforms import normalize, to_chw
    from breakhis.model.artifact import load_artifact

    torch.manual_seed(0)
    net = build_model("smallcnn", weights="none", dropout=0.0).eval()
    card = ModelCard(
        architecture="smallcnn",
        image_size=SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.0,
        config={"geometry": "aspect", "eval_view": "whole"},
    )
    uri = str(tmp_path / "model")
    save_artifact(uri, net, card)
    result = export_model(ExportConfig(model=uri, format="onnx"))
    contract = json.loads(Path(result.contract_uri).read_text())
    width = round(SIZE * 700 / 460)
    assert contract["input"]["shape"] == ["N", 3, SIZE, width]
    assert (
        contract["input"]["geometry"] == "aspect" and "aspect ratio" in contract["input"]["resize"]
    )

    loaded, card = load_artifact(uri)
    job = np.stack(
        [to_chw(card.tile_geometry.eval_pixels(decode_rgb(t.read_bytes()))) for t in tiles]
    )
    with torch.no_grad():
        expected = torch.softmax(loaded(normalize(torch.from_numpy(job))), dim=1)[:, 1].numpy()
    by_contract = []
    for tile in tiles:  # the contract's words: cover SIZE x width keeping the aspect, centre crop
        with Image.open(tile) as image:
            w, h = image.size
            scale = max(SIZE / h, width / w)
            cw, ch = max(width, round(w * scale)), max(SIZE, round(h * scale))
            rgb = np.asarray(
                image.convert("RGB").resize((cw, ch), Image.BILINEAR, reducing_gap=2.0)
            )
        top, left = (ch - SIZE) // 2, (cw - width) // 2
        by_contract.append(rgb[top : top + SIZE, left : left + width].transpose(2, 0, 1))
    session = ort.InferenceSession(result.model_uri, providers=["CPUExecutionProvider"])
    probabilities, _ = session.run(None, {"image": np.ascontiguousarray(np.stack(by_contract))})
    np.testing.assert_allclose(_malignant(contract, probabilities), expected, atol=1e-4)
