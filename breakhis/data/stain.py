"""Stain normalisation (``--stain-norm macenko|reinhard``): every tile's colours mapped onto
those of a reference, fitted once per run and stored in the model artifact.

    stain = fit_stain("macenko", [reference_tile], reference="first training tile ...")
    tile = stain.apply(tile)                    # uint8 (H, W, 3) -> uint8 (H, W, 3)
    card_field = stain.to_dict()                # what model.json keeps (parameters, no image)
    StainNormalizer.from_dict(card_field)       # the same normaliser, in scoring

The methods are torchstain's numpy implementations (torchstain 1.4; no torch needed, so the
decode tasks of ingest and scoring stay torch-free):

- ``macenko`` (Macenko et al., ISBI 2009): the tile's haematoxylin and eosin vectors are
  estimated from its optical densities (the plane of the two largest eigenvectors, the 1st
  and 99th percentile angles), its stain concentrations rescaled so that their 99th
  percentiles match the reference's, and the tile rebuilt with the reference's stain matrix.
  Fitted parameters: the reference's 3 x 2 stain matrix and its two 99th-percentile
  concentrations. Light intensity 240, angle percentile 1, transparency threshold OD 0.15
  (torchstain's defaults).
- ``reinhard`` (Reinhard et al., 2001): each LAB channel standardised and given the
  reference's mean and standard deviation. Fitted parameters: 3 means and 3 stds.

Where it applies: to the *canonical* tile of breakhis.data.geometry (what the training cache holds
and the evaluation view is cut from), once, before any crop, flip or colour jitter; in
training (train and validation tiles), evaluation, scoring and the exported model alike
(breakhis.data.geometry.TileGeometry carries the normaliser to every decode path, and
breakhis.model.stain_graph puts it in the exported graph).

A tile the method cannot estimate is left as it is, the same way everywhere: for Macenko one
with fewer than MIN_TISSUE_FRACTION of its pixels stained (OD >= 0.15 in every channel: a
tile of glass), for Reinhard one with a flat LAB channel; and any result that is not finite.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

STAIN_METHODS: tuple[str, ...] = ("none", "macenko", "reinhard")
"""Accepted values of --stain-norm."""
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Files a --stain-reference folder contributes."""
MAX_REFERENCE_IMAGES = 64
"""A --stain-reference folder contributes its first (by name) this many images."""

MACENKO_IO = 240.0
"""Transmitted light intensity (torchstain's default)."""
MACENKO_ALPHA = 1.0
"""Percentile of the stain angles (torchstain's default)."""
MACENKO_BETA = 0.15
"""Optical density below which a pixel counts as unstained (torchstain's default)."""
MIN_TISSUE_FRACTION = 0.01
"""Macenko leaves a tile alone when fewer than this share of its pixels are stained."""
MIN_TISSUE_PIXELS = 16
"""... or fewer than this many (a covariance needs some)."""
FLAT_STD = 1e-6
"""Reinhard leaves a tile alone when a LAB channel's std is below this (a flat tile)."""


def check_stain(method: str) -> None:
    """Raise ValueError naming --stain-norm and the accepted values for an unknown one."""
    if method not in STAIN_METHODS:
        raise ValueError(f"--stain-norm {method!r} unknown; accepted: {', '.join(STAIN_METHODS)}")


