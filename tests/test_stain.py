"""Stain normalisation (breakhis.data.stain): the fitted parameters travel in the model artifact,
and a tile is normalised alike by training's decode, scoring's decode, stored pixels and the
exported model; a bad reference is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from breakhis.data.geometry import TileGeometry
from breakhis.data.imaging import decode_rgb
from breakhis.data.stain import StainNormalizer, fit_stain
from breakhis.model.artifact import ModelCard, read_card, save_artifact
from breakhis.model.networks import build_model

SIZE = 48
METHODS = ("macenko", "reinhard")


@pytest.fixture(scope="module")
def pngs(realdata_dir: Path) -> list[Path]:
    found = sorted(realdata_dir.glob("SOB_*.png"))
    return [t for t in found if t.name.startswith("SOB_B")][:2] + [
        t for t in found if t.name.startswith("SOB_M")
    ][:2]


def _fitted(method: str, reference: Path) -> StainNormalizer:
    plain = TileGeometry(size=SIZE)
    return fit_stain(
        method, [plain.canonical(decode_rgb(reference.read_bytes()))], reference=str(reference)
    )


def _artifact(root: Path, stain: StainNormalizer) -> str:
    torch.manual_seed(0)
    net = build_model("smallcnn", weights="none", dropout=0.0).eval()
    card = ModelCard(
        architecture="smallcnn",
        image_size=SIZE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.0,
        config={"geometry": "aspect", "eval_view": "whole", "stain_norm": stain.method},
        temperature=0.8,
        stain=stain.to_dict(),
    )
    uri = str(root / "model")
    save_artifact(uri, net, card)
    return uri


@pytest.mark.parametrize("method", METHODS)
def test_fitted_parameters_round_trip_through_the_artifact(
    method: str, pngs: list[Path], tmp_path: Path
) -> None:
    stain = _fitted(method, pngs[0])
    card = read_card(_artifact(tmp_path, stain))
    assert card.stain_normalizer == stain
    assert card.tile_geometry.stain == stain
    # Parameters, not the image: the card stays small.
    assert len(json.dumps(card.stain)) < 600
    # A changed parameter is another normaliser; a damaged one is refused by name.
    assert card.stain["method"] == method
    broken = {**card.stain, "method": "vahadane"}
    with pytest.raises(ValueError, match="field 'stain'.*vahadane"):
        ModelCard(
            architecture="smallcnn", image_size=SIZE, mean=(0, 0, 0), std=(1, 1, 1), stain=broken
        )


def _training_pixels(pngs: list[Path], geometry: TileGeometry) -> np.ndarray:
    """Training's decode (breakhis.data.tiles.decode_tiles, what ingest caches): canonical CHW."""
    from breakhis.data.tiles import decode_tiles

    batch = pa.table(
        {
            "png": [p.read_bytes() for p in pngs],
            "uri": [str(p) for p in pngs],
            "label": [0] * len(pngs),
            "patient_id": ["p"] * len(pngs),
            "tile_id": [p.stem for p in pngs],
            "magnification": [40] * len(pngs),
        }
    )
    return decode_tiles(batch, geometry=geometry, canonical=True)["image"]


def _scoring_pixels(pngs: list[Path], geometry: TileGeometry) -> np.ndarray:
    """Scoring's and evaluation's decode (breakhis.data.tile_decode.decode_tiles): HWC -> CHW."""
    from breakhis.data.tile_decode import decode_tiles

    out = decode_tiles(
        {
            "uri": np.asarray([str(p) for p in pngs], dtype=object),
            "tile_id": np.asarray([p.stem for p in pngs], dtype=object),
            "unit": np.zeros(len(pngs), np.int32),
            "shard": np.asarray([None] * len(pngs), dtype=object),
        },
        geometry=geometry,
    )
    assert list(out["error"]) == [""] * len(pngs)
    return out["image"].transpose(0, 3, 1, 2)


@pytest.mark.parametrize("method", METHODS)
def test_a_tile_is_normalised_alike_in_training_scoring_and_the_exported_model(
    method: str, pngs: list[Path], tmp_path: Path
) -> None:
    from breakhis.data.transforms import normalize
    from breakhis.model.export import ExportConfig, export_model

    stain = _fitted(method, pngs[0])
    model_uri = _artifact(tmp_path, stain)
    geometry = read_card(model_uri).tile_geometry
    tiles = pngs[1:]
    trained = _training_pixels(tiles, geometry)
    scored = _scoring_pixels(tiles, geometry)
    np.testing.assert_array_equal(trained, scored)
    raw = np.stack(
        [TileGeometry(size=SIZE).canonical(decode_rgb(p.read_bytes())) for p in tiles]
    ).transpose(0, 3, 1, 2)
    # The normalisation does something, and stored (unnormalised) pixels get the same.
    assert np.abs(trained.astype(int) - raw).mean() > 2
    np.testing.assert_array_equal(geometry.normalise_stain(raw), trained)

    result = export_model(ExportConfig(model=model_uri, format="torchscript"))
    contract = json.loads(Path(result.contract_uri).read_text())
    assert contract["stain_normalization"]["method"] == method
    assert contract["stain_normalization"]["applied_in_graph"] is True
    exported = torch.jit.load(result.model_uri)
    net = build_model("smallcnn", weights="none", dropout=0.0).eval()
    net.load_state_dict(torch.jit.load(result.model_uri).net.state_dict())
    with torch.no_grad():
        probabilities, _ = exported(torch.from_numpy(np.ascontiguousarray(raw)))
        logits = net(normalize(torch.from_numpy(np.ascontiguousarray(scored)))).double()
    expected = torch.softmax(logits / 0.8, dim=1).numpy()
    # The graph normalised the raw tiles as scoring did (within a grey level: float order).
    np.testing.assert_allclose(probabilities.numpy(), expected, atol=2e-3)
    graph_pixels = exported.stain(torch.from_numpy(np.ascontiguousarray(raw))).numpy()
    assert np.abs(graph_pixels.astype(int) - scored).max() <= 1


