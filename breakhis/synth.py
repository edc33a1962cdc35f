"""Generated BreakHis-shaped data for tests and the demo.

    breakhis synth ./synthetic --scale 0.05 --seed 0      # ~400 images, all 82 patient folders
    breakhis synth s3://bucket/breakhis --scale 1         # 7,909 images, the real table

What this is: a stand-in that lets the pipeline (catalog, prepare, splits,
training, scoring, explanations) run end to end without the real archive. It
writes RGB PNGs under the exact official layout and file names
(``BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<slide-dir>/<mag>X/<file>``),
with the real subtypes, magnifications, patients per subtype and images per
(subtype, magnification) scaled from the table in shared/BREAKHIS.md.

What this is not: a model of breast cancer. The pictures look like H&E tissue
at a glance (pink eosin stroma with wavy fibres, purple haematoxylin nuclei,
white lumens) and nothing more. A classifier that scores well here says only
that the pipeline moves data and labels correctly.

The class signal, exactly. Every patient gets a latent score ``z`` around a
per-subtype mean (adenosis and fibroadenoma -1.1, tubular adenoma -1.0,
phyllodes tumour -0.7; ductal 1.1, papillary 0.9, mucinous 0.8, lobular 0.7):
the patients of a subtype sit on evenly spaced quantiles of a normal
distribution with standard deviation ``_PATIENT_SD`` = 0.5, in an order set by
the seed. Each image adds its own noise (sd ``_IMAGE_SD`` = 0.25). Everything that differs
between the classes is a function of that one number; a higher ``z`` gives:

- bigger nuclei (mean radius 1.9 px at 40X and 700x460, x exp(0.28 z)) that are
  darker (haematoxylin x exp(0.25 z));
- more pleomorphism: a wider spread of sizes, more irregular outlines, paler
  centres and coarser grain (these only show from ~200X);
- more crowding (nuclear area inside epithelium 0.42 + 0.15 z) and more of the
  field covered by epithelium rather than stroma (0.40 + 0.18 z);
- solid sheets (cords for lobular) instead of single-layer rings of small round
  nuclei around a white lumen with flat cells outside (gland-like), and
  stratified, crowded rings when rings do occur.

In short: malignant images hold, on average, several times more dark-purple
area, in bigger and more varied blobs; benign ones more pink stroma, small
regular nuclei in rings and white lumens. The classes overlap on purpose:
for every seed, the lowest ductal, lobular and mucinous patients sit at z ~ 0
and about ten patients of both classes within 0.4 of it; class-independent
nuisances blur the signal further: a per-patient stain colour and strength, how many lymphocytes
(small, very dark nuclei) there are, a cellular stroma for phyllodes tumour,
pale mucin lakes for mucinous carcinoma. A small CNN therefore learns it in a
few epochs, and patient-disjoint accuracy stays well above chance and below 100%.

Magnification and size change the scale only. At 400X a pixel covers a tenth
of the tissue it covers at 40X, so nuclei are ten times wider and far fewer fit
in a field. ``width``/``height`` change the resolution, not the field: a
64x64 image shows the same tissue area as the 700x460 one, as if resized (it is
slightly darker than a resized one, since optical density rather than light is
averaged). Nuclei smaller than a pixel are drawn as their ink, not their shape.

Layout rules, for any ``scale``:

- images per (subtype, magnification) = round(table count x scale), raised to
  the number of patients kept so that each kept patient has at least one image
  at every magnification; at ``scale=1`` the counts are exactly the table;
- from ``FULL_ROSTER_SCALE`` (0.04) up, all 82 patient folders (81 patient ids)
  are kept; below it each subtype keeps as many patients as its smallest
  (magnification) count allows, at least one, so tiny data sets stay tiny;
- the patient ids, who is kept and how many images each patient has do not
  depend on ``seed``: the seed changes pixels only. Slide ``14-13412`` is
  always kept under both ductal and lobular carcinoma, as in the real archive.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import multiprocessing
import os
import statistics
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from breakhis import storage
from breakhis.names import (
    MAGNIFICATIONS,
    SUBTYPES,
    TileName,
    format_name,
    official_relative_path,
    parse_name,
)

logger = logging.getLogger(__name__)

TABLE: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "A": (4, (114, 113, 111, 106)),
    "F": (10, (253, 260, 264, 237)),
    "PT": (3, (109, 121, 108, 115)),
    "TA": (7, (149, 150, 140, 130)),
    "DC": (38, (864, 903, 896, 788)),
    "LC": (5, (156, 170, 163, 137)),
    "MC": (9, (205, 222, 196, 169)),
    "PC": (6, (145, 142, 135, 138)),
}
"""Subtype code -> (patients, images at 40X, 100X, 200X, 400X), from shared/BREAKHIS.md."""

SHARED_PATIENT = "14-13412"
"""The slide filed under both ductal and lobular carcinoma in the real archive."""

FULL_ROSTER_SCALE = 0.04
"""From this scale up every patient of the table is kept."""

MAX_SCALE = 10.0
_MIN_SIDE, _MAX_SIDE = 16, 4096
_REFERENCE_SIZE = (700, 460)  # the real images' size; other sizes are resized views
_ROSTER_SEED = 20160701  # fixed: patient ids and image counts must not move with --seed
_PATIENT_SD = 0.5
_IMAGE_SD = 0.25
_PNG_COMPRESS_LEVEL = 1  # 3.5x faster than PIL's default 6 for ~13% larger files
_STAMP_BUDGET = 2_000_000  # sprite pixels per vectorised batch (bounds memory to ~50 MB)

# Optical density per unit of stain: Ruifrok & Johnston's haematoxylin; eosin with more
# blue absorption than theirs, which reads as pink rather than magenta on screen.
_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.09, 0.92, 0.36])


@dataclass(frozen=True)
class SynthSummary:
    """What synthesize() wrote."""

    out_uri: str
    images: int
    patients: int
    """Distinct patient ids (14-13412 counted once)."""
    patient_folders: int
    """(subtype, patient) slide folders (14-13412 counted under DC and LC)."""
    per_class: Mapping[str, int]
    per_subtype: Mapping[str, int]
    per_magnification: Mapping[int, int]
    per_subtype_magnification: Mapping[str, Mapping[int, int]]
    """subtype -> magnification -> images (the layout of the table in BREAKHIS.md)."""
    seconds: float

    def format_table(self) -> str:
        """A plain-text table of what was written: images per subtype and magnification."""
        mags = list(MAGNIFICATIONS)
        header = f"{'subtype':<22}" + "".join(f"{f'{m}X':>7}" for m in mags) + f"{'total':>8}"
        lines = [
            f"wrote {self.images} images of {self.patients} patients "
            f"({self.patient_folders} slide folders) to {self.out_uri} in {self.seconds:.1f} s",
            header,
        ]
        for name, _ in SUBTYPES.values():
            row = self.per_subtype_magnification.get(name, {})
            cells = "".join(f"{row.get(m, 0):>7}" for m in mags)
            lines.append(f"{name:<22}{cells}{self.per_subtype.get(name, 0):>8}")
        cells = "".join(f"{self.per_magnification.get(m, 0):>7}" for m in mags)
        lines.append(f"{'all':<22}{cells}{self.images:>8}")
        classes = ", ".join(f"{k} {v}" for k, v in sorted(self.per_class.items()))
        lines.append(f"classes: {classes}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Flavour:
    """Per-subtype look; only ``z_mean`` is tied to the class."""

    z_mean: float
    arch: tuple[float, float, float]  # log-weights of ring, sheet, cord before z shifts them
    lumen: tuple[float, float]  # lumen radius range, 40X pixels
    aspect: tuple[float, float]  # lumen elongation range
    stroma_cells: float  # stromal nuclei per 1000 40X-pixel^2 of stroma
    mucin: float  # fraction of the field under mucin pools


_NO_CORD = -9.0
_FLAVOURS: dict[str, _Flavour] = {
    "A": _Flavour(-1.1, (1.2, -0.5, _NO_CORD), (4.0, 8.0), (1.0, 1.6), 0.5, 0.0),
    "F": _Flavour(-1.1, (1.0, -0.5, _NO_CORD), (4.0, 10.0), (1.8, 4.0), 0.8, 0.0),
    "PT": _Flavour(-0.7, (0.8, -0.2, _NO_CORD), (5.0, 12.0), (1.5, 3.5), 2.2, 0.0),
    "TA": _Flavour(-1.0, (1.4, -0.8, _NO_CORD), (3.0, 6.0), (1.0, 1.4), 0.4, 0.0),
    "DC": _Flavour(1.1, (-0.2, 0.5, _NO_CORD), (4.0, 9.0), (1.0, 1.8), 0.5, 0.0),
    "LC": _Flavour(0.7, (-1.0, 0.0, 1.2), (4.0, 8.0), (1.0, 1.5), 0.6, 0.0),
    "MC": _Flavour(0.8, (-0.8, 0.6, _NO_CORD), (4.0, 8.0), (1.0, 1.6), 0.3, 0.4),
    "PC": _Flavour(0.9, (0.6, 0.2, _NO_CORD), (5.0, 11.0), (1.2, 2.5), 0.5, 0.0),
}


@dataclass(frozen=True)
class _Look:
    """How one patient's slide looks; fixed for all their images."""

    z: float
    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_gain: float
    e_gain: float
    background_od: float
    lymphocytes: float  # per 1000 40X-pixel^2


