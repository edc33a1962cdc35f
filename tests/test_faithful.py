"""The job trains what it says it trains: a hand-written PyTorch loop that imports nothing of
the job's training code (no breakhis.data.transforms, ingest, epoch, train_loop or model) replays
a one-worker job from the same initial weights, on the same tiles in the same order with the
same augmentation draws, and must agree with it step by step (issue 23). Any change to the
job's labels, order, geometry, augmentation, normalisation, class weights, optimizer or
schedule makes the two disagree. Then two runs of the same command with the same seed give
the same model, bit for bit, and evaluate's probabilities are a plain softmax over the same
decoded tiles."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

SIZE = 16  # the model's S: tiles of 70x46 px become 16 x 24 canonical tiles
WIDTH = round(SIZE * 700 / 460)
SEED = 3
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- the hand loop


def hand_decode(data: bytes) -> np.ndarray:
    """A tile as (3, S, W) uint8: resized keeping its aspect ratio to cover S x W (Pillow,
    bilinear), centre-cropped."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = max(SIZE / h, WIDTH / w)
    cw, ch = max(WIDTH, round(w * scale)), max(SIZE, round(h * scale))
    pixels = np.asarray(image.resize((cw, ch), Image.BILINEAR, reducing_gap=2.0))
    top, left = (ch - SIZE) // 2, (cw - WIDTH) // 2
    return pixels[top : top + SIZE, left : left + WIDTH].transpose(2, 0, 1)