def min_tissue_pixels(pixels: int) -> int:
    """Stained pixels a tile of ``pixels`` pixels needs for Macenko to normalise it."""
    return max(MIN_TISSUE_PIXELS, math.ceil(MIN_TISSUE_FRACTION * pixels))


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of the stained pixels of (P, 3) uint8 values (torchstain's ODhat rows)."""
    density = -np.log((rgb.astype(np.float64) + 1.0) / MACENKO_IO)
    return ~np.any(density < MACENKO_BETA, axis=1)


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted stain normaliser (module docstring): the method and its parameters."""

    method: str
    """``macenko`` or ``reinhard``."""
    stain_matrix: tuple[tuple[float, float], ...] = ()
    """Macenko: the reference's stain vectors, 3 rows (R, G, B) x 2 columns (H, E), in
    optical density."""
    max_concentrations: tuple[float, ...] = ()
    """Macenko: the reference's 99th-percentile H and E concentrations."""
    lab_mean: tuple[float, ...] = ()
    """Reinhard: the reference's mean of L, a, b (torchstain's scaling)."""
    lab_std: tuple[float, ...] = ()
    """Reinhard: the reference's standard deviation of L, a, b."""
    reference: str = ""
    """What it was fitted on (a URI, or which training tile), for the record."""

    def __post_init__(self) -> None:
        if self.method == "macenko":
            ok = (
                len(self.stain_matrix) == 3
                and all(len(row) == 2 for row in self.stain_matrix)
                and len(self.max_concentrations) == 2
                and all(v > 0 for v in self.max_concentrations)
            )
            values = [v for row in self.stain_matrix for v in row] + list(self.max_concentrations)
        elif self.method == "reinhard":
            ok = len(self.lab_mean) == 3 and len(self.lab_std) == 3
            ok = ok and all(v > 0 for v in self.lab_std)
            values = [*self.lab_mean, *self.lab_std]
        else:
            raise ValueError(f"stain method {self.method!r} unknown; accepted: macenko, reinhard")
        if not ok or not all(isinstance(v, float | int) and math.isfinite(v) for v in values):
            raise ValueError(
                f"stain parameters of {self.method} incomplete or not finite: expected "
                + (
                    "stain_matrix 3x2 and 2 positive max_concentrations"
                    if self.method == "macenko"
                    else "3 lab_mean and 3 positive lab_std"
                )
            )

    # -- the card ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values (the model card's ``stain`` field)."""
        out: dict[str, Any] = {"method": self.method, "reference": self.reference}
        if self.method == "macenko":
            out["stain_matrix"] = [list(row) for row in self.stain_matrix]
            out["max_concentrations"] = list(self.max_concentrations)
        else:
            out["lab_mean"] = list(self.lab_mean)
            out["lab_std"] = list(self.lab_std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainNormalizer:
        """The normaliser of a card's ``stain`` field. Raises ValueError for a field that
        is not one (unknown keys, a wrong method, missing or non-finite parameters)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {"method", "reference", "stain_matrix", "max_concentrations", "lab_mean", "lab_std"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown stain key(s) {', '.join(unknown)}")
        try:
            return cls(
                method=str(data.get("method", "")),
                stain_matrix=tuple(
                    tuple(float(v) for v in row) for row in data.get("stain_matrix", ())
                ),
                max_concentrations=tuple(float(v) for v in data.get("max_concentrations", ())),
                lab_mean=tuple(float(v) for v in data.get("lab_mean", ())),
                lab_std=tuple(float(v) for v in data.get("lab_std", ())),
                reference=str(data.get("reference", "")),
            )
        except TypeError as err:
            raise ValueError(f"stain parameters are not lists of numbers ({err})") from err

    # -- applying ---------------------------------------------------------------------------

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The normalised copy of one uint8 (H, W, 3) RGB tile (or the tile itself when the
        method cannot estimate it; module docstring)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"stain normalisation expects uint8 (H, W, 3), got {image.shape}")
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            out = self._macenko(image) if self.method == "macenko" else self._reinhard(image)
        return image if out is None else out

    def apply_chw(self, images: np.ndarray) -> np.ndarray:
        """``apply`` over uint8 (3, H, W) or (N, 3, H, W) tiles; returns a new array."""
        if images.ndim == 3:
            return np.ascontiguousarray(self.apply(images.transpose(1, 2, 0)).transpose(2, 0, 1))
        out = np.empty_like(images)
        for i, image in enumerate(images):
            out[i] = self.apply(image.transpose(1, 2, 0)).transpose(2, 0, 1)
        return out

    def _macenko(self, image: np.ndarray) -> np.ndarray | None:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        pixels = image.reshape(-1, 3)
        if int(_tissue(pixels).sum()) < min_tissue_pixels(len(pixels)):
            return None
        normalizer = NumpyMacenkoNormalizer()
        normalizer.HERef = np.asarray(self.stain_matrix, dtype=np.float64)
        normalizer.maxCRef = np.asarray(self.max_concentrations, dtype=np.float64)
        try:
            out = _macenko_float(normalizer, image)
        except np.linalg.LinAlgError:
            return None
        if not np.isfinite(out).all():
            return None
        # torchstain clips at 255 and truncates (astype); the same here, after the check.
        return np.minimum(out, 255.0).astype(np.uint8)

    def _reinhard(self, image: np.ndarray) -> np.ndarray | None:
        from torchstain.numpy.normalizers import NumpyReinhardNormalizer
        from torchstain.numpy.utils import lab_split, rgb2lab

        labs = lab_split(rgb2lab(image.astype(np.float32) / 255))
        if min(float(np.std(channel)) for channel in labs) < FLAT_STD:
            return None
        normalizer = NumpyReinhardNormalizer()
        normalizer.target_means = np.asarray(self.lab_mean, dtype=np.float64)
        normalizer.target_stds = np.asarray(self.lab_std, dtype=np.float64)
        out = normalizer.normalize(image)
        return out if out.shape == image.shape else None


def _macenko_float(normalizer: Any, image: np.ndarray) -> np.ndarray:
    """torchstain's Macenko ``normalize`` up to the float image, before its uint8 cast (whose
    NaN handling is undefined): the same steps, with its own private helpers."""
    h, w, c = image.shape
    flat = image.reshape((-1, 3))
    # Name-mangled private method of torchstain's class: the one place its matrices come from.
    he, conc, max_c = normalizer._NumpyMacenkoNormalizer__compute_matrices(
        flat, MACENKO_IO, MACENKO_ALPHA, MACENKO_BETA
    )
    del he
    max_c = np.divide(max_c, normalizer.maxCRef)
    conc = np.divide(conc, max_c[:, np.newaxis])
    out = np.multiply(MACENKO_IO, np.exp(-normalizer.HERef.dot(conc)))
    return np.reshape(out.T, (h, w, c))


def fit_stain(method: str, images: list[np.ndarray], *, reference: str) -> StainNormalizer:
    """Fit ``method`` on uint8 (H, W, 3) ``images`` (their pixels pooled, as one image) and
    return the StainNormalizer; ``reference`` says what they are, for errors and the record.

    Raises ValueError naming ``reference`` when there is no image, too little stained tissue
    for Macenko, or the fit gives parameters that are not finite (a flat image).
    """
    check_stain(method)
    if method == "none":
        raise ValueError("fit_stain: --stain-norm none fits nothing")
    if not images:
        raise ValueError(f"--stain-reference {reference}: no image to fit {method} on")
    pixels = np.concatenate([np.asarray(i, dtype=np.uint8).reshape(-1, 3) for i in images])
    pooled = pixels.reshape(-1, 1, 3)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "macenko":
            from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

            stained = int(_tissue(pixels).sum())
            if stained < min_tissue_pixels(len(pixels)):
                raise ValueError(
                    f"--stain-reference {reference}: {stained} of {len(pixels)} pixels stained "
                    f"(optical density >= {MACENKO_BETA}): too little tissue to fit Macenko; "
                    "name a tile with tissue"
                )
            normalizer = NumpyMacenkoNormalizer()
            try:
                normalizer.fit(pooled, Io=MACENKO_IO, alpha=MACENKO_ALPHA, beta=MACENKO_BETA)
            except np.linalg.LinAlgError as err:
                raise ValueError(
                    f"--stain-reference {reference}: Macenko fit failed ({err})"
                ) from err
            params = {
                "stain_matrix": tuple(tuple(float(v) for v in row) for row in normalizer.HERef),
                "max_concentrations": tuple(float(v) for v in normalizer.maxCRef),
            }
        else:
            from torchstain.numpy.normalizers import NumpyReinhardNormalizer

            normalizer = NumpyReinhardNormalizer()
            normalizer.fit(pooled)
            params = {
                "lab_mean": tuple(float(v) for v in normalizer.target_means),
                "lab_std": tuple(float(v) for v in normalizer.target_stds),
            }
    try:
        return StainNormalizer(method=method, reference=reference, **params)
    except ValueError as err:
        raise ValueError(
            f"--stain-reference {reference}: {method} fit gave no usable parameters ({err}); "
            "name an image of stained tissue"
        ) from err


def read_reference(uri: str) -> list[tuple[str, bytes]]:
    """The images named by ``--stain-reference``: one file (local path or ``s3://`` URI), or
    the first MAX_REFERENCE_IMAGES image files (IMAGE_SUFFIXES, by name) under a folder.
    Returns (uri, bytes) pairs. Raises ValueError naming the URI, and what is accepted, when
    there is nothing readable there."""
    from breakhis import storage

    accepted = (
        "accepted: a local path or s3:// URI of an image (PNG, JPEG, TIFF) or of a folder of them"
    )
    try:
        if storage.is_file(uri):
            return [(uri, storage.read_bytes(uri))]
        entries = [e.uri for e in storage.walk(uri, IMAGE_SUFFIXES)][:MAX_REFERENCE_IMAGES]
    except FileNotFoundError as err:
        raise ValueError(f"--stain-reference {uri}: no such file or folder; {accepted}") from err
    except OSError as err:
        raise ValueError(f"--stain-reference {uri}: cannot read it ({err}); {accepted}") from err
    if not entries:
        raise ValueError(f"--stain-reference {uri}: no image file there; {accepted}")
    return [(entry, storage.read_bytes(entry)) for entry in entries]