@dataclass(frozen=True)
class _Task:
    tile: TileName
    look: _Look
    seed: int
    width: int
    height: int
    uri: str


# --------------------------------------------------------------------------- roster and plan


def patient_roster() -> dict[str, tuple[str, ...]]:
    """Subtype code -> patient ids in keep order (the same for every seed and scale).

    Ids look like the real ones (``YY-NNNNN`` with optional letters, e.g.
    ``14-22549AB``); ``SHARED_PATIENT`` comes first under DC and LC so it is
    kept at every scale.
    """
    return dict(_roster())


@functools.lru_cache(maxsize=1)
def _roster() -> tuple[tuple[str, tuple[str, ...]], ...]:
    rng = np.random.default_rng(_ROSTER_SEED)
    # Ids printed in shared/BREAKHIS.md, so examples in docs point at real folders.
    fixed = {"A": ["14-22549AB"], "DC": [SHARED_PATIENT, "14-2523"], "LC": [SHARED_PATIENT]}
    used = {pid for ids in fixed.values() for pid in ids}
    suffixes = ["A", "B", "C", "E", "F", "AB", "CD", "DE", "EF", "G", "GH"]
    roster: dict[str, tuple[str, ...]] = {}
    for code, (n_patients, _) in TABLE.items():
        ids = list(fixed.get(code, []))
        while len(ids) < n_patients:
            year = int(rng.choice([13, 14, 15], p=[0.1, 0.75, 0.15]))
            slide = int(np.exp(rng.uniform(np.log(100), np.log(30000))))
            suffix = str(rng.choice(suffixes)) if rng.random() < 0.35 else ""
            pid = f"{year}-{slide}{suffix}"
            if pid not in used:
                used.add(pid)
                ids.append(pid)
        roster[code] = tuple(ids)
    return tuple(roster.items())


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not (isinstance(scale, int | float) and 0 < scale <= MAX_SCALE):
        raise ValueError(f"scale={scale!r}: expected a number in (0, {MAX_SCALE}]")


