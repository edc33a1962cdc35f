"""The accuracy benchmark's reference: a plain PyTorch training loop in this process, no Ray,
that imports nothing of the job's training code (torchvision builds the model; only the
architectures torchvision lacks, such as ``smallcnn``, come from ``breakhis.model.networks``).

Two recipes (breakhis.benchmarks.reference_recipes.RECIPES), selected by
``breakhis benchmark accuracy --reference NAME``:

- ``strong`` (the default): each PNG decoded once (Pillow) and resized keeping its aspect
  ratio to height S (a 700x460 tile becomes round(S * 700 / 460) x S; a portrait tile gets
  width S); training takes a random S x S window of it, flips it at random horizontally and
  vertically and turns it by a random quarter turn (``torch.rot90``); the test takes the
  centre S x S window; ImageNet mean/std; cross-entropy weighted by inverse class frequency
  (n / (2 n_c)); AdamW (lr, weight decay 1e-4) with OneCycleLR over all steps;
- ``notebook``: what a 40-line notebook does: the tile squashed to S x S, random flips, no
  quarter turns, plain cross-entropy, AdamW at torch's defaults and a constant lr.

Both train on every training patient (no validation) in shuffled batches (a last batch of
one image is dropped: BatchNorm cannot train on it), keep the last epoch, and call a tile
malignant when its softmax probability is >= 0.5 (the argmax). A run is deterministic for
its seed: ``torch.manual_seed`` before the model is built, one seeded generator for the
shuffle and every augmentation draw, and ``torch.use_deterministic_algorithms`` (warning
only where an op has no deterministic implementation) while it trains and predicts.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from breakhis.benchmarks.accuracy_result import SideResult
from breakhis.benchmarks.reference_recipes import Recipe, ReferenceOptions, check_recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
THRESHOLD = 0.5
"""Softmax probability of malignancy at which the reference calls a tile malignant."""


# --- geometry ------------------------------------------------------------------------------


def decode_tile(png: bytes, side: int, *, keep_aspect: bool) -> torch.Tensor:
    """A PNG decoded with Pillow and resized (bilinear) as uint8 (3, H, W): with
    ``keep_aspect`` its shorter side is ``side`` and the other keeps the ratio (a 700x460
    tile: H = side, W = round(side * 700 / 460)); otherwise H = W = ``side``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    if keep_aspect:
        scale = side / min(width, height)
        size = (max(side, round(width * scale)), max(side, round(height * scale)))
    else:
        size = (side, side)
    resized = np.asarray(rgb.resize(size, Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous()


def train_crop(
    tile: torch.Tensor, side: int, generator: torch.Generator, *, quarter_turns: bool = True
) -> torch.Tensor:
    """A random ``side`` x ``side`` window of ``tile`` (C, H, W), flipped horizontally and
    vertically each with probability 1/2 and, with ``quarter_turns``, turned by k * 90
    degrees, k uniform in 0..3; every draw from ``generator``."""
    _, height, width = tile.shape
    y = int(torch.randint(height - side + 1, (1,), generator=generator))
    x = int(torch.randint(width - side + 1, (1,), generator=generator))
    hflip, vflip = torch.randint(2, (2,), generator=generator).tolist()
    crop = tile[:, y : y + side, x : x + side]
    if hflip:
        crop = crop.flip(2)
    if vflip:
        crop = crop.flip(1)
    if quarter_turns:
        crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=generator)), dims=(1, 2))
    return crop


def centre_crop(tile: torch.Tensor, side: int) -> torch.Tensor:
    """The centre ``side`` x ``side`` window of ``tile`` (C, H, W)."""
    _, height, width = tile.shape
    y, x = (height - side) // 2, (width - side) // 2
    return tile[:, y : y + side, x : x + side]


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 scaled to [0, 1] and standardised by ImageNet's mean
    and std (what ``ToTensor`` + ``Normalize`` do)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


# --- training ------------------------------------------------------------------------------


def reference_model(arch: str) -> nn.Module:
    """``arch`` from random weights with a two-class last layer: torchvision's model where
    torchvision has it, ``breakhis.model.networks.build_model`` otherwise (``smallcnn``)."""
    import torchvision

    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Linear(net.fc.in_features, 2)
        return net
    if arch == "vgg16":
        net = torchvision.models.vgg16(weights=None)
        net.classifier[6] = nn.Linear(net.classifier[6].in_features, 2)
        return net
    if arch == "efficientnet_b0":
        net = torchvision.models.efficientnet_b0(weights=None)
        net.classifier[1] = nn.Linear(net.classifier[1].in_features, 2)
        return net
    from breakhis.model.networks import build_model

    return build_model(arch, weights="none")


