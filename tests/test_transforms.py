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

from breakhis.data.geometry import TileGeometry, canonical_width
from breakhis.data.imaging import decode_rgb, resize_rgb
from breakhis.data.ingest import IngestConfig, augment_tiles, class_weights, oversample_factor
from breakhis.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    EvalTransform,
    TrainTransform,
    apply_colour,
    apply_geometry,
    normalize,
    tile_rng,
    to_chw,
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


def test_square_geometry_is_the_whole_tile_squashed_as_uint8_chw() -> None:
    data = _png()
    square = TileGeometry(size=SIZE, geometry="square")
    out = EvalTransform(geometry=square)(data)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, decode_rgb(data, SIZE).transpose(2, 0, 1))
    np.testing.assert_array_equal(out, EvalTransform(geometry=square)(data))


def test_aspect_geometry_keeps_the_tissue_shape() -> None:
    """700x460 -> S x round(1.52 S) without stretching; the centre view is its middle square;
    a tile of another shape is resized to cover and centre-cropped, never squashed."""
    width = canonical_width(SIZE)
    assert (width, canonical_width(224), canonical_width(128)) == (49, 341, 195)
    pixels = decode_rgb(_png(700, 460))
    whole = TileGeometry(size=SIZE)
    assert whole.canonical_hw == whole.eval_hw == (SIZE, width)
    np.testing.assert_array_equal(whole.canonical(pixels), resize_rgb(pixels, (SIZE, width)))
    centre = TileGeometry(size=SIZE, view="centre")
    assert centre.eval_hw == (SIZE, SIZE)
    left = (width - SIZE) // 2
    np.testing.assert_array_equal(
        centre.eval_pixels(pixels), whole.canonical(pixels)[:, left : left + SIZE]
    )
    chw = to_chw(whole.canonical(pixels))
    np.testing.assert_array_equal(centre.view_of(chw), chw[:, :, left : left + SIZE])
    # The sample's 700x456 tiles: covered (scale 32/456) and cropped, same shape.
    narrow = decode_rgb(_png(700, 456))
    out = whole.canonical(narrow)
    assert out.shape == (SIZE, width, 3)
    cover = resize_rgb(narrow, (SIZE, round(700 * SIZE / 456)))
    crop = (cover.shape[1] - width) // 2
    np.testing.assert_array_equal(out, cover[:, crop : crop + width])
    aspect = EvalTransform(geometry=whole, canonical=True)
    assert aspect.shape == (3, SIZE, width) and aspect(_png(700, 460)).shape == (3, SIZE, width)


def test_training_crops_are_squares_of_the_canonical_tile_and_turns_are_symmetries() -> None:
    width = canonical_width(SIZE)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(6, 3, SIZE, width), dtype=np.uint8)
    ids = [f"SOB_M_DC-14-2523-400-{i:03d}" for i in range(6)]
    transform = TrainTransform(strength=1.0, seed=4, colour=False)
    out = transform(tiles, ids, epoch=2)
    assert out.shape == (6, 3, SIZE, SIZE)
    for tile, tile_id, got in zip(tiles, ids, out, strict=True):
        p = transform.params(tile_id, epoch=2, image_size=SIZE, width=width)
        assert 0 <= p.crop_x <= width - SIZE and (p.shift_x, p.shift_y) == (0, 0)
        crop = tile[:, :, p.crop_x : p.crop_x + SIZE]
        flipped = crop[:, :, ::-1] if p.hflip else crop
        flipped = flipped[:, ::-1, :] if p.vflip else flipped
        np.testing.assert_array_equal(got, np.rot90(flipped, p.rot90, axes=(1, 2)))
    # A quarter turn of a crop is a crop of the turned tile: no stretch to undo.
    crop = tiles[0][:, :, 5 : 5 + SIZE]
    turned = np.rot90(tiles[0], 1, axes=(1, 2))  # (3, W, S)
    np.testing.assert_array_equal(
        np.rot90(crop, 1, axes=(1, 2)), turned[:, width - 5 - SIZE : width - 5, :]
    )
    # Crops move across epochs; strength 0 is the centre crop.
    offsets = {
        transform.params(ids[0], epoch=e, image_size=SIZE, width=width).crop_x for e in range(8)
    }
    assert len(offsets) > 1
    still = TrainTransform(strength=0.0)(tiles, ids, epoch=0)
    left = (width - SIZE) // 2
    np.testing.assert_array_equal(still, tiles[:, :, :, left : left + SIZE])


def test_colour_off_draws_the_same_geometry_and_keeps_colours() -> None:
    width = canonical_width(SIZE)
    with_colour = TrainTransform(strength=1.0, seed=1).params(
        "t", epoch=0, image_size=SIZE, width=width
    )
    without = TrainTransform(strength=1.0, seed=1, colour=False).params(
        "t", epoch=0, image_size=SIZE, width=width
    )
    assert with_colour.changes_colour and not without.changes_colour
    assert (without.crop_x, without.hflip, without.vflip, without.rot90) == (
        with_colour.crop_x,
        with_colour.hflip,
        with_colour.vflip,
        with_colour.rot90,
    )


def test_eval_transform_rejects_bad_bytes_and_sizes() -> None:
    with pytest.raises(ValueError, match="not an image"):
        EvalTransform(geometry=TileGeometry(size=SIZE))(b"this is not a png")
    with pytest.raises(ValueError, match="image_size"):
        TileGeometry(size=2)
    with pytest.raises(ValueError, match="--geometry 'round' unknown; accepted: aspect, square"):
        TileGeometry(size=SIZE, geometry="round")
    with pytest.raises(ValueError, match="--eval-view 'left' unknown; accepted: whole, centre"):
        TileGeometry(size=SIZE, view="left")


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
    with pytest.raises(ValueError, match="N, 3, S, W >= S"):
        TrainTransform()(images[:, :, :-1, :-2], ids, epoch=0)


def test_tile_rng_does_not_depend_on_python_hash_seed() -> None:
    code = (
        "from breakhis.data.transforms import tile_rng;"
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