def _kept_patients(code: str, scale: float) -> int:
    n_patients, counts = TABLE[code]
    if scale >= FULL_ROSTER_SCALE:
        return n_patients
    return max(1, min(n_patients, math.floor(min(counts) * scale)))


def _split_largest_remainder(total: int, weights: np.ndarray) -> list[int]:
    """``total`` split in proportion to ``weights``, at least 1 each, summing exactly."""
    extra = total - len(weights)
    quota = extra * weights / weights.sum()
    share = np.floor(quota).astype(int)
    left = extra - int(share.sum())
    # Ties broken by position so the split is the same on every platform.
    order = sorted(range(len(weights)), key=lambda i: (-(quota[i] - share[i]), i))
    for i in order[:left]:
        share[i] += 1
    return [int(s) + 1 for s in share]


def plan_tiles(scale: float = 0.05) -> list[TileName]:
    """Every image synthesize() writes at this scale, as TileNames, in write order.

    Counts follow the rules in the module docstring. Raises ValueError for a
    scale outside (0, MAX_SCALE].
    """
    _check_scale(scale)
    roster = patient_roster()
    rng = np.random.default_rng(_ROSTER_SEED + 1)
    # Some real patients contribute 10 images per magnification, others 60+.
    weights = {code: rng.lognormal(0.0, 0.5, size=len(ids)) for code, ids in roster.items()}
    tiles: list[TileName] = []
    for code, (_, counts) in TABLE.items():
        kept = _kept_patients(code, scale)
        ids = roster[code][:kept]
        for mag, count in zip(MAGNIFICATIONS, counts, strict=True):
            n_images = max(round(count * scale), kept)
            jitter = rng.lognormal(0.0, 0.15, size=len(roster[code]))[:kept]
            per_patient = _split_largest_remainder(n_images, weights[code][:kept] * jitter)
            for pid, n in zip(ids, per_patient, strict=True):
                for seq in range(1, n + 1):
                    name = format_name(
                        subtype_code=code, patient_id=pid, magnification=mag, sequence=seq
                    )
                    tiles.append(parse_name(name))
    return tiles


def _stable_key(text: str) -> int:
    return zlib.crc32(text.encode())


@functools.lru_cache(maxsize=8)
def _latent_scores(seed: int) -> dict[tuple[str, str], float]:
    """(subtype code, patient id) -> z.

    A subtype's patients sit on evenly spaced quantiles of a normal distribution
    around the subtype mean, in a seed-dependent order, rather than at random
    draws: every seed then has the same few hard patients near zero, and none
    far on the wrong side by bad luck.
    """
    normal = statistics.NormalDist(0.0, _PATIENT_SD)
    scores = {}
    for code, ids in _roster():
        order = np.random.default_rng([seed, _stable_key(code)]).permutation(len(ids))
        for pid, rank in zip(ids, order, strict=True):
            z = _FLAVOURS[code].z_mean + normal.inv_cdf((rank + 0.5) / len(ids))
            scores[(code, pid)] = float(z)
    return scores


