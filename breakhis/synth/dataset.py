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

Where each piece lives: breakhis.synth.plan (the table, the patient roster and
which images a scale gives; the layout rules), breakhis.synth.tissue (the
tissue's structures), breakhis.synth.render (a patient's look and an image's pixels);
this module writes them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
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
from breakhis.synth.plan import (
    FULL_ROSTER_SCALE,
    SHARED_PATIENT,
    TABLE,
    check_scale,
    patient_roster,
    plan_tiles,
)
from breakhis.synth.render import (
    Look,
    check_size,
    encode_png,
    patient_look,
    render,
    render_tile,
    stable_key,
)

__all__ = [
    "FULL_ROSTER_SCALE",
    "SHARED_PATIENT",
    "TABLE",
    "SynthSummary",
    "corrupt_files",
    "patient_roster",
    "plan_tiles",
    "render_tile",
    "synthesize",
]

logger = logging.getLogger(__name__)


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
class _Task:
    tile: TileName
    look: Look
    seed: int
    width: int
    height: int
    uri: str


def _write_one(task: _Task) -> int:
    data = encode_png(render(task.tile, task.look, task.seed, task.width, task.height))
    storage.write_bytes(task.uri, data)
    return len(data)


def _write_all(tasks: list[_Task], workers: int) -> None:
    """Render and write every task, in ``workers`` processes (1: in this one)."""
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


def _summary(out_uri: str, tiles: list[TileName], seconds: float) -> SynthSummary:
    return SynthSummary(
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
        seconds=seconds,
    )


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
    check_scale(scale)
    check_size(width, height)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers={workers!r}: expected an integer >= 1")
    started = time.perf_counter()
    tiles = plan_tiles(scale)
    looks = {
        (t.subtype_code, t.patient_id): patient_look(t.subtype_code, t.patient_id, seed)
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
        *(len(tasks), width, height, scale, seed, out_uri, workers),
    )
    _write_all(tasks, workers)
    summary = _summary(out_uri, tiles, time.perf_counter() - started)
    logger.info(
        "wrote %d images of %d patients in %.1f s",
        *(summary.images, summary.patients, summary.seconds),
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
    rng = np.random.default_rng([seed, stable_key("corrupt")])
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
    good_png = encode_png(render_tile(picks[0], seed=seed, width=64, height=48))
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
