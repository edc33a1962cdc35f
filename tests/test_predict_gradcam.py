"""The predictor's Grad-CAM from the forward pass of its predictions gives what captum's
LayerGradCam gives in a pass of its own, and the same probabilities; calls in parallel threads
on one predictor (``--calls-per-actor``) give what calls one at a time give. No Ray, a tiny
model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from breakhis.model.artifact import ModelCard, save_artifact
from breakhis.model.networks import build_model
from breakhis.score.attribution import attribute
from breakhis.score.predict import TilePredictor
from breakhis.score.predict_config import PredictOptions

SIZE, MAP = 32, 8


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_one_pass_gradcam_equals_captum_and_the_predictions_stay(tmp_path, arch: str) -> None:
    torch.manual_seed(0)
    uri = str(tmp_path / "model")
    save_artifact(
        uri,
        build_model(arch, weights="none").eval(),
        ModelCard(architecture=arch, image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3),
    )
    kwargs = dict(
        model_uri=uri, map_size=MAP, tta=False, threshold=0.5, device="cpu", torch_threads=1,
        overlay_root=None, ig_steps=4, occlusion_window=0, lime_samples=8, lime_grid=4,
    )  # fmt: skip
    n = 6
    batch = {
        "uri": np.array([f"u{i}" for i in range(n)], dtype=object),
        "tile_id": np.array([f"t{i}" for i in range(n)], dtype=object),
        "unit": np.zeros(n, np.int32),
        "image": np.random.default_rng(1).integers(0, 255, (n, SIZE, SIZE, 3), np.uint8),
        "error": np.array([""] * (n - 1) + ["decode: bad"], dtype=object),
    }
    one_pass = TilePredictor(method="gradcam", **kwargs)
    out = one_pass(batch)
    plain = TilePredictor(method=None, **kwargs)(batch)
    np.testing.assert_allclose(out["prob"], plain["prob"], rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(out["prob_uncalibrated"], plain["prob_uncalibrated"], rtol=1e-5,
                               equal_nan=True)  # fmt: skip
    # captum's own pass over the same inputs, explaining the same classes.
    x = one_pass._inputs(np.ascontiguousarray(batch["image"][: n - 1]))
    raw = attribute(
        one_pass.model, x, "gradcam", out["target"][: n - 1].tolist(), layer=one_pass.layer,
        map_size=MAP,
    ).numpy()  # fmt: skip
    peak = np.abs(raw).reshape(n - 1, -1).max(axis=1)
    np.testing.assert_allclose(out["scale"][: n - 1], peak, rtol=1e-4, atol=1e-7)
    want = raw / np.where(peak > 0, peak, 1.0)[:, None, None]
    np.testing.assert_allclose(out["map"][: n - 1], want, rtol=1e-4, atol=1e-5)
    assert out["target"][-1] == -1 and (out["map"][-1] == 0).all()
    assert set(out["target"][: n - 1]) <= {0, 1} and peak.max() > 0


@pytest.mark.parametrize("method", [None, "gradcam"])
def test_calls_in_parallel_threads_give_what_calls_one_at_a_time_give(tmp_path, method) -> None:
    torch.manual_seed(0)
    uri = str(tmp_path / "model")
    save_artifact(
        uri,
        build_model("smallcnn", weights="none").eval(),
        ModelCard(architecture="smallcnn", image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3),
    )
    predictor = TilePredictor(
        model_uri=uri, map_size=MAP, tta=False, threshold=0.5, device="cpu", torch_threads=1,
        overlay_root=None, ig_steps=4, occlusion_window=0, lime_samples=8, lime_grid=4,
        method=method,
    )  # fmt: skip
    rng = np.random.default_rng(2)
    batches = [
        {
            "uri": np.array([f"u{k}-{i}" for i in range(16)], dtype=object),
            "tile_id": np.array([f"t{k}-{i}" for i in range(16)], dtype=object),
            "unit": np.zeros(16, np.int32),
            "image": rng.integers(0, 255, (16, SIZE, SIZE, 3), np.uint8),
            "error": np.array([""] * 16, dtype=object),
        }
        for k in range(2)
    ]
    serial = [predictor(b) for b in batches]
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for _ in range(10):  # ten rounds of two passes overlapping on one model
                start.wait()
                got = predictor(batches[k])
                for key in ("prob", "map", "target"):
                    if key in serial[k]:
                        np.testing.assert_allclose(got[key], serial[k][key], rtol=1e-5, atol=1e-6)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)
            start.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]


def test_calls_per_actor_is_checked_against_the_attribution() -> None:
    assert PredictOptions(attribution="gradcam", calls_per_actor=2).calls_per_actor == 2
    assert PredictOptions(attribution="none", calls_per_actor=3).calls_per_actor == 3
    with pytest.raises(ValueError, match="--calls-per-actor 2 with --attribution lime"):
        PredictOptions(attribution="lime", calls_per_actor=2)
    with pytest.raises(ValueError, match="--calls-per-actor must be an integer >= 1"):
        PredictOptions(calls_per_actor=0)