def _patient_look(code: str, patient_id: str, seed: int) -> _Look:
    """The look of one patient's slide; stain and nuisances depend on the patient id only."""
    scores = _latent_scores(seed)
    if (code, patient_id) not in scores:
        raise ValueError(
            f"patient {patient_id} is not a {code} patient of the generated roster; "
            f"accepted: {', '.join(patient_roster().get(code, ()))}"
        )
    z = scores[(code, patient_id)]
    rng = np.random.default_rng([seed, _stable_key(patient_id)])
    h_vec = np.abs(_H_VEC + rng.normal(0.0, 0.06, 3))
    e_vec = np.abs(_E_VEC + rng.normal(0.0, 0.05, 3))
    return _Look(
        z=z,
        h_vec=tuple(float(v) for v in h_vec / np.linalg.norm(h_vec)),
        e_vec=tuple(float(v) for v in e_vec / np.linalg.norm(e_vec)),
        h_gain=float(rng.lognormal(0.0, 0.15)),
        e_gain=float(rng.lognormal(0.0, 0.2)),
        background_od=float(rng.uniform(0.02, 0.08)),
        lymphocytes=float(rng.lognormal(np.log(0.15), 1.0)),
    )


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Noise in [0, 1] with features about ``cell`` pixels wide (bicubic-upsampled grid)."""
    gh = max(2, int(math.ceil(height / cell)) + 1)
    gw = max(2, int(math.ceil(width / cell)) + 1)
    grid = rng.random((gh, gw), dtype=np.float32)
    image = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image), 0.0, 1.0)


def _stamp(
    shape: tuple[int, int],
    nuclei: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Sum of soft, irregular ellipses drawn into an (h, w) float32 map.

    ``nuclei`` holds equal-length arrays: x, y (centre, pixels), a, b (semi-axes,
    pixels), theta (radians), harm (K, 6: cos/sin weights of harmonics 2..4 of
    the outline), value (peak), vesicular (0..1: how much paler the centre is),
    chromatin (0..1: grain amplitude). Sprites of similar size are drawn in one
    vectorised batch; there is no loop over pixels or over nuclei.
    """
    height, width = shape
    if len(nuclei["x"]) == 0:
        return np.zeros(shape, np.float32)
    reach = nuclei["a"] * (1.0 + np.abs(nuclei["harm"]).sum(axis=1)) + 1.0
    # Round sprite half-sizes up to a few sizes so each batch is one array.
    half = np.ceil(1.25 ** np.ceil(np.log(np.maximum(reach, 1.0)) / np.log(1.25))).astype(int)
    x, y = nuclei["x"], nuclei["y"]
    seen = (x > -half) & (x < width + half) & (y > -half) & (y < height + half)
    # Nuclei narrower than a pixel (small images, low magnification) have no shape to
    # draw: their ink is spread bilinearly over the four nearest pixels instead.
    tiny = seen & (nuclei["a"] < 0.8)
    sprites = seen & ~tiny
    # Draw on a canvas padded so that no pixel needs a bounds check.
    pad = 2 * int(half[sprites].max(initial=1)) + 2
    padded_width = width + 2 * pad
    flat = np.zeros((height + 2 * pad) * padded_width, np.float64)
    if tiny.any():
        idx = np.flatnonzero(tiny)
        ink = np.pi * nuclei["a"][idx] * nuclei["b"][idx] * nuclei["value"][idx]
        x0, y0 = np.floor(x[idx]), np.floor(y[idx])
        wx, wy = x[idx] - x0, y[idx] - y0
        corner = (y0.astype(np.int64) + pad) * padded_width + x0.astype(np.int64) + pad
        for shift, weight in (
            (0, (1 - wx) * (1 - wy)),
            (1, wx * (1 - wy)),
            (padded_width, (1 - wx) * wy),
            (padded_width + 1, wx * wy),
        ):
            flat += np.bincount(corner + shift, weights=ink * weight, minlength=flat.size)
    for size in np.unique(half[sprites]):
        members = np.flatnonzero(sprites & (half == size))
        side = 2 * int(size) + 1
        batch = max(1, _STAMP_BUDGET // (side * side))
        offsets = np.arange(-size, size + 1)
        for start in range(0, len(members), batch):
            idx = members[start : start + batch]
            _stamp_batch(flat, nuclei, idx, offsets, padded_width, pad, rng)
    canvas = flat.reshape(height + 2 * pad, padded_width)[pad : pad + height, pad : pad + width]
    return canvas.astype(np.float32)


def _stamp_batch(
    flat: np.ndarray,
    nuclei: dict[str, np.ndarray],
    idx: np.ndarray,
    offsets: np.ndarray,
    padded_width: int,
    pad: int,
    rng: np.random.Generator,
) -> None:
    def col(name: str) -> np.ndarray:
        return nuclei[name][idx].astype(np.float32)[:, None, None]

    x, y = nuclei["x"][idx], nuclei["y"][idx]
    ix, iy = np.floor(x), np.floor(y)
    off = offsets.astype(np.float32)
    fx = (x - ix).astype(np.float32)[:, None, None]
    fy = (y - iy).astype(np.float32)[:, None, None]
    theta = col("theta")
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = col("a"), col("b")
    dx = off[None, None, :] - fx
    dy = off[None, :, None] - fy
    u = dx * (cos / a) + dy * (sin / a)
    v = dy * (cos / b) - dx * (sin / b)
    rho2 = u * u
    rho2 += v * v
    rho2 += np.float32(1e-6)
    harm = nuclei["harm"][idx].astype(np.float32)[:, :, None, None]
    c2 = u * u - v * v
    c2 /= rho2
    s2 = u * v
    s2 *= 2.0 / rho2
    outline = harm[:, 0] * c2
    outline += harm[:, 1] * s2
    outline += 1.0
    rho = np.sqrt(rho2)
    # Outline detail, chromatin grain and pale centres are invisible in sprites a few
    # pixels wide (40X, 100X), so only larger ones pay for them.
    detailed = len(offsets) >= 11
    if detailed:
        c1, s1 = u / rho, v / rho
        c3, s3 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
        c4, s4 = c2 * c2 - s2 * s2, 2.0 * c2 * s2
        outline += harm[:, 2] * c3 + harm[:, 3] * s3 + harm[:, 4] * c4 + harm[:, 5] * s4
    np.maximum(outline, 0.3, out=outline)
    # (outline - rho) * b is roughly the distance to the edge in pixels: a ~1 px soft edge.
    value = outline - rho
    value *= b
    np.tanh(value, out=value)
    value += 1.0
    value *= 0.5
    # A soft edge adds more ink than it removes when the nucleus is only a pixel or two
    # wide; scale such sprites back to the ink of the ideal shape so that a small image
    # holds as much haematoxylin as a large one of the same field.
    area = np.pi * a * b * (1.0 + 0.5 * (harm[:, :, 0, 0] ** 2).sum(axis=1))[:, None, None]
    value *= np.minimum(1.0, area / value.sum(axis=(1, 2), keepdims=True))
    value *= col("value")
    if detailed:
        depth = np.minimum(rho / outline, 1.0)
        value *= 1.0 - col("vesicular") * (1.0 - depth * depth)
        value *= 1.0 + col("chromatin") * (rng.random(value.shape, dtype=np.float32) - 0.5)
    corner = (iy.astype(np.int64) + pad) * padded_width + ix.astype(np.int64) + pad
    shift = offsets[:, None] * padded_width + offsets[None, :]
    where = corner[:, None, None] + shift[None, :, :]
    flat += np.bincount(where.ravel(), weights=value.ravel(), minlength=flat.size)


class _Nuclei:
    """Collects nucleus (or lumen) parameters from the layout code for _stamp."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def add(
        self,
        rng: np.random.Generator,
        x: np.ndarray,
        y: np.ndarray,
        *,
        radius: np.ndarray,
        aspect: float | np.ndarray,
        theta: float | np.ndarray,
        irregular: float,
        value: float | np.ndarray,
        vesicular: float = 0.0,
        chromatin: float = 0.0,
    ) -> None:
        n = len(x)
        if n == 0:
            return

        def full(v: float | np.ndarray) -> np.ndarray:
            return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))

        aspect = full(aspect)
        self.parts.append(
            {
                "x": full(x),
                "y": full(y),
                "a": full(radius) * np.sqrt(aspect),
                "b": full(radius) / np.sqrt(aspect),
                "theta": full(theta),
                "harm": rng.normal(0.0, irregular, (n, 6)) * np.array([1, 1, 0.6, 0.6, 0.35, 0.35]),
                "value": full(value),
                "vesicular": full(vesicular),
                "chromatin": full(chromatin),
            }
        )

    def merged(self) -> dict[str, np.ndarray]:
        if not self.parts:
            return {"x": np.zeros(0)}
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


@dataclass(frozen=True)
class _Morph:
    """What one image looks like, all derived from its z. Lengths in 40X pixels."""

    f: float  # image pixels per pixel of a 700x460 image at 40X
    pos: float  # max(z + 1, 0): 0 for clearly benign-looking, ~2 for clearly malignant
    r_mean: float  # nucleus radius
    r_cv: float  # spread of nucleus sizes (lognormal sigma)
    irregular: float  # outline irregularity
    darkness: float  # haematoxylin per nucleus
    crowd: float  # nuclear area fraction inside epithelium
    epithelium: float  # fraction of the field covered by epithelial units
    vesicular: float
    chromatin: float
    arch_p: tuple[float, float, float]  # chance of ring, sheet, cord per unit


def _morph(z: float, flavour: _Flavour, look: _Look, pixel_scale: float) -> _Morph:
    pos = max(z + 1.0, 0.0)
    logits = np.array(flavour.arch) + np.array([-1.3 * z, 1.3 * z, 0.0])
    arch_p = np.exp(logits - logits.max())
    arch_p /= arch_p.sum()
    return _Morph(
        f=pixel_scale,
        pos=pos,
        r_mean=1.9 * math.exp(0.28 * z),
        r_cv=0.07 + 0.07 * pos,
        irregular=0.03 + 0.05 * pos,
        darkness=1.25 * math.exp(0.25 * z) * look.h_gain,
        crowd=float(np.clip(0.42 + 0.15 * z, 0.2, 0.8)),
        epithelium=float(np.clip(0.4 + 0.18 * z, 0.12, 0.8)),
        vesicular=float(np.clip(0.1 + 0.12 * pos, 0.0, 0.45)),
        chromatin=float(np.clip(0.15 + 0.2 * pos, 0.0, 0.7)),
        arch_p=(float(arch_p[0]), float(arch_p[1]), float(arch_p[2])),
    )


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows with ``counts`` items each: (row of every item, index within its row)."""
    row = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    return row, within


def _epithelial(
    rng: np.random.Generator,
    m: _Morph,
    nuclei: _Nuclei,
    x: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
) -> None:
    n = len(x)
    nuclei.add(
        rng,
        x * m.f,
        y * m.f,
        radius=m.r_mean * m.f * rng.lognormal(0.0, m.r_cv, n),
        aspect=rng.uniform(1.0, 1.35, n),
        theta=theta,
        irregular=m.irregular,
        value=m.darkness * rng.lognormal(0.0, 0.1 + 0.05 * m.pos, n),
        vesicular=m.vesicular,
        chromatin=m.chromatin,
    )


def _rotate(cx, cy, ex, ey, rot) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(rot), np.sin(rot)
    return cx + ex * c - ey * s, cy + ex * s + ey * c


def _rings(rng, m: _Morph, u: dict[str, np.ndarray], nuclei: _Nuclei, lumens: _Nuclei) -> None:
    """Gland-like units: layers of nuclei around a white lumen, flat cells outside."""
    cx, cy, radius, aspect, rot, layers = (
        u[k] for k in ("cx", "cy", "lumen", "aspect", "rot", "layers")
    )
    unit, layer = _ragged(layers)
    ring = radius[unit] + m.r_mean * (1.1 + 2.1 * layer)
    perimeter = 2 * np.pi * ring * np.sqrt((1 + aspect[unit] ** 2) / 2)
    count = np.maximum(5, (perimeter / (2.3 * m.r_mean) * math.sqrt(m.crowd / 0.42)).astype(int))
    row, within = _ragged(count)
    t = 2 * np.pi * within / count[row] + rng.normal(0, 0.04 + 0.06 * m.pos, len(row))
    rr = ring[row] + rng.normal(0, 0.15 + 0.3 * m.pos, len(row)) * m.r_mean
    k = unit[row]
    x, y = _rotate(cx[k], cy[k], rr * aspect[k] * np.cos(t), rr * np.sin(t), rot[k])
    _epithelial(rng, m, nuclei, x, y, np.arctan2(y - cy[k], x - cx[k]))
    # Myoepithelial layer: flat nuclei hugging benign-looking glands.
    has = rng.random(len(cx)) < 0.6 / (1.0 + m.pos)
    outer = radius + m.r_mean * (2.2 + 2.1 * (layers - 1)) + 1.2
    count = np.where(has, np.maximum(3, 2 * np.pi * outer * aspect / (5.0 * m.r_mean)), 0)
    k, _ = _ragged(count.astype(int))
    t = rng.uniform(0, 2 * np.pi, len(k))
    x, y = _rotate(cx[k], cy[k], outer[k] * aspect[k] * np.cos(t), outer[k] * np.sin(t), rot[k])
    nuclei.add(
        rng,
        x * m.f,
        y * m.f,
        radius=0.8 * m.r_mean * m.f,
        aspect=3.0,
        theta=np.arctan2(y - cy[k], x - cx[k]) + np.pi / 2,
        irregular=0.02,
        value=m.darkness * rng.lognormal(0.0, 0.1, len(k)),
        chromatin=0.1,
    )
    lumens.add(
        rng,
        cx * m.f,
        cy * m.f,
        radius=radius * m.f,
        aspect=aspect,
        theta=rot,
        irregular=0.05 + 0.05 * m.pos,
        value=1.0,
    )


def _sheets(
    rng, m: _Morph, u: dict[str, np.ndarray], nuclei: _Nuclei, lumens: _Nuclei, cribriform: bool
) -> None:
    """Solid sheets of crowded nuclei with lobulated edges."""
    cx, cy, radius, lobes = u["cx"], u["cy"], u["sheet"], u["lobes"]
    count = (m.crowd * radius**2 / m.r_mean**2).astype(int)
    k, _ = _ragged(count)
    t = rng.uniform(0, 2 * np.pi, len(k))
    edge = 1 + lobes[k, 0] * np.cos(2 * t) + lobes[k, 1] * np.sin(2 * t)
    edge += lobes[k, 2] * np.cos(3 * t) + lobes[k, 3] * np.sin(3 * t)
    rr = radius[k] * np.sqrt(rng.random(len(k))) * edge
    x, y = cx[k] + rr * np.cos(t), cy[k] + rr * np.sin(t)
    _epithelial(rng, m, nuclei, x, y, rng.uniform(0, np.pi, len(k)))
    if cribriform:  # a few punched-out lumens, as in cribriform ductal carcinoma
        k, _ = _ragged(rng.poisson(1.0, len(cx)))
        t = rng.uniform(0, 2 * np.pi, len(k))
        rr = 0.6 * radius[k] * np.sqrt(rng.random(len(k)))
        lumens.add(
            rng,
            (cx[k] + rr * np.cos(t)) * m.f,
            (cy[k] + rr * np.sin(t)) * m.f,
            radius=rng.uniform(1.5, 3.5, len(k)) * m.f,
            aspect=1.2,
            theta=rng.uniform(0, np.pi, len(k)),
            irregular=0.1,
            value=1.0,
        )


def _cords(rng, m: _Morph, u: dict[str, np.ndarray], nuclei: _Nuclei) -> None:
    """Parallel single-file lines of nuclei (the lobular pattern)."""
    cx, cy, length, angle, lanes = (u[k] for k in ("cx", "cy", "length", "angle", "lanes"))
    unit, lane = _ragged(lanes)
    count = np.maximum(3, length[unit] / (2.3 * m.r_mean)).astype(int)
    freq = rng.uniform(0.5, 2.0, len(unit))
    row, within = _ragged(count)
    k = unit[row]
    s = length[k] * (within / np.maximum(count[row] - 1, 1) - 0.5)
    bend = 2.0 * np.sin(s / length[k] * np.pi * freq[row])
    off = (lane[row] - (lanes[k] - 1) / 2) * 4.0 * m.r_mean + bend
    off += rng.normal(0, 0.25 * m.r_mean, len(row))
    x, y = _rotate(cx[k], cy[k], s, off, angle[k])
    _epithelial(rng, m, nuclei, x, y, angle[k])


def _units(rng: np.random.Generator, m: _Morph, flavour: _Flavour, wp: float, hp: float):
    """Epithelial units (kind and size) drawn until they cover ``m.epithelium`` of the field."""
    margin = 6.0
    target = m.epithelium * wp * hp
    drawn: list[dict[str, np.ndarray]] = []
    covered = 0.0
    while covered < target:
        n = 64
        u = {
            "kind": rng.choice(3, size=n, p=m.arch_p),
            "cx": rng.uniform(-margin, wp + margin, n),
            "cy": rng.uniform(-margin, hp + margin, n),
            "lumen": rng.uniform(*flavour.lumen, n),
            "aspect": rng.uniform(*flavour.aspect, n),
            "rot": rng.uniform(0, np.pi, n),
            "layers": 1 + rng.poisson(0.8 * m.pos, n),  # stratified when z is high
            "sheet": rng.uniform(8.0, 30.0, n),
            "lobes": rng.normal(0, 0.15, (n, 4)),
            "length": rng.uniform(15.0, 45.0, n),
            "angle": rng.uniform(0, np.pi, n),
            "lanes": rng.integers(2, 5, n),
        }
        outer = u["lumen"] + m.r_mean * (2.2 + 2.1 * (u["layers"] - 1))
        area = np.select(
            [u["kind"] == 0, u["kind"] == 1],
            [np.pi * outer**2 * u["aspect"], np.pi * u["sheet"] ** 2],
            u["length"] * u["lanes"] * 4.0 * m.r_mean,
        )
        before = covered + np.cumsum(area) - area
        keep = before < target
        covered += float(area[keep].sum())
        drawn.append({k: v[keep] for k, v in u.items()})
    units = {k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]}
    return [{k: v[units["kind"] == kind] for k, v in units.items()} for kind in range(3)]


