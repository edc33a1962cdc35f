"""The accuracy benchmark's parts that need no Ray: the reference loop's geometry and
determinism, the run store a rerun resumes from, the paired statistics and the options'
errors. The benchmark end to end (Ray, the job) is in test_benchmarks.py."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from breakhis.benchmarks.accuracy import AccuracyBenchmarkConfig, job_config, job_key, reference_key
from breakhis.benchmarks.accuracy_result import (
    REFERENCE,
    AccuracyBenchmarkResult,
    DataInfo,
    SideResult,
    paired_summary,
)
from breakhis.benchmarks.reference_loop import (
    ReferenceOptions,
    centre_crop,
    class_weights,
    decode_tile,
    images_per_epoch,
    reference_probs,
    run_reference,
    train_crop,
)
from breakhis.benchmarks.run_store import RunKey, RunStore

TINY = ReferenceOptions(arch="smallcnn", image_size=32, epochs=1, batch_size=8, lr=1e-3, seed=0)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiles(
    n: int, width: int = 48, height: int = 32, seed: int = 0
) -> tuple[list[bytes], list[int]]:
    """``n`` noise PNGs, the malignant ones (every other) redder."""
    rng = np.random.default_rng(seed)
    pngs, labels = [], []
    for i in range(n):
        pixels = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
        pixels[..., 0] += 55 * (i % 2)
        pngs.append(_png(pixels))
        labels.append(i % 2)
    return pngs, labels


# --- geometry ------------------------------------------------------------------------------


def test_decode_keeps_the_aspect_ratio_at_height_s_or_squashes() -> None:
    landscape = _png(np.zeros((460, 700, 3), dtype=np.uint8))
    portrait = _png(np.zeros((70, 46, 3), dtype=np.uint8))
    assert decode_tile(landscape, 64, keep_aspect=True).shape == (3, 64, round(64 * 700 / 460))
    assert decode_tile(portrait, 20, keep_aspect=True).shape == (3, round(20 * 70 / 46), 20)
    assert decode_tile(landscape, 64, keep_aspect=False).shape == (3, 64, 64)
    assert decode_tile(landscape, 64, keep_aspect=True).dtype == torch.uint8


def _dihedral(window: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of ``window`` under flips and quarter turns (index 0: itself)."""
    turns = [torch.rot90(window, k, dims=(1, 2)) for k in range(4)]
    return turns + [t.flip(2) for t in turns]


def _place(crop: torch.Tensor, tile: torch.Tensor, side: int) -> tuple[int, int] | None:
    """(x offset, dihedral index) of the window of ``tile`` that ``crop`` is, or None."""
    for x in range(tile.shape[2] - side + 1):
        for index, image in enumerate(_dihedral(tile[:, :side, x : x + side])):
            if torch.equal(crop, image):
                return x, index
    return None


@pytest.mark.parametrize("quarter_turns", [True, False])
def test_a_train_crop_is_an_s_by_s_window_of_the_tile_flipped_and_turned(quarter_turns) -> None:
    side = 20
    tile = decode_tile(_tiles(1, width=70, height=46)[0][0], side, keep_aspect=True)
    assert tile.shape == (3, 20, 30)
    generator = torch.Generator().manual_seed(0)
    places = [
        _place(train_crop(tile, side, generator, quarter_turns=quarter_turns), tile, side)
        for _ in range(200)
    ]
    assert None not in places  # every crop is a window of the tile under a flip or turn
    assert len({x for x, _ in places}) > 5  # at random places along the width
    # Flips alone give 4 of the 8 images (identity, both flips, the half turn); quarter
    # turns the other 4.
    assert len({index for _, index in places}) == (8 if quarter_turns else 4)


def test_the_test_takes_the_centre_window() -> None:
    tile = torch.arange(3 * 20 * 31, dtype=torch.int64).reshape(3, 20, 31)
    assert torch.equal(centre_crop(tile, 20), tile[:, :, 5:25])
    assert torch.equal(centre_crop(tile[:, :, :20], 20), tile[:, :, :20])


