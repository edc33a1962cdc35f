"""Tile transforms: the deterministic evaluation transform, per-epoch training
augmentation on CPU, and normalisation on the training device.

Pixels travel as uint8 CHW arrays (3, S, S) from the decode step to the
training device, a quarter of the bytes of float32; ``normalize`` turns a
batch into float32 there, after ``iter_torch_batches`` has moved it.

- ``EvalTransform``: PNG bytes -> uint8 CHW pixels of the run's TileGeometry
  (breakhis.data.geometry): the canonical tile (aspect kept, S x W) that the training cache
  holds, or the evaluation view that validation, test and scoring feed the model. No
  randomness, so a model sees tiles at one scale everywhere.
- ``TrainTransform``: a batch of canonical tiles -> augmented S x S training tiles
  (with the aspect geometry a random S x S crop of each S x W tile; with the square
  one the whole tile). Every draw comes from ``tile_rng(seed, epoch, tile_id, copy)``, so an
  augmentation depends only on which tile it is, in which epoch, and which
  oversampled copy; not on the batch it lands in, the worker that runs it,
  the order of tasks or a retried task. Same seed, same pixels.
- ``normalize``: uint8 NCHW tensor -> float32, ImageNet mean and std.

The augmentations are the symmetries of a histology tile plus stain
variation (Tellez et al., 2019, "Quantifying the effects of data augmentation
and stain color normalization in convolutional neural networks for
computational pathology"), scaled by one ``strength`` in [0, 1]:

- aspect geometry: a random S x S crop of the S x W canonical tile (uniform offset; the
  centre crop at ``strength = 0``); square geometry: translation by up to
  ``strength * S / 8`` pixels each way, the border filled by reflection;
- horizontal and vertical flips and 90-degree rotations (a slide has no up),
  each with probability 1/2 or 1/4 as soon as ``strength > 0``;
- stain jitter in haematoxylin-eosin-DAB optical-density space (Ruifrok and
  Johnston's matrix): each stain's concentration scaled by
  ``1 +- 0.2 * strength`` and shifted by ``+-0.05 * strength``;
- brightness ``1 +- 0.1 * strength`` and contrast ``1 +- 0.2 * strength``.

``colour=False`` keeps the geometric draws and leaves the colours alone (the ablation of
stain jitter). ``strength = 0`` is the identity on the square geometry and the centre crop
on the aspect one, so a training run without augmentation sees the evaluation pixels of
the centre view.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from breakhis.data.geometry import TileGeometry
from breakhis.data.imaging import decode_rgb

if TYPE_CHECKING:  # data workers never import torch for these transforms
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical
# density per RGB channel, the matrix scikit-image's rgb2hed uses.
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# Optical density of each uint8 value, OD = -ln((I + 1) / 256), so 255 is 0 (no stain)
# and 0 is finite; a table lookup is far cheaper than a log per pixel.
_OD_TABLE = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)

# Amplitudes at strength 1 (see the module docstring).
_SHIFT_FRACTION = 1 / 8
_STAIN_SCALE = 0.2
_STAIN_SHIFT = 0.05
_BRIGHTNESS = 0.1
_CONTRAST = 0.2


def to_chw(image_hwc: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image as a contiguous (3, H, W) array of the same dtype."""
    return np.ascontiguousarray(image_hwc.transpose(2, 0, 1))


