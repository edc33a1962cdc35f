"""Which images the generated data set has: the table of BREAKHIS.md, the patient
roster (ids that look like the real ones) and the plan of a scale, as TileNames.

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
import math

import numpy as np

from breakhis.names import MAGNIFICATIONS, TileName, format_name, parse_name

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
ROSTER_SEED = 20160701  # fixed: patient ids and image counts must not move with --seed


def patient_roster() -> dict[str, tuple[str, ...]]:
    """Subtype code -> patient ids in keep order (the same for every seed and scale).

    Ids look like the real ones (``YY-NNNNN`` with optional letters, e.g.
    ``14-22549AB``); ``SHARED_PATIENT`` comes first under DC and LC so it is
    kept at every scale.
    """
    return dict(roster_items())


@functools.lru_cache(maxsize=1)
def roster_items() -> tuple[tuple[str, tuple[str, ...]], ...]:
    rng = np.random.default_rng(ROSTER_SEED)
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


def check_scale(scale: float) -> None:
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
    check_scale(scale)
    roster = patient_roster()
    rng = np.random.default_rng(ROSTER_SEED + 1)
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