def test_class_weights_are_inverse_frequency() -> None:
    assert torch.allclose(class_weights([0, 1, 1, 1]), torch.tensor([2.0, 4 / 6]))
    with pytest.raises(ValueError, match="both classes"):
        class_weights([1, 1, 1])
    assert images_per_epoch(17, 8) == 16 and images_per_epoch(18, 8) == 18


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["strong", "notebook"])
def test_the_same_seed_gives_the_same_predictions(loop) -> None:
    pngs, labels = _tiles(20)
    train, test = (pngs[:14], labels[:14]), pngs[14:]
    first, per_epoch = reference_probs(loop, *train, test, TINY)
    again, _ = reference_probs(loop, *train, test, TINY)
    other, _ = reference_probs(loop, *train, test, replace(TINY, seed=1))
    assert first.shape == (6,) and per_epoch == 14
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not torch.are_deterministic_algorithms_enabled()  # the setting comes back


# --- resume --------------------------------------------------------------------------------


def _tile_table(n: int) -> pa.Table:
    pngs, labels = _tiles(n)
    return pa.table(
        {
            "tile_id": [f"t{i}" for i in range(n)],
            "patient_id": [f"p{i % 8}" for i in range(n)],  # one label per patient
            "label": labels,
            "png": pngs,
        }
    )


def test_a_rerun_loads_the_finished_runs_and_runs_the_others(tmp_path: Path) -> None:
    tiles = _tile_table(16)
    train, test = frozenset(f"p{i}" for i in range(6)), frozenset({"p6", "p7"})
    key = RunKey(REFERENCE, 0, 0, recipe={"loop": "strong"}, options={"epochs": 1}, manifest="m")

    def run(seed: int) -> SideResult:
        return run_reference("strong", tiles, train, test, replace(TINY, seed=seed))

    first = RunStore(tmp_path)
    ran = first.get_or_run(key, lambda: run(0))
    assert (first.computed, first.resumed) == (1, 0) and first.path(key).is_file()

    rerun = RunStore(tmp_path)
    assert rerun.get_or_run(key, lambda: pytest.fail("a finished run ran again")) == ran
    other = replace(key, seed=1)
    rerun.get_or_run(other, lambda: run(1))
    assert (rerun.computed, rerun.resumed) == (1, 1)
    assert len(list(tmp_path.glob("*.json"))) == 2

    # A file holding another key is not trusted: that run is done again.
    rerun.path(other).write_text(json.dumps({"key": {"side": "x"}, "result": {}}))
    assert rerun.load(other) is None


def test_a_run_key_holds_what_changes_the_result_and_nothing_else() -> None:
    config = AccuracyBenchmarkConfig(arch="smallcnn", epochs=1)
    ref = reference_key(config, 0, 0, "m")
    assert ref == reference_key(replace(config, workdir="elsewhere", cpus=1, seeds=(5,)), 0, 0, "m")
    assert ref != reference_key(replace(config, reference="notebook"), 0, 0, "m")
    assert ref != reference_key(replace(config, epochs=2), 0, 0, "m")
    assert ref != reference_key(config, 0, 0, "another manifest")
    assert ref.file_name() != replace(ref, seed=1).file_name()

    def key(variant: str, where: str = "a", **changes) -> RunKey:
        c = replace(config, **changes)
        return job_key(job_config(f"{where}/d", f"{where}/r", variant, 1, 2, c), variant, 1, 2, "m")

    assert key("job") == key("job", where="b")  # where it reads and writes is not in the key
    assert key("job") != key("refit") and key("job") != key("job", lr=0.01)
    assert key("job").digest() != key("refit").digest()
    # Fields added after runs were stored are left out at their off value (the stored runs
    # computed exactly that), and in at any other.
    added = ("task", "stain_norm", "stain_reference", "freeze_backbone")
    assert not set(added) & set(key("job").options)
    assert key("stain-macenko").options["stain_norm"] == "macenko"
    assert key("stain-macenko") != key("stain-reinhard") != key("job")
    assert key("subtype").options["task"] == "subtype" and key("subtype") != key("job")


# --- figures -------------------------------------------------------------------------------


