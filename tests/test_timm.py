"""``--arch timm:NAME`` (breakhis.model.timm_backbones): timm models with random weights train
(fine-tuned or linear-probed), go through a sweep's config, are evaluated by the scoring
engine and exported; a state dict saved by timm loads from a path and from S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_train_config

from breakhis.model.artifact import ModelCard, load_artifact, save_artifact
from breakhis.model.networks import WeightsError, build_model, split_parameters
from breakhis.train.config import TrainConfig

CNN = "timm:resnet10t"
VIT = "timm:vit_tiny_patch16_224"
SIDE = 32


def _timm_state(arch: str) -> dict[str, torch.Tensor]:
    """A state dict as timm saves it: its own keys, its 1000-class head."""
    import timm

    torch.manual_seed(1)
    return timm.create_model(arch.removeprefix("timm:"), pretrained=False).state_dict()


# --------------------------------------------------------------------------- without Ray


def test_the_config_takes_timm_names_and_checks_them_when_the_model_is_built() -> None:
    config = TrainConfig(data="d", storage="s", name="n", arch=VIT, weights="none")
    assert config.arch == VIT and TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="--weights imagenet is torchvision's download"):
        TrainConfig(data="d", storage="s", name="n", arch=VIT)
    with pytest.raises(ValueError, match=r"unknown model 'timm:'.*timm:NAME"):
        TrainConfig(data="d", storage="s", name="n", arch="timm:", weights="none")
    with pytest.raises(
        ValueError, match=r"timm \S+ has no such model; close: vit_tiny_patch16_224"
    ):
        build_model("timm:vit_tiny_patch16_2244")


def test_freeze_backbone_freezes_every_epoch_and_refuses_freeze_epochs() -> None:
    probe = TrainConfig(
        data="d", storage="s", name="n", arch=CNN, weights="none", epochs=7, freeze_backbone=True
    )
    assert probe.epochs_frozen == 7
    with pytest.raises(ValueError, match="leave --freeze-epochs unset"):
        TrainConfig(
            data="d",
            storage="s",
            name="n",
            arch=CNN,
            weights="none",
            freeze_backbone=True,
            freeze_epochs=1,
        )


@pytest.mark.parametrize("arch", [CNN, VIT])
def test_a_state_dict_saved_by_timm_loads_from_a_path(arch: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _timm_state(arch)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    safetensors = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors))
    for source in (path, safetensors):
        model = build_model(arch, weights=str(source), dropout=0.0)
        own = model.state_dict()
        backbone, head = split_parameters(model, arch)
        assert len(head) == 2 and backbone
        # Every backbone tensor is timm's; the new two-class head is not its 1000-class one.
        loaded = {
            k: v
            for k, v in state.items()
            if f"model.{k}" in own and own[f"model.{k}"].shape == v.shape
        }
        assert all(torch.equal(own[f"model.{k}"], v) for k, v in loaded.items())
        assert len(loaded) == len(own) - 2
    # Another architecture's state dict is refused in one line naming the keys.
    with pytest.raises(WeightsError) as err:
        build_model(CNN if arch == VIT else VIT, weights=str(path))
    message = str(err.value)
    assert "missing (" in message and "unexpected (" in message and "\n" not in message


def test_a_state_dict_saved_by_timm_loads_from_s3(s3_prefix: str) -> None:
    import io

    from breakhis import storage

    state = _timm_state(CNN)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    uri = f"{s3_prefix}/weights/resnet10t.pt"
    storage.write_bytes(uri, buffer.getvalue())
    model = build_model(CNN, weights=uri)
    assert torch.equal(model.state_dict()["model.conv1.0.weight"], state["conv1.0.weight"])


def test_a_vit_sees_its_own_normalisation_and_any_tile_size() -> None:
    model = build_model(VIT, weights="none").eval()
    seen = {}
    model.model.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    pixels = torch.randint(0, 256, (2, 3, SIDE, 49), dtype=torch.uint8)
    from breakhis.data.transforms import normalize

    with torch.no_grad():
        assert model(normalize(pixels)).shape == (2, 2)
    # vit_tiny's pretrained config normalises with mean 0.5 and std 0.5.
    np.testing.assert_allclose(
        seen["x"].numpy(), (pixels.float() / 255 - 0.5).numpy() / 0.5, atol=1e-5
    )


def _artifact(root: Path, arch: str) -> str:
    torch.manual_seed(0)
    net = build_model(arch, weights="none", dropout=0.0).eval()
    card = ModelCard(
        architecture=arch,
        image_size=SIDE,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.0,
        config={"geometry": "aspect", "eval_view": "whole"},
        temperature=0.7,
    )
    uri = str(root / "model")
    save_artifact(uri, net, card)
    return uri


@pytest.mark.parametrize("arch", [CNN, VIT])
def test_a_timm_model_exports_to_torchscript_and_onnx(arch: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from breakhis.data.transforms import normalize
    from breakhis.model.export import ExportConfig, export_model

    model_uri = _artifact(tmp_path, arch)
    net, card = load_artifact(model_uri)
    pixels = torch.randint(0, 256, (3, 3, *card.tile_geometry.eval_hw), dtype=torch.uint8)
    with torch.no_grad():
        want = torch.softmax(net(normalize(pixels)) / 0.7, dim=1).numpy()
    scripted = export_model(ExportConfig(model=model_uri, format="torchscript"))
    contract = json.loads(Path(scripted.contract_uri).read_text())
    assert contract["model"]["architecture"] == arch
    with torch.no_grad():
        got, _ = torch.jit.load(scripted.model_uri)(pixels)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    onnx = export_model(ExportConfig(model=model_uri, format="onnx"))
    session = ort.InferenceSession(onnx.model_uri, providers=["CPUExecutionProvider"])
    got, _ = session.run(None, {"image": pixels.numpy()})
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("arch", [CNN, VIT])
def test_score_features_of_a_timm_model_are_its_pre_logits(arch: str, tmp_path: Path) -> None:
    """``score --features`` writes what timm's own ``forward_head(pre_logits=True)`` gives:
    the features a foundation model is used for."""
    from test_score import _predictor

    from breakhis.data.transforms import normalize

    model_uri = _artifact(tmp_path, arch)
    net, card = load_artifact(model_uri)
    images = np.random.default_rng(0).integers(0, 256, (3, SIDE, SIDE, 3), dtype=np.uint8)
    predictor = _predictor(model_uri, method=None, features=True)
    out = predictor(
        {
            "uri": np.array(list("abc"), dtype=object),
            "tile_id": np.array(list("abc"), dtype=object),
            "unit": np.zeros(3, np.int32),
            "image": images,
            "error": np.array([""] * 3, dtype=object),
        }
    )
    timm_model = net.model  # timm's module behind the input affine
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), card.mean, card.std)
    with torch.no_grad():
        x = x * net.scale + net.shift if not net.identity else x
        want = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    assert out["embedding"].shape == (3, timm_model.num_features)
    np.testing.assert_allclose(out["embedding"], want.numpy(), atol=1e-4)


def test_a_timm_run_goes_through_a_sweep_config(tmp_path: Path) -> None:
    from breakhis.tune.config import SweepConfig, trial_base
    from breakhis.tune.job import resolve_space

    base = small_train_config(
        str(tmp_path / "d"),
        str(tmp_path / "s"),
        arch=VIT,
        weights=str(tmp_path / "uni.pt"),
        freeze_epochs=None,
        freeze_backbone=True,
        epochs=3,
    )
    config = SweepConfig(train=base)
    space = resolve_space(config)  # a linear probe sweeps no freezing
    assert "freeze_epochs" not in space.keys and "lr" in space.keys
    trial = TrainConfig.from_dict({**trial_base(config).to_dict(), "lr": 3e-3, "name": "t1"})
    assert (trial.arch, trial.freeze_backbone, trial.weights) == (VIT, True, base.weights)


# --------------------------------------------------------------------------- Ray runs


@pytest.fixture(scope="module")
def prepared(make_prepared) -> str:
    return make_prepared(scale=0.02, width=SIDE, height=SIDE)


@pytest.mark.ray
@pytest.mark.slow
def test_a_timm_linear_probe_with_stain_normalisation_trains_only_its_head_fits_its_normaliser_and_is_evaluated(
    prepared: str, tmp_path: Path
) -> None:
    """One run and its evaluation, two behaviours (each costs half a minute or more here): a
    timm linear probe trains only its head, and a run with --stain-norm fits its normaliser
    on the first training tile, which evaluation applies (test_stain's own run until
    2026-12-07)."""
    from breakhis.data.dest import PreparedDest
    from breakhis.data.splits import SplitSpec
    from breakhis.data.stain_fit import first_training_tile, fit_run_stain
    from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
    from breakhis.evaluate.job import run_evaluation
    from breakhis.score.predict import PredictOptions
    from breakhis.train.job import run_training

    weights = tmp_path / "resnet10t.pt"
    torch.save(_timm_state(CNN), weights)
    config = small_train_config(
        prepared,
        str(tmp_path / "runs"),
        arch=CNN,
        weights=str(weights),
        freeze_epochs=None,
        freeze_backbone=True,
        image_size=SIDE,
        epochs=2,
        lr=1e-2,
        stain_norm="macenko",
    )
    result = run_training(config)
    assert result.last_epoch == 2 and all(r["backbone_frozen"] for r in result.history)
    model, card = load_artifact(result.artifact_uri)
    assert card.architecture == CNN
    # The normaliser is fitted on the run's first training tile (by tile id), and kept.
    dest = PreparedDest.open(prepared)
    patients = dest.split(SplitSpec.parse("fold:0", val_fraction=0.2, seed=0))
    first = first_training_tile(dest.manifest, patients.train, None)
    assert first in card.stain["reference"]
    assert card.stain_normalizer == fit_run_stain(config, dest, patients.train)
    trained = model.state_dict()
    timm_state = _timm_state(CNN)
    # The backbone is timm's, untouched (BatchNorm statistics too); only the head learned.
    for key, value in timm_state.items():
        if not key.startswith("fc."):
            assert torch.equal(trained[f"model.{key}"], value), key
    start = build_model(CNN, weights=str(weights))
    assert not torch.equal(trained["model.fc.weight"], start.state_dict()["model.fc.weight"])

    evaluated = run_evaluation(
        EvaluateConfig(
            model=result.artifact_uri,
            data=prepared,
            out=None,
            options=EvaluateOptions(
                predict=PredictOptions(attribution="gradcam"),
                bootstrap=1,
                cross_magnification=False,
            ),
        )
    )
    predictions = evaluated.predictions
    assert len(predictions) > 0 and predictions["prob_malignant"].between(0, 1).all()
    assert 0.0 <= evaluated.metrics["image_recognition_rate"] <= 1.0
