"""Every benchmark runs end to end through ``breakhis benchmark NAME`` at a tiny size and
writes figures that make sense. Nothing here judges speed (that is what the benchmarks
are for); these tests keep the benchmarks themselves working."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from breakhis import cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The benchmarks set torch's thread count for what they measure; later tests in this
    process get it back as it was."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _saved(name: str, workdir: Path, printed: str) -> dict:
    """The figures of ``benchmark-NAME.json``, after checking that the table printed is the
    one saved beside it."""
    figures = json.loads((workdir / f"benchmark-{name}.json").read_text())
    table = (workdir / f"benchmark-{name}.md").read_text()
    assert table.strip() and table.strip() in printed
    return figures


def _benchmark(name: str, workdir: Path, capsys, *options: str) -> dict:
    """Run ``breakhis benchmark NAME`` through the command line's ``main`` in this process, on
    the session's Ray (a benchmark measures on the Ray it finds initialised: a process of
    its own would add a Python and a Ray start, 10-15 s, and check nothing more; the process
    entry point is run by test_ingest_benchmark and the missing-split test), and return the
    figures of its ``benchmark-NAME.json``."""
    capsys.readouterr()
    assert cli.main(["benchmark", name, "--workdir", str(workdir), *options]) == 0
    return _saved(name, workdir, capsys.readouterr().out)


def _benchmark_process(name: str, workdir: Path, *options: str) -> dict:
    """Run ``breakhis benchmark NAME`` in its own process (for a benchmark that starts its own
    Ray and S3 server) and return the figures of its ``benchmark-NAME.json``."""
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "benchmark", name, "--workdir", str(workdir),
         *options],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return _saved(name, workdir, done.stdout)


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_ingest_benchmark(tmp_path: Path) -> None:
    # In its own process: the ingest benchmark starts its own S3 server and Ray instances
    # (one with a small object store), and refuses to run where Ray is initialised.
    figures = _benchmark_process(
        "ingest", tmp_path, "--scale", "0.01", "--width", "64", "--height", "48",
        "--image-size", "32", "--batch-size", "8", "--epochs", "2",
    )  # fmt: skip
    assert figures["images"] > 0 and figures["device"]
    runs = {r["name"]: r for r in figures["runs"]}
    assert set(runs) == {"png-cached", "pixels-cached", "pixels-streaming"}
    for run in (figures["loader"], *runs.values()):
        assert len(run["epoch_s"]) == 2 and _positive(*run["epoch_s"], run["peak_bytes"])
        assert run["patients_per_batch"] >= 1
    # The cache: every tile decoded in the first epoch, none in the second; stored pixels
    # are never decoded, cached or not.
    assert runs["png-cached"]["decodes"] == [figures["images"], 0]
    assert runs["pixels-cached"]["decodes"] == runs["pixels-streaming"]["decodes"] == [0, 0]
    assert figures["decoded_bytes"] > 0 and figures["object_store_bytes"] >= 80 * 1024**2
    assert _positive(figures["stream_peak_1x"], figures["stream_peak_nx"], figures["prepare_s"])
    assert figures["pixel_bytes"] > 0 and len(figures["targets"]) == 4


def test_ceiling_benchmark(tmp_path: Path, capsys, ray_local, torch_threads) -> None:
    figures = _benchmark(
        "ceiling", tmp_path, capsys, "--image-size", "32", "--batch-size", "16", "--tiles", "96",
        "--epochs", "2", "--predictor-tiles", "2",
    )  # fmt: skip
    # The iterator hands every full batch of the epoch, as many as the indexer.
    assert figures["images_per_epoch"] == 96
    assert len(figures["iterator_epoch_s"]) == len(figures["indexer_epoch_s"]) == 2
    assert _positive(figures["iterator_images_per_s"], figures["indexer_images_per_s"])
    assert _positive(figures["augment_images_per_s"], *figures["predictor"].values())
    assert len(figures["predictor"]) == 2


def test_gpu_benchmark_dry_run_on_the_cpu_and_the_train_benchmark_it_runs(
    tmp_path: Path, capsys, ray_local, torch_threads
) -> None:
    """``make bench-gpu``'s script at a toy size on the CPU: every part it runs on a GPU
    machine runs here, and the issue's table is printed. Its train part is the train
    benchmark (run_train_benchmark: smallcnn, 32 px, scale 0.02, batches of 16, 2 epochs),
    whose figures are checked here too: running ``breakhis benchmark train`` on its own as
    well cost another minute (test_cli checks that command's options and config)."""
    figures = _benchmark("gpu", tmp_path, capsys, "--dry-run", "--parts", "predictor,train")
    assert figures["errors"] == {}, figures["errors"]
    predictor, train = figures["parts"]["predictor"], figures["parts"]["train"]
    assert _positive(*predictor.values()) and len(predictor) == 7
    assert _positive(train["job_images_per_s_per_worker"], train["loop_images_per_s"])
    table = (tmp_path / "benchmark-gpu.md").read_text()
    assert "DRY RUN" in table and "| training, images/s" in table and "bare `model(x)`" in table

    # The train benchmark's figures, as saved by it (benchmark-train.json and its table).
    saved = json.loads((tmp_path / "train" / "benchmark-train.json").read_text())
    assert json.dumps(saved, sort_keys=True) == json.dumps(train, sort_keys=True)  # NaN too
    assert (tmp_path / "train" / "benchmark-train.md").read_text().strip()
    assert train["train_images"] > 0 and train["gpus"] == 0
    assert len(train["job_epoch_s"]) == len(train["loop_epoch_s"]) == 2
    assert _positive(*train["job_epoch_s"], *train["loop_epoch_s"], train["job_wall_s"])
    # The epoch splits into the first batch's wait, later waits and the steps' own time.
    for side in ("job", "loop"):
        first, waits = train[f"{side}_first_batch_s"], train[f"{side}_wait_s"]
        assert len(first) == len(waits) == 2 and min(first + waits) >= 0
        assert all(
            f + w <= e for f, w, e in zip(first, waits, train[f"{side}_epoch_s"], strict=True)
        )
    assert train["job_first_batch_s"][1] > 0


def test_tune_benchmark(tmp_path: Path, capsys, ray_local, torch_threads) -> None:
    figures = _benchmark(
        "tune", tmp_path, capsys, "--trials", "1", "--epochs", "1", "--image-size", "32",
        "--scale", "0.01", "--batch-size", "16",
    )  # fmt: skip
    assert len(figures["job_run_s"]) == 1
    assert _positive(*figures["job_run_s"], figures["sweep_wall_s"], figures["job_wall_s"])


def test_score_benchmark(tmp_path: Path, capsys, ray_local, torch_threads) -> None:
    figures = _benchmark(
        "score", tmp_path, capsys, "--tiles", "16", "--arch", "smallcnn", "--image-size", "32",
        "--tile-width", "64", "--tile-height", "48", "--batch-size", "8", "--unit-size", "8",
        "--attribution-tiles", "4", "--ig-steps", "2", "--memory-tiles", "8",
        "--memory-scales", "2",
    )  # fmt: skip
    names = [row["name"] for row in figures["throughput"]]
    assert names[0] == "plain PyTorch loop" and len(names) == 4
    assert all(row["tiles"] > 0 and _positive(row["tiles_per_s"]) for row in figures["throughput"])
    # One memory run (each is a process with its own Ray, ~25 s here), of the tiles and a
    # hard link to each; the table of several scales and their spread is checked without
    # Ray: test_score_listing.py::
    # test_the_score_benchmark_table_shows_each_memory_scale_and_their_spread.
    assert [int(k) for k in figures["peak_memory_mb"]] == [2]
    assert _positive(*figures["peak_memory_mb"].values())
    assert len(list((tmp_path / "copies" / "copy01").iterdir())) == 8


def test_accuracy_benchmark(tmp_path: Path, capsys, ray_local, torch_threads) -> None:
    # One split: its reference, job and refit (two runs) take minutes on 2 cores already.
    tiny = (
        "--data", "generated", "--scale", "0.02", "--width", "64", "--height", "48",
        "--arch", "smallcnn", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--splits", "2",
    )  # fmt: skip
    figures = _benchmark(
        "accuracy", tmp_path, capsys, *tiny, "--seeds", "0", "--variants", "val-carve,refit"
    )
    assert figures["data"]["kind"] == "generated" and figures["device"]
    assert figures["config"]["reference"] == "strong" and figures["data"]["manifest"]
    assert [(p["split"], p["seed"]) for p in figures["pairs"]] == [("rep:2", 0)]
    assert (figures["runs"]["computed"], figures["runs"]["resumed"]) == (3, 0)
    sides = figures["pairs"][0]["sides"]
    # val-carve: the job holding a fifth of its training patients out for validation (the
    # default trains on all of them since 2026-12-07); refit trains again on all of them.
    assert sorted(sides) == ["reference", "refit", "val-carve"]
    reference, job, refit = sides["reference"], sides["val-carve"], sides["refit"]
    for side in (job, refit):  # the same test patients and tiles on every side
        assert side["test_images"] == reference["test_images"] > 0
        assert side["test_patients"] == reference["test_patients"] > 0
        assert side["val_patients"] > 0 == reference["val_patients"]
        assert side["kept_epoch"] == 1
    # The job's validation patients come out of the reference's training patients; the
    # refit trains on them too.
    assert job["train_patients"] + job["val_patients"] == reference["train_patients"]
    assert refit["train_patients"] == reference["train_patients"]
    assert 0 < job["images_per_epoch"] < refit["images_per_epoch"]
    assert refit["images_per_epoch"] <= reference["images_per_epoch"]
    for side in sides.values():
        assert 0.0 <= side["image_rate"] <= 1.0 and 0.0 <= side["patient_rate"] <= 1.0
        assert _positive(side["seconds"])
    for variant in ("val-carve", "refit"):
        differences = figures["differences"][variant]
        for metric in ("image_rate", "patient_rate", "balanced_accuracy", "roc_auc"):
            expected = sides[variant][metric] - reference[metric]
            assert math.isclose(differences["per_pair"][0][metric], expected, abs_tol=1e-12)
            assert math.isclose(differences[metric]["mean"], expected, abs_tol=1e-12)
            assert differences[metric]["std"] is None  # no spread from one pair
        assert figures["target"][variant] in ("met", "missed")

    # The same command again loads every run it finished from its results folder (a fresh
    # RunStore reads the files, as a new process would): none runs twice.
    # A rerun that adds a seed runs only that seed's runs, and two pairs give an interval:
    # tests/test_accuracy_benchmark.py checks both without Ray
    # (test_a_rerun_loads_the_finished_runs_and_runs_the_others,
    # test_paired_summary_of_a_known_input); training seed 1 here took a minute more.
    again = _benchmark(
        "accuracy", tmp_path, capsys, *tiny, "--seeds", "0", "--variants", "val-carve,refit"
    )
    assert (again["runs"]["computed"], again["runs"]["resumed"]) == (0, 3)
    assert len(list((tmp_path / "results").glob("*.json"))) == 3
    assert again["pairs"][0]["sides"] == sides
    assert again["differences"] == figures["differences"]


def test_accuracy_benchmark_rejects_a_missing_split_before_any_work(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "breakhis.cli", "benchmark", "accuracy", "--workdir",
         str(tmp_path / "bench"), "--splits", "0,99"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--splits 0,99" in done.stderr and "0..4" in done.stderr
    assert not (tmp_path / "bench").exists()  # nothing prepared, no Ray started