def _render(tile: TileName, look: _Look, seed: int, width: int, height: int) -> np.ndarray:
    """One image as an (height, width, 3) uint8 RGB array."""
    rng = np.random.default_rng([seed, _stable_key(tile.file_name)])
    flavour = _FLAVOURS[tile.subtype_code]
    # A smaller image shows the same tissue at a lower resolution (like a resized one).
    resolution = math.sqrt(width * height / (_REFERENCE_SIZE[0] * _REFERENCE_SIZE[1]))
    f = tile.magnification / 40.0 * resolution
    m = _morph(look.z + rng.normal(0.0, _IMAGE_SD), flavour, look, f)
    wp, hp = width / f, height / f  # field size in 40X pixels
    field = wp * hp
    nuclei, lumens = _Nuclei(), _Nuclei()

    rings, sheets, cords = _units(rng, m, flavour, wp, hp)
    _rings(rng, m, rings, nuclei, lumens)
    _sheets(rng, m, sheets, nuclei, lumens, cribriform=tile.subtype_code == "DC")
    _cords(rng, m, cords, nuclei)

    # Stromal fibroblasts: sparse, thin, aligned with the collagen fibres.
    fibre_angle = rng.uniform(0, math.pi)
    n = int(rng.poisson(flavour.stroma_cells * (1.0 - m.epithelium) * field / 1000.0))
    nuclei.add(
        rng,
        rng.uniform(0, wp, n) * f,
        rng.uniform(0, hp, n) * f,
        radius=1.6 * f * rng.lognormal(0, 0.15, n),
        aspect=rng.uniform(3.0, 5.0, n),
        theta=fibre_angle + rng.normal(0, 0.25, n),
        irregular=0.02,
        value=1.1 * m.darkness * rng.lognormal(0.0, 0.1, n),
        chromatin=0.1,
    )
    # Lymphocytes: small, round, very dark; how many is a patient trait, not a class one.
    n = int(rng.poisson(look.lymphocytes * field / 1000.0))
    nuclei.add(
        rng,
        rng.uniform(0, wp, n) * f,
        rng.uniform(0, hp, n) * f,
        radius=1.15 * f * rng.lognormal(0, 0.08, n),
        aspect=1.05,
        theta=rng.uniform(0, math.pi, n),
        irregular=0.02,
        value=1.5 * m.darkness,
        chromatin=0.05,
    )

    shape = (height, width)
    hema = _stamp(shape, nuclei.merged(), rng)
    hema = 2.4 * (1.0 - np.exp(-hema / 2.4))  # overlapping nuclei saturate, never blow up
    lumen = np.clip(_stamp(shape, lumens.merged(), rng), 0.0, 1.0)

    # Cytoplasm around epithelial nuclei: a blurred copy of the nuclei, pale lilac.
    blur = max(1.0, 6.0 * resolution)
    small = Image.fromarray(hema, mode="F").resize(
        (max(1, round(width / blur)), max(1, round(height / blur))), Image.Resampling.BOX
    )
    cyto = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    cyto = np.clip(cyto / max(float(cyto.max()), 1e-6) * 1.6, 0.0, 1.0)

    # Eosin stroma: patchy density plus wavy collagen bundles along one direction.
    yy = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.cos(fibre_angle) / f)
    xx = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.sin(fibre_angle) / f)
    warp = _smooth_noise(rng, height, width, 25.0 * f)
    period = rng.uniform(5.0, 9.0)
    fibres = 0.5 + 0.5 * np.sin(2 * math.pi * (yy - xx) / period + 8.0 * warp)
    # Fibres thinner than ~3 pixels would alias into noise: fade them into their mean.
    visible = float(np.clip((period * f - 2.0) / 3.0, 0.0, 1.0))
    fibres = visible * fibres + (1.0 - visible) * 0.5
    fibres *= _smooth_noise(rng, height, width, 12.0 * f)
    patch = _smooth_noise(rng, height, width, 40.0 * f)
    eosin = look.e_gain * (0.4 + 0.3 * patch + 0.35 * fibres**2)
    eosin = eosin * (1.0 - 0.45 * cyto) + 0.12 * cyto
    hema = hema + 0.1 * cyto

    # Mucin pools (mucinous carcinoma): pale blue-grey lakes.
    if flavour.mucin > 0:
        pools = _smooth_noise(rng, height, width, 60.0 * f)
        mucin = np.clip((pools - (1.0 - flavour.mucin)) * 8.0, 0.0, 1.0)
        hema = hema * (1.0 - mucin * 0.7) + 0.12 * mucin
        eosin = eosin * (1.0 - 0.85 * mucin) + 0.03 * mucin

    # White space: tears and fat at random, plus the lumens drawn above.
    holes = _smooth_noise(rng, height, width, 50.0 * f)
    holes += 0.15 * _smooth_noise(rng, height, width, 6.0 * f)
    white = np.maximum(np.clip((holes - 0.95) * 10.0, 0.0, 1.0), lumen)
    hema *= 1.0 - 0.95 * white
    eosin *= 1.0 - 0.93 * white

    # Beer-Lambert: each channel transmits exp(-optical density); plus a little sensor noise.
    rgb = np.empty((height, width, 3), np.uint8)
    grain = rng.random((3, height, width), dtype=np.float32)
    for c in range(3):
        od = hema * np.float32(look.h_vec[c]) + eosin * np.float32(look.e_vec[c])
        od += np.float32(look.background_od)
        channel = np.exp(-od)
        channel *= np.float32(255.0)
        channel += (grain[c] - np.float32(0.5)) * np.float32(5.0)
        rgb[..., c] = np.clip(channel, 0.0, 255.0)
    return rgb