@dataclass(frozen=True, kw_only=True)
class EvalTransform:
    """The deterministic transform: PNG bytes -> uint8 CHW pixels of ``geometry``.

    geometry: the TileGeometry (side S, ``aspect`` or ``square``, evaluation view).
    canonical: return the canonical tile (what training crops from) instead of the
    evaluation view.
    """

    geometry: TileGeometry = TileGeometry(size=224)
    canonical: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (3, H, W) shape of every output."""
        hw = self.geometry.canonical_hw if self.canonical else self.geometry.eval_hw
        return (3, *hw)

    def __call__(self, data: bytes) -> np.ndarray:
        """The tile as uint8 (3, H, W). Raises ValueError with the reason for a bad image."""
        pixels = decode_rgb(data)
        if self.canonical:
            return to_chw(self.geometry.canonical(pixels))
        return to_chw(self.geometry.eval_pixels(pixels))


def tile_rng(seed: int, epoch: int, tile_id: str, copy: int = 0) -> np.random.Generator:
    """The random generator of one tile's augmentation in one epoch.

    A pure function of its arguments (the tile id is hashed with BLAKE2, not
    Python's salted ``hash``), so every process draws the same numbers.
    Raises ValueError for a negative seed, epoch or copy.
    """
    if min(seed, epoch, copy) < 0:
        raise ValueError(f"seed, epoch and copy must be >= 0, got {seed}, {epoch}, {copy}")
    key = int.from_bytes(hashlib.blake2b(tile_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, copy, key])


@dataclass(frozen=True, kw_only=True)
class AugmentParams:
    """The random choices for one tile (see the module docstring for their ranges)."""

    shift_y: int = 0
    shift_x: int = 0
    crop_x: int = 0  # left edge of the S x S crop of an S x W canonical tile
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0  # quarter turns counter-clockwise
    stain_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stain_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 1.0
    contrast: float = 1.0

    @property
    def changes_colour(self) -> bool:
        return (
            self.stain_scale != (1.0, 1.0, 1.0)
            or self.stain_shift != (0.0, 0.0, 0.0)
            or self.brightness != 1.0
            or self.contrast != 1.0
        )


def random_params(
    rng: np.random.Generator,
    *,
    strength: float,
    image_size: int,
    width: int | None = None,
    colour: bool = True,
) -> AugmentParams:
    """Draw one tile's AugmentParams at ``strength`` (0 gives the identity, or the centre
    crop). ``width`` is the canonical tile's width when it is wider than ``image_size``
    (aspect geometry): a random crop replaces the translation. ``colour=False`` draws
    the same geometry and no colour change."""
    width = image_size if width is None else width
    if strength <= 0:
        return AugmentParams(crop_x=(width - image_size) // 2)
    if width > image_size:
        shift_y = shift_x = 0
        crop_x = int(rng.integers(0, width - image_size + 1))
    else:
        most = max_shift(strength, image_size)
        shift_y, shift_x = (int(v) for v in rng.integers(-most, most + 1, size=2))
        crop_x = 0
    hflip, vflip = (bool(v) for v in rng.integers(0, 2, size=2))
    rot90 = int(rng.integers(0, 4))
    scale = rng.uniform(1 - _STAIN_SCALE * strength, 1 + _STAIN_SCALE * strength, size=3)
    shift = rng.uniform(-_STAIN_SHIFT * strength, _STAIN_SHIFT * strength, size=3)
    brightness = float(rng.uniform(1 - _BRIGHTNESS * strength, 1 + _BRIGHTNESS * strength))
    contrast = float(rng.uniform(1 - _CONTRAST * strength, 1 + _CONTRAST * strength))
    if not colour:
        return AugmentParams(
            shift_y=shift_y, shift_x=shift_x, crop_x=crop_x, hflip=hflip, vflip=vflip, rot90=rot90
        )
    return AugmentParams(
        shift_y=shift_y,
        shift_x=shift_x,
        crop_x=crop_x,
        hflip=hflip,
        vflip=vflip,
        rot90=rot90,
        stain_scale=tuple(float(v) for v in scale),
        stain_shift=tuple(float(v) for v in shift),
        brightness=brightness,
        contrast=contrast,
    )


def apply_geometry(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Crop an S x S square at ``crop_x`` (a canonical S x W tile), translate (reflecting
    the border), flip and rotate one uint8 (3, S, W) tile; returns (3, S, S)."""
    size = image.shape[1]
    out = image = image[:, :, params.crop_x : params.crop_x + size]
    if params.shift_y or params.shift_x:
        pad = max(abs(params.shift_y), abs(params.shift_x))
        padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        top, left = pad + params.shift_y, pad + params.shift_x
        out = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
    if params.hflip:
        out = out[:, :, ::-1]
    if params.vflip:
        out = out[:, ::-1, :]
    if params.rot90:
        out = np.rot90(out, params.rot90, axes=(1, 2))
    return out


