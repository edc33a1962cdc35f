"""Tile geometry: how a 700x460 BreakHis tile becomes model pixels, in one place.

Two geometries (``--geometry``):

- ``aspect`` (the default): the tile is resized keeping its aspect ratio to height S, i.e.
  to the *canonical* S x W tile with W = round(S * 700 / 460) (S = 224: 224 x 341). A tile
  of another shape (the sample's 700x456 ones) is resized to cover S x W and centre-cropped,
  so the tissue is never stretched. Training takes a random S x S crop of the canonical tile;
  a quarter turn of that square crop is a true symmetry of the tissue.
- ``square``: the whole tile squashed to S x S (5.5x horizontal against 3.6x vertical
  reduction at 128 px), the published CNN baselines' resize and this project's before
  2026-12-07; kept to read older models and for the ablation (docs/training.md).

What evaluation, validation, scoring and export feed the model (``--eval-view``, aspect
geometry only; the network pools globally, so any size works):

- ``whole``: the whole canonical S x W tile;
- ``centre``: its centre S x S crop (what the training crops look like).

All resizes are Pillow's bilinear with ``reducing_gap=2.0`` (breakhis.data.imaging.resize_rgb).

With a stain normaliser (``stain``, breakhis.data.stain) the canonical tile is stain-normalised as
soon as it is made, before any view, crop or augmentation: every path that makes model pixels
goes through ``canonical`` (PNG decodes) or ``normalise_stain`` (pixels ``prepare --pixels``
stored, which are not normalised), so training, evaluation and scoring see the same colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from breakhis.data.imaging import resize_rgb
from breakhis.data.stain import StainNormalizer

GEOMETRIES: tuple[str, ...] = ("aspect", "square")
"""Accepted values of --geometry."""
EVAL_VIEWS: tuple[str, ...] = ("whole", "centre")
"""Accepted values of --eval-view."""
TILE_WIDTH, TILE_HEIGHT = 700, 460
"""A BreakHis tile's size: the aspect ratio the canonical tile keeps."""
MIN_SIZE, MAX_SIZE = 8, 2048
"""Sides accepted for stored pixels (``prepare --pixels``)."""


def check_geometry(geometry: str, view: str = "whole") -> None:
    """Raise ValueError naming the option and the accepted values for an unknown one."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"--geometry {geometry!r} unknown; accepted: {', '.join(GEOMETRIES)}")
    if view not in EVAL_VIEWS:
        raise ValueError(f"--eval-view {view!r} unknown; accepted: {', '.join(EVAL_VIEWS)}")


def check_sizes(sizes: tuple[int, ...], option: str = "--pixels") -> None:
    """Raise ValueError naming ``option`` unless every size is an integer in 8..2048."""
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(
                f"{option}: size {size!r} not accepted; accepted: integers {MIN_SIZE}..{MAX_SIZE} "
                "(comma-separated, e.g. 224,128)"
            )


def canonical_width(size: int) -> int:
    """Width W of the canonical aspect-kept tile of height ``size``."""
    return int(round(size * TILE_WIDTH / TILE_HEIGHT))


@dataclass(frozen=True, kw_only=True)
class TileGeometry:
    """How tiles become model pixels at side ``size`` (see the module docstring)."""

    size: int
    geometry: str = "aspect"
    view: str = "whole"
    stain: StainNormalizer | None = None
    """The run's fitted stain normaliser (None: colours as decoded)."""

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {self.size}")
        check_geometry(self.geometry, self.view)

    @property
    def canonical_hw(self) -> tuple[int, int]:
        """(height, width) of the decoded tile every path starts from (cache, stored pixels)."""
        if self.geometry == "square":
            return self.size, self.size
        return self.size, canonical_width(self.size)

    @property
    def eval_hw(self) -> tuple[int, int]:
        """(height, width) of what evaluation, validation and scoring feed the model."""
        if self.geometry == "square" or self.view == "centre":
            return self.size, self.size
        return self.canonical_hw

    def canonical(self, pixels: np.ndarray) -> np.ndarray:
        """A decoded RGB uint8 (H, W, 3) tile as the canonical (canonical_hw) tile, HWC,
        stain-normalised when the geometry has a normaliser."""
        height, width = self.canonical_hw
        if self.geometry == "square":
            return self._stained(resize_rgb(pixels, (height, width)))
        h, w = pixels.shape[:2]
        # Cover height x width keeping the aspect ratio, then centre-crop the excess.
        scale = max(height / h, width / w)
        cover = (max(height, int(round(h * scale))), max(width, int(round(w * scale))))
        resized = resize_rgb(pixels, cover)
        top, left = (cover[0] - height) // 2, (cover[1] - width) // 2
        return self._stained(np.ascontiguousarray(resized[top : top + height, left : left + width]))

    def _stained(self, canonical_hwc: np.ndarray) -> np.ndarray:
        return canonical_hwc if self.stain is None else self.stain.apply(canonical_hwc)

    def normalise_stain(self, canonical_chw: np.ndarray) -> np.ndarray:
        """Stored canonical tiles, uint8 (3, H, W) or (N, 3, H, W), stain-normalised like
        ``canonical`` normalises a decoded one; the same array without a normaliser."""
        return canonical_chw if self.stain is None else self.stain.apply_chw(canonical_chw)

    def view_of(self, canonical: np.ndarray) -> np.ndarray:
        """The evaluation view of canonical tiles: ``(..., H, W)`` CHW or NCHW arrays or
        tensors (the last two axes are height and width); the same object for ``whole``."""
        height, width = self.eval_hw
        full_w = canonical.shape[-1]
        if full_w == width:
            return canonical
        left = (full_w - width) // 2
        return canonical[..., :height, left : left + width]

    def eval_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """A decoded RGB uint8 (H, W, 3) tile as the model's evaluation input, HWC."""
        height, width = self.eval_hw
        canonical = self.canonical(pixels)
        if canonical.shape[1] == width:
            return canonical
        left = (canonical.shape[1] - width) // 2
        return np.ascontiguousarray(canonical[:height, left : left + width])