def render_tile(
    tile: TileName, *, seed: int = 0, width: int = 700, height: int = 460
) -> np.ndarray:
    """The pixels synthesize() writes for ``tile``: an (height, width, 3) uint8 RGB array.

    Raises ValueError for a size outside 16..4096 or a patient that is not in
    patient_roster() under the tile's subtype.
    """
    _check_size(width, height)
    look = _patient_look(tile.subtype_code, tile.patient_id, seed)
    return _render(tile, look, seed, width, height)


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not (
            isinstance(value, int) and _MIN_SIDE <= value <= _MAX_SIDE
        ):
            raise ValueError(f"{name}={value!r}: expected an integer in {_MIN_SIDE}..{_MAX_SIDE}")


def _encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(
        buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def _write_one(task: _Task) -> int:
    data = _encode_png(_render(task.tile, task.look, task.seed, task.width, task.height))
    storage.write_bytes(task.uri, data)
    return len(data)


# --------------------------------------------------------------------------- public entry points


def synthesize(
    out_uri: str,
    *,
    scale: float = 0.05,
    seed: int = 0,
    width: int = 700,
    height: int = 460,
    workers: int | None = None,
) -> SynthSummary:
    """Write a generated BreakHis-shaped data set under ``out_uri`` (local folder or s3://).

    Files land at ``out_uri/BreaKHis_v1/histology_slides/breast/...`` with the
    official names; existing files of the same name are overwritten. The same
    (scale, seed, width, height) always gives byte-identical files. ``workers``
    processes render in parallel (default min(4, CPU count); 1 renders in this
    process).

    Returns a SynthSummary. Raises ValueError for a scale outside (0, 10], a
    side outside 16..4096 or workers < 1; storage errors (e.g. a missing
    bucket) propagate from breakhis.storage.
    """
    _check_scale(scale)
    _check_size(width, height)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers={workers!r}: expected an integer >= 1")
    started = time.perf_counter()
    tiles = plan_tiles(scale)
    looks = {
        (t.subtype_code, t.patient_id): _patient_look(t.subtype_code, t.patient_id, seed)
        for t in tiles
    }
    tasks = [
        _Task(
            tile=t,
            look=looks[(t.subtype_code, t.patient_id)],
            seed=seed,
            width=width,
            height=height,
            uri=storage.join(out_uri, official_relative_path(t)),
        )
        for t in tiles
    ]
    logger.info(
        "writing %d synthetic images (%dx%d, scale %s, seed %d) to %s with %d worker(s)",
        len(tasks),
        width,
        height,
        scale,
        seed,
        out_uri,
        workers,
    )
    progress = tqdm(total=len(tasks), desc="synth", unit="img", disable=None)
    with progress:
        if workers == 1:
            for task in tasks:
                _write_one(task)
                progress.update()
        else:
            # spawn, not fork: the caller may hold threads (Ray, pyarrow) that fork would copy.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                chunk = max(1, min(16, len(tasks) // (4 * workers)))
                for _ in pool.map(_write_one, tasks, chunksize=chunk):
                    progress.update()
    summary = SynthSummary(
        out_uri=out_uri,
        images=len(tiles),
        patients=len({t.patient_id for t in tiles}),
        patient_folders=len({(t.subtype_code, t.patient_id) for t in tiles}),
        per_class=dict(Counter(t.class_name for t in tiles)),
        per_subtype=dict(Counter(t.subtype for t in tiles)),
        per_magnification=dict(Counter(t.magnification for t in tiles)),
        per_subtype_magnification={
            name: dict(Counter(t.magnification for t in tiles if t.subtype == name))
            for name in sorted({t.subtype for t in tiles})
        },
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "wrote %d images of %d patients in %.1f s",
        summary.images,
        summary.patients,
        summary.seconds,
    )
    return summary


def corrupt_files(out_uri: str, seed: int = 0) -> dict[str, str]:
    """Add four deliberately broken files under ``out_uri`` (a test and demo aid only).

    Written into real-looking patient folders of the official layout, with
    sequence numbers from 901 up so they never replace a generated image:

    - a PNG cut in half (valid name; the header still opens, decoding fails);
    - a zero-byte file with a valid name;
    - a text file with a valid ``.png`` name;
    - a real PNG whose name does not parse (``40X`` in the magnification field).

    Returns {uri: expected rejects stage}: ``"decode"`` for the first three,
    ``"parse"`` for the last (the stages of the rejects table in the design
    contract). Raises what breakhis.storage raises on a failed write.
    """
    rng = np.random.default_rng([seed, _stable_key("corrupt")])
    roster = patient_roster()
    codes = sorted(SUBTYPES)
    picks = []
    for k in range(4):
        code = codes[int(rng.integers(len(codes)))]
        pid = roster[code][0]
        mag = MAGNIFICATIONS[int(rng.integers(len(MAGNIFICATIONS)))]
        picks.append(
            parse_name(
                format_name(subtype_code=code, patient_id=pid, magnification=mag, sequence=901 + k)
            )
        )
    good_png = _encode_png(render_tile(picks[0], seed=seed, width=64, height=48))
    contents = [good_png[: len(good_png) // 2], b"", b"this is not an image\n"]
    expected: dict[str, str] = {}
    for tile, data in zip(picks[:3], contents, strict=True):
        uri = storage.join(out_uri, official_relative_path(tile))
        storage.write_bytes(uri, data)
        expected[uri] = "decode"
    bad = picks[3]
    folder = official_relative_path(bad).rsplit("/", 1)[0]
    bad_name = bad.file_name.replace(f"-{bad.magnification}-", f"-{bad.magnification}X-")
    uri = storage.join(out_uri, folder, bad_name)
    storage.write_bytes(uri, good_png)
    expected[uri] = "parse"
    logger.info("added %d deliberately broken files under %s", len(expected), out_uri)
    return expected
