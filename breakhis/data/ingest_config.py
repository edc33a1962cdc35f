"""IngestConfig: how breakhis.data.ingest turns a prepared DEST into training and evaluation
datasets (breakhis.data.tiles reads with it too, so it lives below both)."""

from __future__ import annotations

from dataclasses import dataclass

from breakhis.data.geometry import TileGeometry
from breakhis.data.stain import StainNormalizer
from breakhis.names import MAGNIFICATIONS


@dataclass(frozen=True)
class IngestConfig:
    """How to turn a prepared DEST into training and evaluation datasets.

    image_size: side S of the tiles fed to the model, in pixels (their height; see
        breakhis.data.geometry).
    geometry: ``aspect`` (keep the tile's aspect ratio; training crops S x S) or
        ``square`` (squash the whole tile to S x S).
    eval_view: what validation and test tiles are (aspect geometry): ``whole`` (the
        S x W canonical tile) or ``centre`` (its centre S x S crop).
    magnification: keep only this magnification (40, 100, 200 or 400; one model
        per magnification, as in the paper) or None for all (magnification-independent).
    cache: decode once and keep the decoded tiles in the Ray object store; False
        streams every epoch from the shards (decoding, or reading stored pixels)
        with bounded memory and a local shuffle buffer, for data larger than the
        object store; None (default) caches when the decoded tiles of the sides
        built take at most CACHE_FRACTION of the cluster's object store.
    augment_strength: 0 (no augmentation) .. 1; see breakhis/data/transforms.py.
    colour_augment: stain, brightness and contrast jitter on (at ``augment_strength``)
        or off (the geometric draws only).
    oversample: repeat each minority-class training tile round(n_major / n_minor)
        times per epoch (each copy augmented differently).
    shuffle: shuffle the training tiles (once globally when cached; block and
        file order change every epoch).
    seed: seed of the shuffles and of every augmentation (must be >= 0).
    stain: the run's fitted stain normaliser (breakhis.data.stain), applied to every canonical
        tile as it is decoded or read, or None.
    """

    image_size: int = 224
    magnification: int | None = None
    cache: bool | None = None
    augment_strength: float = 1.0
    colour_augment: bool = True
    oversample: bool = False
    shuffle: bool = True
    seed: int = 0
    geometry: str = "aspect"
    eval_view: str = "whole"
    stain: StainNormalizer | None = None

    def __post_init__(self) -> None:
        self.tile_geometry  # noqa: B018 - validates size, geometry and view
        if self.magnification is not None and self.magnification not in MAGNIFICATIONS:
            raise ValueError(
                f"magnification {self.magnification!r} unknown; accepted: "
                f"{', '.join(map(str, MAGNIFICATIONS))} or None for all"
            )
        if not 0.0 <= self.augment_strength <= 1.0:
            raise ValueError(f"augment_strength must be in [0, 1], got {self.augment_strength}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def tile_geometry(self) -> TileGeometry:
        """The TileGeometry of these options."""
        return TileGeometry(
            size=self.image_size, geometry=self.geometry, view=self.eval_view, stain=self.stain
        )
