"""The pixels of a generated image: each patient's look (latent score, stain,
nuisances), and the image drawn from it by Beer-Lambert over haematoxylin and eosin
optical densities (see breakhis.synth.dataset for the class signal)."""

from __future__ import annotations

import functools
import io
import math
import statistics
import zlib

import numpy as np
from PIL import Image

from breakhis.names import TileName
from breakhis.synth.plan import patient_roster, roster_items
from breakhis.synth.tissue import (
    FLAVOURS,
    Look,
    Morph,
    Nuclei,
    draw_cords,
    draw_rings,
    draw_sheets,
    morph,
    place_units,
    smooth_noise,
    stamp,
)

_MIN_SIDE, _MAX_SIDE = 16, 4096
_REFERENCE_SIZE = (700, 460)  # the real images' size; other sizes are resized views
_PATIENT_SD = 0.5
_IMAGE_SD = 0.25
_PNG_COMPRESS_LEVEL = 1  # 3.5x faster than PIL's default 6 for ~13% larger files

# Optical density per unit of stain: Ruifrok & Johnston's haematoxylin; eosin with more
# blue absorption than theirs, which reads as pink rather than magenta on screen.
_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.09, 0.92, 0.36])


def stable_key(text: str) -> int:
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
    for code, ids in roster_items():
        order = np.random.default_rng([seed, stable_key(code)]).permutation(len(ids))
        for pid, rank in zip(ids, order, strict=True):
            z = FLAVOURS[code].z_mean + normal.inv_cdf((rank + 0.5) / len(ids))
            scores[(code, pid)] = float(z)
    return scores


def patient_look(code: str, patient_id: str, seed: int) -> Look:
    """The look of one patient's slide; stain and nuisances depend on the patient id only."""
    scores = _latent_scores(seed)
    if (code, patient_id) not in scores:
        raise ValueError(
            f"patient {patient_id} is not a {code} patient of the generated roster; "
            f"accepted: {', '.join(patient_roster().get(code, ()))}"
        )
    z = scores[(code, patient_id)]
    rng = np.random.default_rng([seed, stable_key(patient_id)])
    h_vec = np.abs(_H_VEC + rng.normal(0.0, 0.06, 3))
    e_vec = np.abs(_E_VEC + rng.normal(0.0, 0.05, 3))
    return Look(
        z=z,
        h_vec=tuple(float(v) for v in h_vec / np.linalg.norm(h_vec)),
        e_vec=tuple(float(v) for v in e_vec / np.linalg.norm(e_vec)),
        h_gain=float(rng.lognormal(0.0, 0.15)),
        e_gain=float(rng.lognormal(0.0, 0.2)),
        background_od=float(rng.uniform(0.02, 0.08)),
        lymphocytes=float(rng.lognormal(np.log(0.15), 1.0)),
    )