def test_onnx_holds_reinhard_and_refuses_macenko_in_one_line(
    pngs: list[Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    from breakhis.model.export import ExportConfig, export_model

    macenko_uri = _artifact(tmp_path / "m", _fitted("macenko", pngs[0]))
    with pytest.raises(ValueError, match=r"--format onnx: .*Macenko.*--format torchscript") as err:
        export_model(ExportConfig(model=macenko_uri, format="onnx"))
    assert "\n" not in str(err.value)

    stain = _fitted("reinhard", pngs[0])
    model_uri = _artifact(tmp_path / "r", stain)
    geometry = read_card(model_uri).tile_geometry
    result = export_model(ExportConfig(model=model_uri, format="onnx"))
    raw = np.stack(
        [TileGeometry(size=SIZE).canonical(decode_rgb(p.read_bytes())) for p in pngs[1:]]
    ).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(result.model_uri, providers=["CPUExecutionProvider"])
    onnx_probabilities, _ = session.run(None, {"image": np.ascontiguousarray(raw)})
    scripted = export_model(ExportConfig(model=model_uri, format="torchscript"))
    with torch.no_grad():
        want, _ = torch.jit.load(scripted.model_uri)(torch.from_numpy(np.ascontiguousarray(raw)))
    np.testing.assert_allclose(onnx_probabilities, want.numpy(), atol=2e-3)
    assert np.abs(geometry.normalise_stain(raw).astype(int) - raw).mean() > 2


def _config(reference: str | None, method: str = "macenko"):
    from breakhis.train.config import TrainConfig

    return TrainConfig(
        data="unused",
        storage="unused",
        name="n",
        arch="smallcnn",
        weights="none",
        image_size=SIZE,
        stain_norm=method,
        stain_reference=reference,
    )


def test_a_bad_reference_is_a_one_line_error_naming_it(pngs: list[Path], tmp_path: Path) -> None:
    from PIL import Image

    from breakhis.data.stain_fit import fit_run_stain

    blank = tmp_path / "glass.png"
    Image.new("RGB", (70, 46), (250, 250, 250)).save(blank)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(tmp_path / "missing.png"): "no such file or folder",
        str(blank): "too little tissue",
        str(text): "not an image",
        str(empty): "no image file there",
    }
    for reference, reason in cases.items():
        with pytest.raises(ValueError) as err:
            fit_run_stain(_config(reference), dest=None, train_patients=frozenset())
        message = str(err.value)
        assert message.startswith(f"--stain-reference {reference}") and reason in message
        assert "\n" not in message
    # A folder of images is pooled: its first images by name.
    folder = tmp_path / "refs"
    folder.mkdir()
    for p in pngs[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    fitted = fit_run_stain(_config(str(folder)), dest=None, train_patients=frozenset())
    assert fitted is not None and fitted.method == "macenko"
    # Options that do not go together, in one line each.
    with pytest.raises(ValueError, match="give --stain-norm macenko or reinhard"):
        _config(str(pngs[0]), method="none")
    with pytest.raises(ValueError, match="needs --eval-view whole"):
        _config(None).__class__(
            data="d", storage="s", name="n", stain_norm="reinhard", eval_view="centre"
        )


def test_the_default_reference_is_the_first_training_tile_by_id() -> None:
    from breakhis.data.stain_fit import first_training_tile

    manifest = pa.table(
        {
            "tile_id": ["b-40-2", "a-100-1", "c-40-1", "a-40-9"],
            "patient_id": ["B", "A", "C", "A"],
            "magnification": pa.array([40, 100, 40, 40], pa.int16()),
        }
    )
    assert first_training_tile(manifest, frozenset({"A", "B"}), None) == "a-100-1"
    assert first_training_tile(manifest, frozenset({"A", "B"}), 40) == "a-40-9"
    with pytest.raises(ValueError, match="no tile"):
        first_training_tile(manifest, frozenset({"Z"}), None)


# --------------------------------------------------------------------------- a Ray run
#
# A run that fits its normaliser on the first training tile, and evaluation applying it:
# tests/test_timm.py::test_a_timm_linear_probe_with_stain_normalisation_trains_only_its_head_fits_its_normaliser_and_is_evaluated
# (one run checks both since 2026-12-07: a Ray training run and its evaluation cost half a
# minute or more each on 2 cores).