def hand_params(epoch: int, tile_id: str, copy: int) -> tuple[int, bool, bool, int]:
    """The documented draw of one tile's crop, flips and quarter turn in a 0-based epoch."""
    key = int.from_bytes(hashlib.blake2b(tile_id.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng([SEED, epoch, copy, key])
    crop_x = int(rng.integers(0, WIDTH - SIZE + 1))
    hflip, vflip = (bool(v) for v in rng.integers(0, 2, size=2))
    return crop_x, hflip, vflip, int(rng.integers(0, 4))


def hand_augment(tile: np.ndarray, params: tuple[int, bool, bool, int]) -> np.ndarray:
    crop_x, hflip, vflip, turns = params
    out = tile[:, :, crop_x : crop_x + SIZE]
    if hflip:
        out = out[:, :, ::-1]
    if vflip:
        out = out[:, ::-1, :]
    return np.ascontiguousarray(np.rot90(out, turns, axes=(1, 2)))


def hand_model(state: dict[str, torch.Tensor]) -> nn.Module:
    net = torchvision.models.resnet18()
    net.fc = nn.Sequential(nn.Dropout(0.0), nn.Linear(512, 2))
    net.load_state_dict(state)
    return net


def hand_logits(net: nn.Module, images: np.ndarray) -> torch.Tensor:
    """The network on ImageNet-normalised pixels, (x / 255 - mean) / std written as one
    multiply and one subtract, the job's float operations: Adam turns any rounding
    difference in a gradient near zero into a whole step of the learning rate, so
    "the same within float tolerance" needs the same floats."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    return net(x.mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD))


def lr_at(step: int, *, lr: float, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def row_key(tile_id: str, copy: int) -> int:
    digest = hashlib.blake2b(f"{tile_id}\0{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# --------------------------------------------------------------------------- the job


def _job(dest: str, storage: str, name: str, trace: Path):
    from conftest import small_train_config

    from breakhis.train.job import run_training

    config = small_train_config(
        dest,
        storage,
        name=name,
        arch="resnet18",
        image_size=SIZE,
        epochs=2,
        batch_size=16,
        lr=2e-3,
        warmup_epochs=0.5,
        augment_strength=1.0,
        colour_augment=False,
        dropout=0.0,
        bn_recalibration_batches=0,
        cache=True,
        val_fraction=0.0,
        seed=SEED,
        keep_checkpoints=2,
        trace_dir=str(trace),
    )
    return config, run_training(config)


def _checkpoint(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    state = torch.load(run / f"epoch_{epoch:04d}" / "checkpoint.pt", weights_only=True)
    return state["model"]


@pytest.fixture(scope="module")
def faithful_data(make_prepared) -> str:
    return make_prepared(scale=0.02, width=70, height=46)


@pytest.fixture(scope="module")
def first_run(faithful_data: str, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The job run both tests read: (config, TrainResult, its folder)."""
    root = tmp_path_factory.mktemp("faithful")
    config, result = _job(faithful_data, str(root / "runs"), "faithful", root / "trace")
    return config, result, root


@pytest.fixture
def one_thread():
    """The hand loop on one torch thread, as the job's worker (--cpus-per-worker 1): the
    same floats, summed in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.ray
def test_the_job_is_faithful_to_a_hand_written_loop(
    faithful_data: str, first_run: tuple, one_thread: None
) -> None:
    config, result, tmp_path = first_run
    assert result.history[0]["torch_threads"] == 1
    manifest = pq.read_table(f"{faithful_data}/manifest.parquet")
    train = manifest.filter(pc.not_equal(manifest.column("fold"), 0))
    tiles = {
        t: (u, int(y))
        for t, u, y in zip(
            *(train[c].to_pylist() for c in ("tile_id", "uri", "label")), strict=True
        )
    }
    by_key = {row_key(t, 0): t for t in tiles}
    decoded = {t: hand_decode(Path(u).read_bytes()) for t, (u, _) in tiles.items()}

    counts = np.bincount([y for _, y in tiles.values()], minlength=2)
    weights = torch.tensor(len(tiles) / (2 * counts), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    net = hand_model(torch.load(tmp_path / "trace" / "initial_state.pt", weights_only=True))
    head = list(net.fc.parameters())
    backbone = [p for p in net.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW(
        [{"params": backbone}, {"params": head}], lr=config.lr, weight_decay=1e-4
    )
    steps_per_epoch = len(tiles) // config.batch_size
    schedule = dict(
        lr=config.lr,
        total=2 * steps_per_epoch,
        warmup=round(0.5 * steps_per_epoch),
        floor=config.min_lr_scale,
    )
    step = 0
    seen_params: dict[int, dict[str, tuple]] = {}
    for epoch in (1, 2):
        trace = json.loads((tmp_path / "trace" / f"epoch_{epoch:04d}_rank_0.json").read_text())
        assert len(trace) == steps_per_epoch
        keys = [k for s in trace for k in s["keys"]]
        assert len(set(keys)) == len(keys) == steps_per_epoch * config.batch_size
        assert set(keys) <= set(by_key), "a step trained on a row that is no training tile"
        seen_params[epoch] = {}
        net.train()
        for record in trace:
            ids = [by_key[k] for k in record["keys"]]
            assert record["labels"] == [tiles[t][1] for t in ids]
            params = [hand_params(epoch - 1, t, 0) for t in ids]
            seen_params[epoch].update(zip(ids, params, strict=True))
            images = np.stack(
                [hand_augment(decoded[t], p) for t, p in zip(ids, params, strict=True)]
            )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, **schedule)
            assert record["lr"] == pytest.approx([lr_at(step, **schedule)] * 2, rel=1e-9)
            loss = loss_fn(hand_logits(net, images), torch.tensor(record["labels"]))
            assert float(loss.detach()) == pytest.approx(record["loss"], rel=1e-4, abs=1e-5), step
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        job_state = _checkpoint(tmp_path / "runs" / "faithful", epoch)
        for name, value in net.state_dict().items():
            torch.testing.assert_close(value, job_state[name], rtol=1e-3, atol=1e-4, msg=name)
    # Epoch 2's pixels differ from epoch 1's: new crops, flips and turns for the same tiles.
    both = set(seen_params[1]) & set(seen_params[2])
    assert sum(seen_params[1][t] != seen_params[2][t] for t in both) > len(both) // 2

    # Evaluate's probabilities: a plain softmax over the same decoded test tiles.
    from breakhis.evaluate.config import EvaluateConfig, EvaluateOptions
    from breakhis.evaluate.job import run_evaluation
    from breakhis.model.artifact import load_artifact
    from breakhis.score.predict import PredictOptions

    _, card = load_artifact(result.artifact_uri)
    assert (card.threshold, card.temperature, card.threshold_rule) == (0.5, 1.0, "")
    options = EvaluateOptions(
        predict=PredictOptions(attribution="none", num_actors=1),
        bootstrap=1,
        cross_magnification=False,
    )
    evaluated = run_evaluation(
        EvaluateConfig(model=result.artifact_uri, data=faithful_data, out=None, options=options)
    )
    frame = evaluated.predictions
    test = manifest.filter(pc.equal(manifest.column("fold"), 0))
    assert sorted(frame["tile_id"]) == sorted(test["tile_id"].to_pylist())
    final = hand_model(_checkpoint(tmp_path / "runs" / "faithful", 2)).eval()
    images = np.stack([hand_decode(Path(u).read_bytes()) for u in frame["uri"]])
    with torch.no_grad():
        plain = torch.softmax(hand_logits(final, images), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(frame["prob_malignant"].to_numpy(), plain, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(frame["predicted_label"], (plain >= 0.5).astype(np.int64))


@pytest.mark.ray
def test_the_same_seed_gives_the_same_model_bit_for_bit(
    faithful_data: str, first_run: tuple, tmp_path: Path
) -> None:
    _, _, first = first_run
    _job(faithful_data, str(tmp_path / "runs"), "again", tmp_path / "trace")
    for epoch in (1, 2):
        name = f"epoch_{epoch:04d}_rank_0.json"
        again = (tmp_path / "trace" / name).read_text()
        assert (first / "trace" / name).read_text() == again, f"epoch {epoch}: other steps"
    a = _checkpoint(first / "runs" / "faithful", 2)
    b = _checkpoint(tmp_path / "runs" / "again", 2)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