def colour_terms(
    params: Sequence[AugmentParams],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The colour jitter of each tile as numbers: float32 ``(mixes (N, 3, 3), offsets
    (N, 3, 1), brightness (N,), contrast (N,))``, what ``apply_colour`` applies (and the
    training device does from the ``aug_colour`` column, breakhis.data.device_augment)."""
    n = len(params)
    # Stain jitter is linear in optical density: OD' = OD @ (HED^-1 diag(a) HED) + b @ HED.
    mixes = np.empty((n, 3, 3), dtype=np.float32)
    offsets = np.empty((n, 3, 1), dtype=np.float32)
    for i, p in enumerate(params):
        mixes[i] = (_HED_FROM_RGB @ np.diag(p.stain_scale) @ _RGB_FROM_HED).T
        offsets[i, :, 0] = np.asarray(p.stain_shift) @ _RGB_FROM_HED
    brightness = np.array([p.brightness for p in params], dtype=np.float32)
    contrast = np.array([p.contrast for p in params], dtype=np.float32)
    return mixes, offsets, brightness, contrast


def apply_colour(images: np.ndarray, params: Sequence[AugmentParams]) -> np.ndarray:
    """Stain, brightness and contrast jitter of a uint8 (N, 3, H, W) batch, one
    AugmentParams per image. Returns a new uint8 array of the same shape."""
    n, channels, height, width = images.shape
    mixes, offsets, brightness, contrast = colour_terms(params)
    density = _OD_TABLE[images.reshape(n, channels, height * width)]
    density = np.matmul(mixes, density)
    density += offsets
    pixels = np.exp(-density, out=density)
    pixels *= 256.0
    pixels -= 1.0
    mean = pixels.mean(axis=(1, 2), keepdims=True)
    pixels -= mean
    pixels *= contrast[:, None, None]
    pixels += mean
    pixels *= brightness[:, None, None]
    np.clip(pixels, 0.0, 255.0, out=pixels)
    return np.rint(pixels).astype(np.uint8).reshape(n, channels, height, width)


AUG_GEOMETRY = "aug_geometry"
"""Column of a training row augmented on the device: int32 (6,) crop_x, shift_y, shift_x,
hflip, vflip, rot90 (AugmentParams' geometric draws)."""
AUG_COLOUR = "aug_colour"
"""Column of a training row augmented on the device, when colours change: float32 (14,)
the stain mix (3 x 3, row-major), the stain offset (3), brightness and contrast
(``colour_terms``)."""


def param_columns(params: Sequence[AugmentParams], *, colour: bool) -> dict[str, np.ndarray]:
    """The AugmentParams of a batch as the numeric columns AUG_GEOMETRY and, with
    ``colour``, AUG_COLOUR: what the training device needs to apply them (torch has no
    Python objects)."""
    geometry = np.array(
        [[p.crop_x, p.shift_y, p.shift_x, p.hflip, p.vflip, p.rot90] for p in params],
        dtype=np.int32,
    ).reshape(len(params), 6)
    if not colour:
        return {AUG_GEOMETRY: geometry}
    mixes, offsets, brightness, contrast = colour_terms(params)
    n = len(params)
    terms = np.concatenate(
        [mixes.reshape(n, 9), offsets.reshape(n, 3), brightness[:, None], contrast[:, None]],
        axis=1,
    )
    return {AUG_GEOMETRY: geometry, AUG_COLOUR: terms}


def max_shift(strength: float, image_size: int) -> int:
    """The largest translation (pixels, each way) of the square geometry at ``strength``."""
    return int(round(strength * image_size * _SHIFT_FRACTION)) if strength > 0 else 0


@dataclass(frozen=True, kw_only=True)
class TrainTransform:
    """Per-epoch random augmentation of decoded uint8 (N, 3, S, S) tiles on CPU.

    strength: 0 (identity) .. 1 (strongest); see the module docstring.
    seed: the run's seed; with the epoch, tile id and copy it fixes every draw.
    """

    strength: float = 0.5
    seed: int = 0
    colour: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augment strength must be in [0, 1], got {self.strength}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def params(
        self,
        tile_id: str,
        *,
        epoch: int,
        copy: int = 0,
        image_size: int,
        width: int | None = None,
    ) -> AugmentParams:
        """The AugmentParams of one tile in one epoch (the same in every process);
        ``width`` is the canonical tile's width (aspect geometry)."""
        rng = tile_rng(self.seed, epoch, tile_id, copy)
        return random_params(
            rng, strength=self.strength, image_size=image_size, width=width, colour=self.colour
        )

    @property
    def changes_colour(self) -> bool:
        """Whether these draws change colours (colour on, strength > 0)."""
        return self.colour and self.strength > 0

    def draw(
        self,
        tile_ids: Sequence[str],
        *,
        epoch: int,
        copies: Sequence[int] | None = None,
        image_size: int,
        width: int | None = None,
    ) -> list[AugmentParams]:
        """The AugmentParams of each tile (``copies``: each one's copy number, default 0)."""
        copies = [0] * len(tile_ids) if copies is None else copies
        return [
            self.params(t, epoch=epoch, copy=int(c), image_size=image_size, width=width)
            for t, c in zip(tile_ids, copies, strict=True)
        ]

    def __call__(
        self,
        images: np.ndarray,
        tile_ids: Sequence[str],
        *,
        epoch: int,
        copies: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Augmented S x S copies of ``images`` (uint8 (N, 3, S, W) canonical tiles, W >= S),
        one per tile id.

        ``copies`` tells apart the oversampled copies of one tile (default all 0).
        Returns a new uint8 (N, 3, S, S) array; raises ValueError when the shapes disagree.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] > images.shape[3]:
            raise ValueError(f"expected uint8 (N, 3, S, W >= S) tiles, got shape {images.shape}")
        if len(tile_ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(tile_ids)} tile ids")
        size, width = images.shape[2], images.shape[3]
        params = self.draw(tile_ids, epoch=epoch, copies=copies, image_size=size, width=width)
        moved = np.empty((len(images), 3, size, size), dtype=np.uint8)
        for i, (image, p) in enumerate(zip(images, params, strict=True)):
            moved[i] = apply_geometry(image, p)
        if not any(p.changes_colour for p in params):
            return moved
        return apply_colour(moved, params)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Scale a uint8 (N, 3, H, W) batch to [0, 1] and standardise each channel.

    Runs on the tensor's own device (call it after moving the uint8 batch to the
    GPU: a quarter of the bytes cross the bus). Returns a float32 tensor there.
    Raises ValueError for a batch that is not uint8 NCHW with 3 channels.
    """
    import torch

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"normalize expects a uint8 (N, 3, H, W) tensor, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    # (x / 255 - mean) / std as one multiply and one subtract on a single new tensor.
    return images.float().mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
