"""The GPU paths, on a CUDA GPU (skipped without one): the predictor's bf16/channels_last
path against float32 on the CPU, a Ray Train run with ``use_gpu``, and a scoring job whose
model actors hold the GPU. Run them with ``pytest -m gpu`` (``make bench-gpu`` does).

Self-contained (no fixture of conftest.py), so that a GPU machine without the S3 server's
packages can run them with ``--noconftest``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def ray_with_gpu():
    import ray

    ray.init(address="local", num_cpus=min(8, os.cpu_count() or 1), include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> str:
    from breakhis.synth.dataset import synthesize

    root = str(tmp_path_factory.mktemp("gpu") / "tiles")
    synthesize(root, scale=0.02, seed=0, width=96, height=64)
    return root


def _artifact(path: str, arch: str = "resnet18") -> str:
    from breakhis.model.artifact import ModelCard, save_artifact
    from breakhis.model.networks import build_model

    torch.manual_seed(0)
    save_artifact(
        path,
        build_model(arch, weights="none").eval(),
        ModelCard(
            architecture=arch,
            image_size=64,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
    )
    return path


def _predictor(uri: str, device: str, amp: bool, method: str | None):
    from breakhis.score.predict import TilePredictor

    return TilePredictor(
        model_uri=uri,
        method=method,
        map_size=16,
        tta=False,
        threshold=0.5,
        device=device,
        torch_threads=1,
        overlay_root=None,
        amp=amp,
        ig_steps=8,
        occlusion_window=0,
        lime_samples=10,
        lime_grid=4,
    )


def test_bf16_channels_last_predictor_agrees_with_float32_on_the_cpu(tmp_path) -> None:
    uri = _artifact(str(tmp_path / "model"))
    rng = np.random.default_rng(0)
    n = 32
    batch = {
        "uri": np.asarray([f"t{i}" for i in range(n)], dtype=object),
        "tile_id": np.asarray([f"t{i}" for i in range(n)], dtype=object),
        "unit": np.zeros(n, dtype=np.int32),
        "image": rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
        "error": np.asarray([""] * n, dtype=object),
    }
    gpu = _predictor(uri, "cuda", True, "gradcam")
    assert gpu.amp and gpu.device.type == "cuda"
    assert gpu.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    fast = gpu(batch)
    exact = _predictor(uri, "cpu", True, "gradcam")(batch)  # amp has no effect on the CPU
    assert np.abs(fast["prob"] - exact["prob"]).max() < 0.02
    a = fast["map"].astype(np.float32).reshape(n, -1)
    b = exact["map"].astype(np.float32).reshape(n, -1)
    corr = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True) if x.std() and y.std()]
    assert corr and np.median(corr) > 0.9, corr


def test_training_run_on_a_gpu(ray_with_gpu, tiles, tmp_path) -> None:
    from breakhis.data.prepare import PrepareConfig, prepare
    from breakhis.model.artifact import load_artifact
    from breakhis.train.config import TrainConfig
    from breakhis.train.job import run_training

    dest = str(tmp_path / "prepared")
    prepare(PrepareConfig(src=tiles, dest=dest))
    result = run_training(
        TrainConfig(
            data=dest,
            storage=str(tmp_path / "runs"),
            name="gpu",
            arch="smallcnn",
            weights="none",
            freeze_epochs=0,
            image_size=32,
            epochs=2,
            batch_size=16,
            warmup_epochs=0.0,
            num_workers=1,
            use_gpu=True,
            max_failures=0,
        )
    )
    assert len(result.history) == 2
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    model, card = load_artifact(result.artifact_uri)
    assert card.architecture == "smallcnn"


def test_scoring_job_with_gpu_actors(ray_with_gpu, tiles, tmp_path) -> None:
    import pyarrow.parquet as pq

    from breakhis.score.job import ScoreConfig, run_scoring
    from breakhis.score.predict import PredictOptions

    uri = _artifact(str(tmp_path / "model"))
    summary = run_scoring(
        ScoreConfig(
            model=uri,
            input=tiles,
            out=str(tmp_path / "scores"),
            predict=PredictOptions(device="cuda", attribution="gradcam", batch_size=64),
        )
    )
    assert summary.scored == summary.tiles > 0
    table = pq.read_table(str(tmp_path / "scores" / "predictions"), columns=["prob_malignant"])
    probs = table.column("prob_malignant").to_numpy()
    assert table.num_rows == summary.tiles and np.all((probs >= 0) & (probs <= 1))


def test_batches_copied_on_the_prefetch_threads_stream_arrive_intact() -> None:
    """DeviceTransfer (breakhis.train.prefetch): batches copied to the GPU on the prefetch
    thread's stream while the caller's stream is busy are, once received, exactly the host
    batches (the caller's stream waits for each copy)."""
    from breakhis.train.prefetch import DeviceTransfer, EpochPrefetcher

    generator = torch.Generator().manual_seed(0)
    host = [
        {
            "image": torch.randint(
                0, 256, (64, 3, 128, 194), dtype=torch.uint8, generator=generator
            ),
            "label": torch.randint(0, 2, (64,), generator=generator),
        }
        for _ in range(12)
    ]
    device = torch.device("cuda", torch.cuda.current_device())
    prefetcher = EpochPrefetcher(
        lambda epoch: iter(host), first=1, last=1, depth=4, transfer=DeviceTransfer(device)
    )
    busy = torch.randn(4096, 4096, device=device)
    try:
        for i, batch in enumerate(prefetcher.batches(1)):
            for _ in range(4):  # keep the caller's stream busy while later copies are queued
                busy = (busy @ busy).tanh_()
            assert batch["image"].device == device
            assert torch.equal(batch["image"].cpu(), host[i]["image"]), i
            assert torch.equal(batch["label"].cpu(), host[i]["label"]), i
    finally:
        prefetcher.close()