def test_paired_summary_of_a_known_input() -> None:
    s = paired_summary([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof)
    assert s.n == 3 and math.isclose(s.mean, 0.2) and math.isclose(s.std, 0.1)
    assert math.isclose(s.low, 0.2 - half) and math.isclose(s.high, 0.2 + half)
    one = paired_summary([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.low)
    assert math.isnan(paired_summary([0.1, math.nan]).mean)


def _side(rate: float) -> SideResult:
    return SideResult(rate, rate, rate, rate, 1.0, 10, 2, 5, 0, 40, 1, 0.5)


def _result(pairs, sides, **runs) -> AccuracyBenchmarkResult:
    """A result of ``sides`` over ``pairs`` on made-up data (no run behind it)."""
    return AccuracyBenchmarkResult(
        date="2026-01-01",
        device="cpu",
        config=AccuracyBenchmarkConfig().__dict__,
        data=DataInfo("src", "raw", "dest", 40, 4, "m"),
        pairs=pairs,
        sides=sides,
        runs=runs,
    )


def test_the_result_reports_paired_differences_per_pair_with_their_interval() -> None:
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    reference = [0.5, 0.6, 0.7, 0.8]
    job = [0.6, 0.6, 0.9, 0.8]  # differences 0.1, 0, 0.2, 0
    sides = {REFERENCE: [_side(r) for r in reference], "job": [_side(r) for r in job]}
    result = _result(pairs, sides, computed=3, resumed=5)
    figures = result.to_dict()
    diffs = figures["differences"]["job"]
    assert [d["image_rate"] for d in diffs["per_pair"]] == pytest.approx([0.1, 0.0, 0.2, 0.0])
    assert [(d["split"], d["seed"]) for d in diffs["per_pair"]] == [
        ("rep:0", 0), ("rep:0", 1), ("rep:1", 0), ("rep:1", 1),
    ]  # fmt: skip
    expected = paired_summary([0.1, 0.0, 0.2, 0.0])
    for metric in ("image_rate", "patient_rate", "balanced_accuracy", "roc_auc"):
        assert diffs[metric]["mean"] == pytest.approx(0.075)
        assert diffs[metric]["low"] == pytest.approx(expected.low)
        assert diffs[metric]["low"] < 0 < diffs[metric]["high"]
    assert figures["target"]["job"] == "met" and figures["runs"]["resumed"] == 5
    table = result.format_table()
    assert "95% t-interval" in table and f"{expected.low:+.3f}" in table
    assert "| rep:1 | 1 | job |" in table and "computed 3, resumed 5" in table


def test_a_subtype_side_is_compared_with_the_job_and_shows_its_eight_class_figures() -> None:
    pairs = [(0, 0), (1, 0), (2, 0)]
    sides = {
        REFERENCE: [_side(r) for r in (0.5, 0.6, 0.7)],
        "job": [_side(r) for r in (0.6, 0.7, 0.8)],
        "subtype": [
            replace(_side(r), subtype_accuracy=a, subtype_balanced_accuracy=a / 2)
            for r, a in ((0.7, 0.3), (0.7, 0.4), (0.7, 0.5))
        ],
    }
    result = _result(pairs, sides)
    assert result.subtype_sides() == ["subtype"] and result.against_job() == ["subtype"]
    figures = result.to_dict()
    from_job = figures["differences_from_job"]["subtype"]["patient_rate"]
    assert from_job["mean"] == pytest.approx(0.0) and from_job["n"] == 3
    assert figures["summary"]["subtype"]["subtype_accuracy"]["mean"] == pytest.approx(0.4)
    assert "subtype_accuracy" not in figures["summary"]["job"]
    table = result.format_table()
    assert "| subtype - job: split | seed |" in table
    assert "| rep:2 | 0 | subtype | 0.500 | 0.250 | n/a |" in table
    assert "| mean +- std | | subtype | 0.400 +- 0.100 |" in table


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"reference": "fancy"}, ["--reference fancy", "strong", "notebook"]),
        ({"seeds": ()}, ["--seeds"]),
        ({"seeds": (0, 0)}, ["--seeds 0,0", "repeated"]),
        ({"seeds": (-1,)}, ["--seeds -1", "accepted"]),
        ({"splits": (0, 7)}, ["--splits 0,7", "0..4"]),
        ({"variants": ("job", "nope")}, ["--variants job,nope", "nope", "refit"]),
        ({"batch_size": 1}, ["--batch-size"]),
    ],
)
def test_a_bad_option_is_named_with_what_is_accepted(options, named) -> None:
    with pytest.raises(ValueError) as err:
        AccuracyBenchmarkConfig(**options)
    assert all(part in str(err.value) for part in named), str(err.value)
