"""Transforms and the pure parts of ingest: no Ray, no S3, tiny images."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from breakhis.imaging import decode_rgb
from breakhis.ingest import IngestConfig, augment_tiles, class_weights, oversample_factor
from breakhis.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    EvalTransform,
    TrainTransform,
    apply_colour,
    apply_geometry,
    normalize,
    tile_rng,
)

SIZE = 32


def _png(width: int = 70, height: int = 46, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiles(n: int = 4, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    # Smooth-ish stained-looking tiles: stain jitter acts on optical density, so
    # pure white would hardly change.
    images = rng.integers(60, 220, size=(n, 3, SIZE, SIZE), dtype=np.uint8)
    return images, [f"SOB_B_A-14-22549AB-40-{i:03d}" for i in range(n)]


# ------------------------------------------------------------------------- eval transform


def test_eval_transform_is_the_whole_tile_resized_as_uint8_chw() -> None:
    data = _png()
    out = EvalTransform(image_size=SIZE)(data)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, decode_rgb(data, SIZE).transpose(2, 0, 1))
    np.testing.assert_array_equal(out, EvalTransform(image_size=SIZE)(data))


def test_eval_transform_rejects_bad_bytes_and_sizes() -> None:
    with pytest.raises(ValueError, match="not an image"):
        EvalTransform(image_size=SIZE)(b"this is not a png")
    with pytest.raises(ValueError, match="image_size"):
        EvalTransform(image_size=2)


# ------------------------------------------------------------------------ train transform


def test_strength_zero_is_the_identity() -> None:
    images, ids = _tiles()
    out = TrainTransform(strength=0.0, seed=1)(images, ids, epoch=3)
    np.testing.assert_array_equal(out, images)
    assert out is not images


def test_augmentation_changes_pixels_keeps_shape_and_is_reproducible() -> None:
    images, ids = _tiles()
    transform = TrainTransform(strength=0.5, seed=7)
    first = transform(images, ids, epoch=0)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert not np.array_equal(first, images)
    np.testing.assert_array_equal(first, TrainTransform(strength=0.5, seed=7)(images, ids, epoch=0))
    # Each tile's draws depend on the tile only, not on its batch or position.
    alone = transform(images[2:3], ids[2:3], epoch=0)
    np.testing.assert_array_equal(alone[0], first[2])
    assert not np.array_equal(transform(images, ids, epoch=1), first)
    assert not np.array_equal(TrainTransform(strength=0.5, seed=8)(images, ids, epoch=0), first)
    copies = transform(images[:1].repeat(2, axis=0), [ids[0]] * 2, epoch=0, copies=[0, 1])
    assert not np.array_equal(copies[0], copies[1])


def test_train_transform_validates() -> None:
    images, ids = _tiles()
    with pytest.raises(ValueError, match="strength"):
        TrainTransform(strength=1.5)
    with pytest.raises(ValueError, match="seed"):
        TrainTransform(seed=-1)
    with pytest.raises(ValueError, match="tile ids"):
        TrainTransform()(images, ids[:2], epoch=0)
    with pytest.raises(ValueError, match="N, 3, S, S"):
        TrainTransform()(images[:, :, :, :-1], ids, epoch=0)


def test_tile_rng_does_not_depend_on_python_hash_seed() -> None:
    code = (
        "from breakhis.transforms import tile_rng;"
        "print(tile_rng(3, 2, 'SOB_M_DC-14-2523-400-010', 1).integers(0, 2**31, 4).tolist())"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout.strip())
    here = str(tile_rng(3, 2, "SOB_M_DC-14-2523-400-010", 1).integers(0, 2**31, 4).tolist())
    assert outputs == {here}
    with pytest.raises(ValueError, match=">= 0"):
        tile_rng(0, -1, "x")


def test_geometry_is_exact_flips_rotations_and_reflected_shifts() -> None:
    images, _ = _tiles(1)
    image = images[0]
    np.testing.assert_array_equal(
        apply_geometry(image, AugmentParams(hflip=True)), image[:, :, ::-1]
    )
    np.testing.assert_array_equal(
        apply_geometry(image, AugmentParams(vflip=True, rot90=1)),
        np.rot90(image[:, ::-1, :], 1, axes=(1, 2)),
    )
    shifted = apply_geometry(image, AugmentParams(shift_y=3, shift_x=-2))
    assert shifted.shape == image.shape
    # Content moves by the shift; the uncovered border comes from reflection, not zeros.
    np.testing.assert_array_equal(shifted[:, : SIZE - 3, 2:], image[:, 3:, : SIZE - 2])
    np.testing.assert_array_equal(shifted[:, : SIZE - 3, 0], image[:, 3:, 2])
    np.testing.assert_array_equal(shifted[:, : SIZE - 3, 1], image[:, 3:, 1])
    np.testing.assert_array_equal(shifted[:, SIZE - 3, 2:], image[:, SIZE - 2, : SIZE - 2])


def test_colour_identity_is_exact_and_brightness_brightens() -> None:
    images, _ = _tiles(2)
    same = apply_colour(images, [AugmentParams(), AugmentParams()])
    np.testing.assert_array_equal(same, images)
    brighter = apply_colour(images, [AugmentParams(brightness=1.1)] * 2)
    assert brighter.mean() > images.mean()
    more_stain = apply_colour(images, [AugmentParams(stain_scale=(1.3, 1.3, 1.0))] * 2)
    assert more_stain.mean() < images.mean()  # more stain absorbs more light


def test_normalize_uses_imagenet_statistics_on_the_tensor_device() -> None:
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).repeat(1, 3, 2, 2)
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.device == batch.device
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(out[1, :, 0, 0], (1 - mean) / std)
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.float())


# ---------------------------------------------------------------------- ingest, pure parts


def test_class_weights_and_oversampling_factor() -> None:
    assert oversample_factor((25, 54)) == (2, 1)
    assert oversample_factor((54, 25)) == (1, 2)
    assert oversample_factor((40, 41)) == (1, 1)
    assert oversample_factor((0, 9)) == (1, 1)
    weights = class_weights((50, 54))
    assert weights[0] * 50 == pytest.approx(weights[1] * 54) == pytest.approx(52)
    assert class_weights((0, 9)) == (1.0, 0.5)  # an absent class gets a neutral 1.0


def test_augment_tiles_oversamples_minority_with_distinct_copies() -> None:
    images, ids = _tiles(4)
    batch = {
        "image": images,
        "label": np.array([0, 1, 1, 1]),
        "tile_id": np.array(ids, dtype=object),
        "patient_id": np.array(["p0", "p1", "p1", "p2"], dtype=object),
        "magnification": np.array([40, 40, 100, 200]),
    }
    transform = TrainTransform(strength=0.5, seed=0)
    out = augment_tiles(
        batch, transform=transform, first_execution=0, copies_per_label=(3, 1), epoch=0
    )
    assert len(out["image"]) == 6 and out["image"].dtype == np.uint8
    assert sorted(out["tile_id"]).count(ids[0]) == 3
    for i, tile in enumerate(out["tile_id"]):
        source = ids.index(tile)
        assert out["label"][i] == batch["label"][source]
        assert out["patient_id"][i] == batch["patient_id"][source]
    copies = out["image"][out["tile_id"] == ids[0]]
    assert len({c.tobytes() for c in copies}) == 3
    again = augment_tiles(
        batch, transform=transform, first_execution=0, copies_per_label=(3, 1), epoch=0
    )
    np.testing.assert_array_equal(again["image"], out["image"])
    assert list(again["tile_id"]) == list(out["tile_id"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magnification": 50}, "40, 100, 200, 400"),
        ({"augment_strength": -0.1}, "augment_strength"),
        ({"image_size": 4}, "image_size"),
        ({"seed": -3}, "seed"),
    ],
)
def test_ingest_config_names_the_bad_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IngestConfig(**kwargs)
