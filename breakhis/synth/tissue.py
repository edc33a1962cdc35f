"""The tissue of a generated image (see breakhis.synth.dataset for what it is and is not): the
per-subtype flavours, a patient's look, the morphology a latent score ``z`` gives, and
the structures drawn from it (rings of nuclei around lumens, solid sheets, cords,
stromal cells) as soft, irregular ellipses stamped into optical-density maps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

_STAMP_BUDGET = 2_000_000  # sprite pixels per vectorised batch (bounds memory to ~50 MB)


@dataclass(frozen=True)
class Flavour:
    """Per-subtype look; only ``z_mean`` is tied to the class."""

    z_mean: float
    arch: tuple[float, float, float]  # log-weights of ring, sheet, cord before z shifts them
    lumen: tuple[float, float]  # lumen radius range, 40X pixels
    aspect: tuple[float, float]  # lumen elongation range
    stroma_cells: float  # stromal nuclei per 1000 40X-pixel^2 of stroma
    mucin: float  # fraction of the field under mucin pools


_NO_CORD = -9.0
FLAVOURS: dict[str, Flavour] = {
    "A": Flavour(-1.1, (1.2, -0.5, _NO_CORD), (4.0, 8.0), (1.0, 1.6), 0.5, 0.0),
    "F": Flavour(-1.1, (1.0, -0.5, _NO_CORD), (4.0, 10.0), (1.8, 4.0), 0.8, 0.0),
    "PT": Flavour(-0.7, (0.8, -0.2, _NO_CORD), (5.0, 12.0), (1.5, 3.5), 2.2, 0.0),
    "TA": Flavour(-1.0, (1.4, -0.8, _NO_CORD), (3.0, 6.0), (1.0, 1.4), 0.4, 0.0),
    "DC": Flavour(1.1, (-0.2, 0.5, _NO_CORD), (4.0, 9.0), (1.0, 1.8), 0.5, 0.0),
    "LC": Flavour(0.7, (-1.0, 0.0, 1.2), (4.0, 8.0), (1.0, 1.5), 0.6, 0.0),
    "MC": Flavour(0.8, (-0.8, 0.6, _NO_CORD), (4.0, 8.0), (1.0, 1.6), 0.3, 0.4),
    "PC": Flavour(0.9, (0.6, 0.2, _NO_CORD), (5.0, 11.0), (1.2, 2.5), 0.5, 0.0),
}


@dataclass(frozen=True)
class Look:
    """How one patient's slide looks; fixed for all their images."""

    z: float
    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_gain: float
    e_gain: float
    background_od: float
    lymphocytes: float  # per 1000 40X-pixel^2


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Noise in [0, 1] with features about ``cell`` pixels wide (bicubic-upsampled grid)."""
    gh = max(2, int(math.ceil(height / cell)) + 1)
    gw = max(2, int(math.ceil(width / cell)) + 1)
    grid = rng.random((gh, gw), dtype=np.float32)
    image = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image), 0.0, 1.0)


def stamp(
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
    # Over 60 lines: one vectorised kernel (sprite grid, outline harmonics, chromatin,
    # scatter-add) whose steps share the batch's arrays; split, each would take them all.
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


class Nuclei:
    """Collects nucleus (or lumen) parameters from the layout code for stamp."""

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
class Morph:
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


def morph(z: float, flavour: Flavour, look: Look, pixel_scale: float) -> Morph:
    pos = max(z + 1.0, 0.0)
    logits = np.array(flavour.arch) + np.array([-1.3 * z, 1.3 * z, 0.0])
    arch_p = np.exp(logits - logits.max())
    arch_p /= arch_p.sum()
    return Morph(
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
    m: Morph,
    nuclei: Nuclei,
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


def draw_rings(rng, m: Morph, u: dict[str, np.ndarray], nuclei: Nuclei, lumens: Nuclei) -> None:
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


def draw_sheets(
    rng, m: Morph, u: dict[str, np.ndarray], nuclei: Nuclei, lumens: Nuclei, cribriform: bool
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


def draw_cords(rng, m: Morph, u: dict[str, np.ndarray], nuclei: Nuclei) -> None:
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


def place_units(rng: np.random.Generator, m: Morph, flavour: Flavour, wp: float, hp: float):
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