def render(tile: TileName, look: Look, seed: int, width: int, height: int) -> np.ndarray:
    """One image as an (height, width, 3) uint8 RGB array."""
    rng = np.random.default_rng([seed, stable_key(tile.file_name)])
    flavour = FLAVOURS[tile.subtype_code]
    # A smaller image shows the same tissue at a lower resolution (like a resized one).
    resolution = math.sqrt(width * height / (_REFERENCE_SIZE[0] * _REFERENCE_SIZE[1]))
    f = tile.magnification / 40.0 * resolution
    m = morph(look.z + rng.normal(0.0, _IMAGE_SD), flavour, look, f)
    wp, hp = width / f, height / f  # field size in 40X pixels
    nuclei, lumens = Nuclei(), Nuclei()

    rings, sheets, cords = place_units(rng, m, flavour, wp, hp)
    draw_rings(rng, m, rings, nuclei, lumens)
    draw_sheets(rng, m, sheets, nuclei, lumens, cribriform=tile.subtype_code == "DC")
    draw_cords(rng, m, cords, nuclei)

    fibre_angle = _loose_cells(rng, m, look, flavour.stroma_cells, (wp, hp, f), nuclei)

    shape = (height, width)
    hema = stamp(shape, nuclei.merged(), rng)
    hema = 2.4 * (1.0 - np.exp(-hema / 2.4))  # overlapping nuclei saturate, never blow up
    lumen = np.clip(stamp(shape, lumens.merged(), rng), 0.0, 1.0)

    cyto = _cytoplasm(hema, width, height, resolution)

    # Eosin stroma: patchy density plus wavy collagen bundles along one direction.
    yy = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.cos(fibre_angle) / f)
    xx = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.sin(fibre_angle) / f)
    warp = smooth_noise(rng, height, width, 25.0 * f)
    period = rng.uniform(5.0, 9.0)
    fibres = 0.5 + 0.5 * np.sin(2 * math.pi * (yy - xx) / period + 8.0 * warp)
    # Fibres thinner than ~3 pixels would alias into noise: fade them into their mean.
    visible = float(np.clip((period * f - 2.0) / 3.0, 0.0, 1.0))
    fibres = visible * fibres + (1.0 - visible) * 0.5
    fibres *= smooth_noise(rng, height, width, 12.0 * f)
    patch = smooth_noise(rng, height, width, 40.0 * f)
    eosin = look.e_gain * (0.4 + 0.3 * patch + 0.35 * fibres**2)
    eosin = eosin * (1.0 - 0.45 * cyto) + 0.12 * cyto
    hema = hema + 0.1 * cyto

    # Mucin pools (mucinous carcinoma): pale blue-grey lakes.
    if flavour.mucin > 0:
        pools = smooth_noise(rng, height, width, 60.0 * f)
        mucin = np.clip((pools - (1.0 - flavour.mucin)) * 8.0, 0.0, 1.0)
        hema = hema * (1.0 - mucin * 0.7) + 0.12 * mucin
        eosin = eosin * (1.0 - 0.85 * mucin) + 0.03 * mucin

    # White space: tears and fat at random, plus the lumens drawn above.
    holes = smooth_noise(rng, height, width, 50.0 * f)
    holes += 0.15 * smooth_noise(rng, height, width, 6.0 * f)
    white = np.maximum(np.clip((holes - 0.95) * 10.0, 0.0, 1.0), lumen)
    hema *= 1.0 - 0.95 * white
    eosin *= 1.0 - 0.93 * white

    return _beer_lambert(hema, eosin, look, rng)


def _loose_cells(
    rng: np.random.Generator,
    m: Morph,
    look: Look,
    stroma_cells: float,
    geometry: tuple[float, float, float],
    nuclei: Nuclei,
) -> float:
    """Add the stromal fibroblasts and lymphocytes of a field (``geometry``: its width
    and height in 40X pixels, and pixels per 40X pixel) to ``nuclei``. Returns the
    collagen fibres' angle, which the fibroblasts follow."""
    wp, hp, f = geometry
    field = wp * hp
    # Stromal fibroblasts: sparse, thin, aligned with the collagen fibres.
    fibre_angle = rng.uniform(0, math.pi)
    n = int(rng.poisson(stroma_cells * (1.0 - m.epithelium) * field / 1000.0))
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
    return fibre_angle


def _cytoplasm(hema: np.ndarray, width: int, height: int, resolution: float) -> np.ndarray:
    """Cytoplasm around epithelial nuclei: a blurred copy of the nuclei, in [0, 1]."""
    blur = max(1.0, 6.0 * resolution)
    small = Image.fromarray(hema, mode="F").resize(
        (max(1, round(width / blur)), max(1, round(height / blur))), Image.Resampling.BOX
    )
    cyto = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    cyto = np.clip(cyto / max(float(cyto.max()), 1e-6) * 1.6, 0.0, 1.0)
    return cyto


def _beer_lambert(
    hema: np.ndarray, eosin: np.ndarray, look: Look, rng: np.random.Generator
) -> np.ndarray:
    """Each channel transmits exp(-optical density); plus a little sensor noise."""
    height, width = hema.shape
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
    check_size(width, height)
    look = patient_look(tile.subtype_code, tile.patient_id, seed)
    return render(tile, look, seed, width, height)


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not (
            isinstance(value, int) and _MIN_SIDE <= value <= _MAX_SIDE
        ):
            raise ValueError(f"{name}={value!r}: expected an integer in {_MIN_SIDE}..{_MAX_SIDE}")


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(
        buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()
