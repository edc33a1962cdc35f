"""Training augmentation on the training device: the same draws as breakhis.data.transforms'
TrainTransform, applied batched in torch where the model runs (the GPU, or the CPU).

The Ray Data side (breakhis.data.ingest, ``augment_on_device``) hands the worker uint8
canonical tiles (3, S, W) and, per row, the tile's AugmentParams as numbers
(``aug_geometry``, ``aug_colour``: transforms.param_columns), drawn as before from
``tile_rng(seed, epoch, tile_id, copy)``; ``DeviceAugment`` turns a batch of them into the
uint8 (N, 3, S, S) training tiles TrainTransform would have made on the host:

- geometry (crop, reflected shift, flips, quarter turns) as two index gathers and one
  conditional transpose, with no per-tile Python and no device sync: a quarter turn of
  a square is a transpose and flips (rot90 k=1 is T after a column flip, k=2 both flips,
  k=3 T after a row flip), so every dihedral element is (row flip, column flip,
  transpose), folded into the gather indices. Exact: the same pixels as the host.
- colour (stain jitter in optical density, brightness, contrast) in float32 with the
  host's table of optical densities and its operations in its order, rounded to uint8
  as the host rounds: equal to the host's pixels up to float rounding (a pixel may differ
  by one level; tests/test_device_augment.py).

Then ``breakhis.data.transforms.normalize`` as before.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from breakhis.data.transforms import _OD_TABLE, AUG_COLOUR, AUG_GEOMETRY


@dataclass(frozen=True, kw_only=True)
class DeviceAugment:
    """Apply a batch's AugmentParams columns to its canonical uint8 tiles on their device.

    size: side S of the training tiles.
    max_shift: the largest translation of the square geometry (transforms.max_shift of
        the run's strength), 0 for the aspect geometry.
    """

    size: int
    max_shift: int = 0

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The augmented uint8 (N, 3, S, S) training tiles of ``batch`` (``image`` uint8
        canonical (N, 3, S, W), ``aug_geometry``, optional ``aug_colour``) on ``device``.
        Raises ValueError when the batch lacks the geometry column or its shapes disagree."""
        if AUG_GEOMETRY not in batch:
            raise ValueError(f"a batch augmented on the device needs its {AUG_GEOMETRY} column")
        images = batch["image"].to(device, non_blocking=True)
        geometry = batch[AUG_GEOMETRY].to(device, non_blocking=True)
        out = augment_geometry(images, geometry, size=self.size, max_shift=self.max_shift)
        if AUG_COLOUR in batch:
            out = augment_colour(out, batch[AUG_COLOUR].to(device, non_blocking=True))
        return out


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    """Indices outside 0..length-1 reflected about the edges (numpy's ``reflect`` pad)."""
    index = index.abs()
    return torch.where(index >= length, 2 * (length - 1) - index, index)


def augment_geometry(
    images: torch.Tensor, geometry: torch.Tensor, *, size: int, max_shift: int = 0
) -> torch.Tensor:
    """Crop, shift (reflecting the border), flip and turn each uint8 (3, S, W) tile of
    ``images`` by its row of ``geometry`` (int (N, 6): crop_x, shift_y, shift_x, hflip,
    vflip, rot90): transforms.apply_geometry for a batch. Returns uint8 (N, 3, S, S)."""
    n, channels, height, width = images.shape
    if geometry.shape != (n, 6):
        raise ValueError(
            f"{AUG_GEOMETRY} must be (N, 6) for {n} tiles, got {tuple(geometry.shape)}"
        )
    if height != size or width < size:
        raise ValueError(f"expected (N, 3, {size}, W >= {size}) tiles, got {tuple(images.shape)}")
    g = geometry.long()
    crop_x, shift_y, shift_x, hflip, vflip, turns = g.unbind(1)
    steps = torch.arange(size, device=images.device)
    rows = steps.expand(n, size)
    cols = steps.expand(n, size)
    if max_shift:
        rows = _reflect(shift_y[:, None] + steps, size)
        cols = _reflect(shift_x[:, None] + steps, size)
    cols = cols + crop_x[:, None]
    # rot90(F(x), k) = (transpose if k odd) of x with rows and columns reversed as below.
    flip_cols = (hflip ^ ((turns == 1) | (turns == 2)).long()).bool()
    flip_rows = (vflip ^ ((turns == 2) | (turns == 3)).long()).bool()
    cols = torch.where(flip_cols[:, None], cols.flip(1), cols)
    rows = torch.where(flip_rows[:, None], rows.flip(1), rows)
    out = images.gather(3, cols.view(n, 1, 1, size).expand(n, channels, height, size))
    out = out.gather(2, rows.view(n, 1, size, 1).expand(n, channels, size, size))
    transpose = (turns % 2 == 1).view(n, 1, 1, 1)
    return torch.where(transpose, out.transpose(2, 3), out).contiguous()


@functools.lru_cache(maxsize=8)
def _density_table(device: torch.device) -> torch.Tensor:
    """The host's optical-density table (transforms._OD_TABLE) on ``device``, copied once."""
    return torch.from_numpy(_OD_TABLE).to(device)


def augment_colour(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Stain, brightness and contrast jitter of uint8 (N, 3, H, W) ``images`` by the rows
    of ``colour`` (float32 (N, 14), transforms.param_columns): transforms.apply_colour on
    the tensor's device. Returns uint8 of the same shape."""
    n, channels, height, width = images.shape
    if colour.shape != (n, 14):
        raise ValueError(f"{AUG_COLOUR} must be (N, 14) for {n} tiles, got {tuple(colour.shape)}")
    colour = colour.float()
    table = _density_table(images.device)
    density = table[images.reshape(n, channels, height * width).long()]
    density = torch.bmm(colour[:, :9].reshape(n, 3, 3), density)
    density += colour[:, 9:12].reshape(n, 3, 1)
    pixels = torch.exp(density.neg_(), out=density)
    pixels.mul_(256.0).sub_(1.0)
    mean = pixels.mean(dim=(1, 2), keepdim=True)
    pixels.sub_(mean).mul_(colour[:, 13].view(n, 1, 1)).add_(mean)
    pixels.mul_(colour[:, 12].view(n, 1, 1)).clamp_(0.0, 255.0)
    return pixels.round_().to(torch.uint8).reshape(n, channels, height, width)
