"""Augmentation on the training device gives the host's pixels: the same tiles with the same
draws (seed, epoch, tile id, copy) through breakhis.data.device_augment and through the host's
TrainTransform. No Ray, tiny tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from breakhis.data.device_augment import DeviceAugment, augment_geometry
from breakhis.data.geometry import canonical_width
from breakhis.data.ingest import augment_tiles
from breakhis.data.transforms import (
    AUG_COLOUR,
    AUG_GEOMETRY,
    AugmentParams,
    TrainTransform,
    max_shift,
    param_columns,
)

SIZE = 24


def _canonical(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    # Stained-looking values: stain jitter acts on optical density.
    tiles = rng.integers(40, 230, size=(n, 3, SIZE, width), dtype=np.uint8)
    return tiles, [f"SOB_M_DC-14-2523-400-{i:03d}" for i in range(n)]


def _on_device(tiles: np.ndarray, params: list[AugmentParams], augment: DeviceAugment):
    columns = param_columns(params, colour=any(p.changes_colour for p in params))
    batch = {"image": torch.from_numpy(tiles)} | {
        k: torch.from_numpy(v) for k, v in columns.items()
    }
    return augment(batch, torch.device("cpu")).numpy()


@pytest.mark.parametrize("geometry", ["aspect", "square"])
@pytest.mark.parametrize("colour", [False, True])
def test_a_device_batch_equals_the_host_batch(geometry: str, colour: bool) -> None:
    width = canonical_width(SIZE) if geometry == "aspect" else SIZE
    tiles, ids = _canonical(64, width)
    transform = TrainTransform(strength=1.0, seed=5, colour=colour)
    copies = [i % 3 for i in range(len(ids))]
    host = transform(tiles, ids, epoch=3, copies=copies)
    params = transform.draw(ids, epoch=3, copies=copies, image_size=SIZE, width=width)
    # Every quarter turn and flip occurs, and the square geometry shifts both ways.
    assert {(p.hflip, p.vflip, p.rot90) for p in params} >= {(False, False, k) for k in range(2)}
    assert len({p.rot90 for p in params}) == 4
    if geometry == "square":
        assert min(p.shift_x for p in params) < 0 < max(p.shift_y for p in params)
    device = _on_device(tiles, params, DeviceAugment(size=SIZE, max_shift=max_shift(1.0, SIZE)))
    assert device.shape == host.shape and device.dtype == np.uint8
    if not colour:
        np.testing.assert_array_equal(device, host)
        return
    # float32 on both sides, summed in other orders: a pixel may round to the next level.
    diff = np.abs(device.astype(np.int16) - host.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_each_geometry_element_alone_matches_numpy() -> None:
    width = canonical_width(SIZE)
    tiles, _ = _canonical(1, width, seed=1)
    for hflip in (0, 1):
        for vflip in (0, 1):
            for turns in range(4):
                geometry = torch.tensor([[3, 0, 0, hflip, vflip, turns]], dtype=torch.int32)
                got = augment_geometry(torch.from_numpy(tiles), geometry, size=SIZE)[0].numpy()
                want = tiles[0][:, :, 3 : 3 + SIZE]
                want = want[:, :, ::-1] if hflip else want
                want = want[:, ::-1, :] if vflip else want
                np.testing.assert_array_equal(got, np.rot90(want, turns, axes=(1, 2)))


def test_augment_tiles_on_device_hands_canonical_tiles_and_their_draws() -> None:
    """The host half: the same rows, order and copies as the host path, canonical pixels and
    the numbers of each row's draws; the device half then gives the host path's pixels."""
    width = canonical_width(SIZE)
    tiles, ids = _canonical(6, width, seed=2)
    batch = {
        "image": tiles,
        "label": np.array([0, 1, 1, 0, 1, 1]),
        "tile_id": np.array(ids, dtype=object),
        "patient_id": np.array(["a", "b", "b", "c", "d", "d"], dtype=object),
        "magnification": np.full(6, 40),
    }
    transform = TrainTransform(strength=1.0, seed=9, colour=True)
    kwargs = dict(transform=transform, first_execution=0, copies_per_label=(2, 1), epoch=1)
    host = augment_tiles(batch, **kwargs)
    lazy = augment_tiles(batch, **kwargs, on_device=True)
    assert list(lazy["tile_id"]) == list(host["tile_id"]) and len(host["tile_id"]) == 8
    np.testing.assert_array_equal(lazy["key"], host["key"])
    np.testing.assert_array_equal(lazy["label"], host["label"])
    assert lazy["image"].shape == (8, 3, SIZE, width)
    assert lazy[AUG_GEOMETRY].shape == (8, 6) and lazy[AUG_COLOUR].shape == (8, 14)
    device = DeviceAugment(size=SIZE)(
        {k: torch.from_numpy(lazy[k]) for k in ("image", AUG_GEOMETRY, AUG_COLOUR)},
        torch.device("cpu"),
    ).numpy()
    diff = np.abs(device.astype(np.int16) - host["image"].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_device_augment_refuses_a_batch_without_its_draws() -> None:
    with pytest.raises(ValueError, match="aug_geometry"):
        DeviceAugment(size=SIZE)({"image": torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)}, "cpu")
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        augment_geometry(
            torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8),
            torch.zeros(2, 5, dtype=torch.int32),
            size=SIZE,
        )
