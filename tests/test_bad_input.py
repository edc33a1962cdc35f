"""Bad input through the console command, as a user types it: one error line on stderr,
exit status 2, before any Ray start (no Ray session folder under RAY_TMPDIR, and in
seconds), and nothing written to the outputs.

Each case is a real file or folder on disk: a missing or damaged model, an empty input,
an output another job owns, a missing or leaking manifest, a bad search space, splits
the manifest lacks, a user-defined split column that is missing or puts a patient on two
sides, a split file naming patients the data lacks, a report folder that is a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_ROOT

from breakhis.data.dest import manifest_hash
from breakhis.data.splits import add_split_columns
from breakhis.model.artifact import ModelCard, save_artifact
from breakhis.model.networks import build_model

# Python with torch imported takes seconds on a busy 2-core machine; a local Ray start
# takes 15-50 s there, and these commands must not get that far.
SECONDS = 60.0
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


@dataclass(frozen=True)
class Place:
    """The files a case is run against (all under one temporary folder)."""

    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _manifest(patients: int = 10) -> pa.Table:
    rows = [
        {
            "tile_id": f"p{p}-{i}",
            "uri": f"/nowhere/p{p}-{i}.png",
            "patient_id": f"p{p}",
            "label": p % 2,
            "magnification": 40,
        }
        for p in range(patients)
        for i in range(2)
    ]
    return add_split_columns(pa.Table.from_pylist(rows), folds=2, repetitions=2)


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Place:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "prepared").mkdir()
    pq.write_table(_manifest(), root / "prepared" / "manifest.parquet")
    leaking = _manifest()
    folds = leaking.column("fold").to_pylist()
    folds[0] = 1 - folds[1]  # p0's two images in different folds: train and test of fold 0
    leaking = leaking.set_column(
        leaking.schema.get_field_index("fold"), "fold", pa.array(folds, pa.int8())
    )
    (root / "leaking").mkdir()
    pq.write_table(leaking, root / "leaking" / "manifest.parquet")
    # A user-defined split column that puts p0's two images on two sides.
    two_sided = _manifest()
    sides = ["test" if p in ("p0", "p1") else "train" for p in two_sided["patient_id"].to_pylist()]
    sides[0] = "train"
    (root / "column").mkdir()
    pq.write_table(
        two_sided.append_column("site", pa.array(sides, pa.string())),
        root / "column" / "manifest.parquet",
    )
    # Hand-made manifests: one without patient_id, one with a patient left null.
    (root / "no-patient").mkdir()
    pq.write_table(_manifest().drop_columns(["patient_id"]), root / "no-patient/manifest.parquet")
    nulled = _manifest()
    patients = nulled.column("patient_id").to_pylist()
    patients[3] = None
    nulled = nulled.set_column(
        nulled.schema.get_field_index("patient_id"), "patient_id", pa.array(patients, pa.string())
    )
    (root / "null-patient").mkdir()
    pq.write_table(nulled, root / "null-patient" / "manifest.parquet")

    # The model records the leaking manifest as its own (a hand-edited one, say), so that
    # evaluation gets as far as the split's own leakage check.
    torch.manual_seed(0)
    card = ModelCard(
        architecture="smallcnn",
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        split="fold:0",
        manifest_hash=manifest_hash(leaking),
    )
    save_artifact(str(root / "model"), build_model("smallcnn").eval(), card)

    shutil.copytree(root / "model", root / "bad-card")
    card_file = root / "bad-card" / "model.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), "image_size": 32.5}))

    shutil.copytree(root / "model", root / "corrupt")
    weights = bytearray((root / "corrupt" / "model.pt").read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # one flipped byte, as a bad copy makes
    (root / "corrupt" / "model.pt").write_bytes(bytes(weights))

    from PIL import Image

    (root / "tiles").mkdir()
    Image.new("RGB", (48, 48), (200, 120, 160)).save(root / "tiles" / "tile.png")
    (root / "breakhis").mkdir()
    shutil.copyfile(
        root / "tiles" / "tile.png", root / "breakhis" / "SOB_B_A-14-22549AB-40-001.png"
    )
    (root / "heldout.txt").write_text("# test patients\n14-22549AB\n14-9999\n")
    (root / "empty").mkdir()
    (root / "tiles-link").symlink_to(root / "tiles")

    (root / "owned").mkdir()
    (root / "owned" / "_job.json").write_text(json.dumps({"format": 1, "model": "/elsewhere"}))
    (root / "a-file").write_text("not a folder\n")
    (root / "bad-space.yaml").write_text("colour: {choice: [red, blue]}\n")
    return Place(root)


@dataclass(frozen=True)
class Case:
    argv: Callable[[Place], list[str]]
    message: str
    """A piece of the error line: what was wrong, and where."""
    outputs: tuple[str, ...] = ()
    """Names under the place that must be left as they were (absent ones stay absent)."""


CASES: dict[str, Case] = {
    "score-missing-model": Case(
        lambda p: ["score", "--model", str(p / "no-model"), "--input", str(p / "tiles"),
                   "--out", str(p / "out-a")],
        "no-model/model.json: no model artifact here", ("out-a",),
    ),
    "score-model-is-a-file": Case(
        lambda p: ["score", "--model", str(p / "model" / "model.pt"), "--input",
                   str(p / "tiles"), "--out", str(p / "out-b")],
        "model.pt: a file, not a model artifact folder", ("out-b",),
    ),
    "score-invalid-model-json": Case(
        lambda p: ["score", "--model", str(p / "bad-card"), "--input", str(p / "tiles"),
                   "--out", str(p / "out-c")],
        "bad-card/model.json: field 'image_size': expected an integer", ("out-c",),
    ),
    "score-corrupt-weights": Case(
        lambda p: ["score", "--model", str(p / "corrupt"), "--input", str(p / "tiles"),
                   "--out", str(p / "out-d")],
        "corrupt/model.pt: weights hash", ("out-d",),
    ),
    "score-empty-input": Case(
        lambda p: ["score", "--model", str(p / "model"), "--input", str(p / "empty"),
                   "--out", str(p / "out-e")],
        "empty: no tiles found; accepted:", ("out-e",),
    ),
    "score-output-owned-by-another-job": Case(
        lambda p: ["score", "--model", str(p / "model"), "--input", str(p / "tiles"),
                   "--out", str(p / "owned")],
        "holds the output of another scoring job", ("owned",),
    ),
    "score-output-is-a-file": Case(
        lambda p: ["score", "--model", str(p / "model"), "--input", str(p / "tiles"),
                   "--out", str(p / "a-file")],
        "a-file is a file; give a folder", ("a-file",),
    ),
    "score-output-below-a-file": Case(
        lambda p: ["score", "--model", str(p / "model"), "--input", str(p / "tiles"),
                   "--out", str(p / "a-file" / "scores")],
        "a-file is a file; give a folder", ("a-file",),
    ),
    "score-output-inside-input-through-a-symlink": Case(
        lambda p: ["score", "--model", str(p / "model"), "--input", str(p / "tiles"),
                   "--out", str(p / "tiles-link" / "scores")],
        "overlap", ("tiles",),
    ),
    "train-manifest-without-patient-id": Case(
        lambda p: ["train", "--data", str(p / "no-patient"), "--storage", str(p / "runs-c"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none", "--fold", "0"],
        "no-patient/manifest.parquet: no 'patient_id' column", ("runs-c",),
    ),
    "train-null-patient-id": Case(
        lambda p: ["train", "--data", str(p / "null-patient"), "--storage", str(p / "runs-d"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none", "--fold", "0"],
        "1 row(s) with a null 'patient_id' (the first is row 3)", ("runs-d",),
    ),
    "evaluate-null-patient-id": Case(
        lambda p: ["evaluate", "--model", str(p / "model"), "--data", str(p / "null-patient"),
                   "--out", str(p / "report-c")],
        "1 row(s) with a null 'patient_id'", ("report-c",),
    ),
    "train-missing-manifest": Case(
        lambda p: ["train", "--data", str(p / "nothing"), "--storage", str(p / "runs-a"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none"],
        "nothing/manifest.parquet: no manifest", ("runs-a",),
    ),
    "train-leaking-manifest": Case(
        lambda p: ["train", "--data", str(p / "leaking"), "--storage", str(p / "runs-b"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none", "--fold", "0"],
        "patient(s) on more than one side of the split: p0", ("runs-b",),
    ),
    "evaluate-missing-manifest": Case(
        lambda p: ["evaluate", "--model", str(p / "model"), "--data", str(p / "nothing"),
                   "--out", str(p / "report-a")],
        "nothing/manifest.parquet: no manifest", ("report-a",),
    ),
    "evaluate-leaking-manifest": Case(
        lambda p: ["evaluate", "--model", str(p / "model"), "--data", str(p / "leaking"),
                   "--out", str(p / "report-b")],
        "patient(s) on more than one side of the split: p0", ("report-b",),
    ),
    "evaluate-out-is-a-file": Case(
        lambda p: ["evaluate", "--model", str(p / "model"), "--data", str(p / "prepared"),
                   "--out", str(p / "a-file")],
        "--out", ("a-file",),
    ),
    "prepare-empty-folder": Case(
        lambda p: ["prepare", str(p / "empty"), str(p / "dest")],
        "empty: no BreakHis images found", ("dest",),
    ),
    "tune-missing-search-space": Case(
        lambda p: ["tune", "--data", str(p / "prepared"), "--storage", str(p / "sweeps-a"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none",
                   "--val-fraction", "0.2", "--search-space", str(p / "no-space.yaml")],
        "no-space.yaml: no such file", ("sweeps-a",),
    ),
    "tune-bad-search-space": Case(
        lambda p: ["tune", "--data", str(p / "prepared"), "--storage", str(p / "sweeps-b"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none",
                   "--val-fraction", "0.2", "--search-space", str(p / "bad-space.yaml")],
        "bad-space.yaml: unknown key 'colour'", ("sweeps-b",),
    ),
    "train-split-column-missing": Case(
        lambda p: ["train", "--data", str(p / "prepared"), "--storage", str(p / "runs-c"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none",
                   "--split", "column:site"],
        "split column:site: the manifest has no column 'site'; its columns: tile_id, uri,",
        ("runs-c",),
    ),
    "train-split-column-patient-on-two-sides": Case(
        lambda p: ["train", "--data", str(p / "column"), "--storage", str(p / "runs-d"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none",
                   "--split", "column:site"],
        "patient p0 has images on train and test in column 'site'", ("runs-d",),
    ),
    "tune-split-column-missing": Case(
        lambda p: ["tune", "--data", str(p / "prepared"), "--storage", str(p / "sweeps-c"),
                   "--name", "x", "--arch", "smallcnn", "--weights", "none",
                   "--val-fraction", "0.2", "--split", "column:site"],
        "split column:site: the manifest has no column 'site'", ("sweeps-c",),
    ),
    "prepare-split-file-unknown-patient": Case(
        lambda p: ["prepare", str(p / "breakhis"), str(p / "dest-b"), "--split-file",
                   f"heldout={p / 'heldout.txt'}"],
        "1 patient id(s) not in the data: 14-9999; the data has 1 patients", ("dest-b",),
    ),
    "protocol-splits-the-manifest-lacks": Case(
        lambda p: ["protocol", "--data", str(p / "prepared"), "--storage", str(p / "proto"),
                   "--name", "x", "--splits", "0,99"],
        "not [99]", ("proto",),
    ),
}  # fmt: skip


def _state(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` with a hash of its bytes (None: nothing there)."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    # Short: Ray's socket paths under it must stay below the 107-byte Unix limit.
    path = Path(tempfile.mkdtemp(prefix="bh-ray-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_before_ray(name: str, place: Place, ray_tmpdir) -> None:
    case = CASES[name]
    before = {out: _state(place / out) for out in case.outputs}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", *case.argv(place)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr[-3000:]
    # Log lines may come first (what the job found); the error itself is one line.
    lines = [line for line in done.stderr.splitlines() if not _LOG_LINE.match(line)]
    command = case.argv(place)[0]
    assert len(lines) == 1 and lines[0].startswith(f"breakhis {command}: error: "), done.stderr
    assert case.message in lines[0], lines[0]
    assert not any(ray_tmpdir.iterdir()), f"Ray started: {sorted(ray_tmpdir.rglob('*'))[:5]}"
    assert seconds < SECONDS, f"{seconds:.1f} s"
    for out, state in before.items():
        assert _state(place / out) == state, f"{out} was written to"