def class_weights(labels: Sequence[int]) -> torch.Tensor:
    """n / (2 n_c) for classes 0 and 1 (float32). Raises ValueError when a class is absent."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if len(counts) != 2 or (counts == 0).any():
        raise ValueError(
            f"class weights n / (2 n_c) need training images of both classes, got "
            f"{counts.tolist()} (benign, malignant)"
        )
    return torch.tensor(len(labels) / (2.0 * counts), dtype=torch.float32)


def images_per_epoch(images: int, batch_size: int) -> int:
    """Training images stepped through per epoch by _batches: all but a last batch of one."""
    return images - (1 if images % batch_size == 1 else 0)


def _batches(order: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``order``; a last batch of one image is dropped."""
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if len(batch) > 1:
            yield batch


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and ask for deterministic algorithms (warning where an op has none) while
    the block runs; the previous setting comes back after it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def train_reference(
    recipe: Recipe, tiles: Sequence[torch.Tensor], labels: Sequence[int], options: ReferenceOptions
) -> tuple[nn.Module, int]:
    """Train ``recipe`` on ``tiles`` (decode_tile's output) and their labels (0 benign, 1
    malignant); call inside ``deterministic(options.seed)``. Returns (the model of the last
    epoch, images stepped through per epoch). Raises ValueError for fewer than two images."""
    from tqdm import tqdm

    side, batch_size = options.image_size, options.batch_size
    if len(tiles) < 2 or batch_size < 2:
        raise ValueError(
            f"the reference needs at least 2 training images and batches of at least 2 "
            f"(BatchNorm), got {len(tiles)} images and --batch-size {batch_size}"
        )
    generator = torch.Generator().manual_seed(options.seed)
    model = reference_model(options.arch)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.lr, weight_decay=recipe.weight_decay
    )
    steps = len(list(_batches(torch.arange(len(tiles)), batch_size)))
    scheduler = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=options.lr, total_steps=options.epochs * steps
        )
        if recipe.one_cycle
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels) if recipe.class_weighted else None)
    targets = torch.tensor(list(labels), dtype=torch.int64)
    for _ in tqdm(range(options.epochs), desc="reference", unit="epoch", leave=False):
        model.train()
        for batch in _batches(torch.randperm(len(tiles), generator=generator), batch_size):
            crops = [
                train_crop(tiles[i], side, generator, quarter_turns=recipe.quarter_turns)
                for i in batch.tolist()
            ]
            optimizer.zero_grad()
            loss_fn(model(normalize(torch.stack(crops))), targets[batch]).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model, images_per_epoch(len(tiles), batch_size)


def predict_probs(
    model: nn.Module, tiles: Sequence[torch.Tensor], side: int, batch_size: int
) -> np.ndarray:
    """The model's softmax probability of malignancy for the centre crop of each tile, in
    eval mode (float64, one per tile)."""
    model.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(tiles), batch_size):
            crops = [centre_crop(t, side) for t in tiles[start : start + batch_size]]
            logits = model(normalize(torch.stack(crops)))
            probs.append(torch.softmax(logits, dim=1)[:, 1].double().numpy())
    return np.concatenate(probs) if probs else np.zeros(0)


def reference_probs(
    name: str,
    train_png: Sequence[bytes],
    train_labels: Sequence[int],
    test_png: Sequence[bytes],
    options: ReferenceOptions,
) -> tuple[np.ndarray, int]:
    """Train reference ``name`` on ``train_png`` and score ``test_png``. Returns (probability
    of malignancy per test tile, images per epoch); the same for the same options and seed.
    Raises ValueError for an unknown name or what train_reference raises."""
    recipe = check_recipe(name)
    side = options.image_size
    with deterministic(options.seed):
        train = [decode_tile(p, side, keep_aspect=recipe.keep_aspect) for p in train_png]
        model, per_epoch = train_reference(recipe, train, train_labels, options)
        test = [decode_tile(p, side, keep_aspect=recipe.keep_aspect) for p in test_png]
        return predict_probs(model, test, side, options.batch_size), per_epoch


def run_reference(
    name: str,
    tiles: pa.Table,
    train_patients: frozenset[str],
    test_patients: frozenset[str],
    options: ReferenceOptions,
) -> SideResult:
    """Train reference ``name`` on the tiles (tile_id, patient_id, label, png) of
    ``train_patients`` and score it on those of ``test_patients``. Returns its SideResult;
    raises what reference_probs raises."""
    from breakhis.stats.metrics import classification_metrics

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)

    def rows(patients: frozenset[str]) -> pa.Table:
        return tiles.filter(
            pc.is_in(tiles.column("patient_id"), pa.array(sorted(patients), pa.string()))
        )

    train, test = rows(train_patients), rows(test_patients)
    probs, per_epoch = reference_probs(
        name,
        train.column("png").to_pylist(),
        train.column("label").to_pylist(),
        test.column("png").to_pylist(),
        options,
    )
    labels, patients = test.column("label").to_pylist(), test.column("patient_id").to_pylist()
    m = classification_metrics(labels, probs, patients, threshold=THRESHOLD)
    return SideResult.from_metrics(
        m,
        seconds=time.perf_counter() - started,
        train_patients=len(train_patients),
        val_patients=0,
        images_per_epoch=per_epoch,
        kept_epoch=options.epochs,
        threshold=THRESHOLD,
    )
