"""One scoring job per output: racing claimers with different models never both win."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakhis import storage
from breakhis.score.output import (
    CLAIM_DEAD_S,
    CLAIMS,
    STALE_TEMP_S,
    JobMismatchError,
    claim_output,
    new_token,
    refresh_claim,
    release_claim,
    sweep_dead_jobs,
    unit_files,
    verify_claim,
    write_unit,
)

TRIES = 20


DIFFERENT = {"a": {"format": 2, "model_id": "aaaa"}, "b": {"format": 2, "model_id": "bbbb"}}


def _race(output: str, conditional: bool = True, records: dict = DIFFERENT) -> list[str]:
    """Two claimers (by default with different models) on ``output`` at once; who won."""
    start = threading.Barrier(2)
    winners: list[str] = []
    errors: list[str] = []

    def claim(name: str) -> None:
        start.wait()
        try:
            claim_output(output, records[name], new_token(), conditional=conditional)
        except JobMismatchError:
            return
        except BaseException:  # reported by the test
            import traceback

            errors.append(traceback.format_exc())
            return
        winners.append(name)

    threads = [threading.Thread(target=claim, args=(n,)) for n in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    return winners


def _check_races(outputs: list[str], conditional: bool = True) -> None:
    results = [_race(output, conditional) for output in outputs]
    assert all(len(w) <= 1 for w in results), f"two winners: {results}"
    assert sum(len(w) for w in results) >= 1, "no claimer ever won"
    for output, won in zip(outputs, results, strict=True):
        if won:  # the output is the winner's
            record = json.loads(storage.read_bytes(storage.join(output, "_job.json")))
            assert record["model_id"] == {"a": "aaaa", "b": "bbbb"}[won[0]]


def test_local_claim_race_never_has_two_winners(tmp_path) -> None:
    _check_races([str(tmp_path / f"out{i}") for i in range(TRIES)])


def test_s3_claim_race_never_has_two_winners(s3_prefix) -> None:
    _check_races([f"{s3_prefix}/out{i}" for i in range(TRIES)])


@pytest.mark.slow
def test_s3_claim_race_is_safe_without_conditional_writes(s3_prefix) -> None:
    # As on a server that ignores If-None-Match: the claims alone must keep it safe.
    _check_races([f"{s3_prefix}/plain{i}" for i in range(TRIES)], conditional=False)


def test_s3_claim_race_with_the_same_options_has_one_winner(s3_prefix) -> None:
    # Two jobs with identical options, each planning from its own listing of a growing
    # input, would write different units into one output: they are rivals too.
    same = {"format": 2, "model_id": "aaaa"}
    results = [_race(f"{s3_prefix}/same{i}", records={"a": same, "b": same}) for i in range(3)]
    assert all(len(w) <= 1 for w in results), f"two winners: {results}"
    assert sum(len(w) for w in results) >= 1, "no claimer ever won"


def test_s3_server_honours_the_exclusive_create(s3_prefix) -> None:
    from breakhis.score.output import _put_if_absent

    uri = f"{s3_prefix}/_job.json"
    assert _put_if_absent(uri, b"first") is True
    assert _put_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def _age(path, seconds: float) -> None:
    """Set the modification time of ``path`` ``seconds`` in the past (a claim left by a
    job killed that long ago)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_rerun_waits_for_a_dead_claim_and_a_stolen_output_fails_verification(tmp_path) -> None:
    output, record = str(tmp_path / "out"), {"format": 2, "model_id": "aaaa"}
    first = new_token()
    claim_output(output, record, first)
    # A second job with the same record while the first one runs: refused all the same.
    with pytest.raises(JobMismatchError, match=r"written \d+ s ago: the same model and options"):
        claim_output(output, record, new_token())
    # The first job was killed: once its claim is CLAIM_DEAD_S old, a rerun may resume.
    _age(tmp_path / "out" / CLAIMS / f"{first}.json", CLAIM_DEAD_S + 5)
    second = new_token()
    claim_output(output, record, second)
    verify_claim(output, record, second)
    with pytest.raises(JobMismatchError, match="model_id: 'aaaa' there, 'bbbb' now"):
        claim_output(output, {"format": 2, "model_id": "bbbb"}, new_token())
    assert sorted(os.listdir(tmp_path / "out" / CLAIMS)) == sorted(
        [f"{first}.json", f"{second}.json"]
    )  # the refused claimers left nothing behind
    (tmp_path / "out" / "_job.json").write_text(json.dumps({"model_id": "bbbb"}))
    with pytest.raises(JobMismatchError, match="holds the output of another scoring job"):
        verify_claim(output, record, second)
    release_claim(output, first)
    release_claim(output, second)
    assert sorted(os.listdir(tmp_path / "out")) == ["_job.json"]


def test_sweep_deletes_dead_claims_and_their_plans_only(tmp_path) -> None:
    output, record = str(tmp_path / "out"), {"format": 2, "model_id": "aaaa"}
    dead, live, mine = new_token(), new_token(), new_token()
    for token in (dead, live, mine):
        refresh_claim(output, record, token)
        storage.write_bytes(f"{output}/_plan/{token}/attempts/unit-1/x", b"")
    _age(tmp_path / "out" / CLAIMS / f"{dead}.json", CLAIM_DEAD_S + 5)
    _age(tmp_path / "out" / CLAIMS / f"{live}.json", CLAIM_DEAD_S - 30)
    sweep_dead_jobs(output, mine)
    assert sorted(os.listdir(tmp_path / "out" / CLAIMS)) == sorted([f"{live}.json", f"{mine}.json"])
    assert sorted(os.listdir(tmp_path / "out" / "_plan")) == sorted([live, mine])


def test_a_rival_claim_in_flight_refuses_the_job(tmp_path) -> None:
    output = str(tmp_path / "out")
    rival = storage.join(output, CLAIMS, "f" * 32 + ".json")
    storage.write_bytes(
        rival, json.dumps({"token": "f" * 32, "record": {"model_id": "b"}}).encode()
    )
    with pytest.raises(JobMismatchError, match="is being claimed by another scoring job"):
        claim_output(output, {"model_id": "a"}, new_token())


def test_only_stale_temp_files_are_deleted(tmp_path) -> None:
    pq.write_table(pa.table({"x": [1]}), tmp_path / "unit-00000-abc.parquet")
    fresh = tmp_path / ".unit-00001-def.parquet.1234.tmp"
    old = tmp_path / ".unit-00002-ghi.parquet.5678.tmp"
    fresh.write_bytes(b"half")
    old.write_bytes(b"half")
    past = time.time() - STALE_TEMP_S - 60
    os.utime(old, (past, past))
    assert unit_files(str(tmp_path)) == {"unit-00000-abc.parquet"}
    assert fresh.exists() and not old.exists()  # a live writer's temp file is never deleted


def test_a_torn_unit_file_is_rescored_not_taken_as_done(tmp_path) -> None:
    """A crash before the data reached the disk left an empty or cut unit file (issue 24):
    it is not a unit done, so the rerun scores it again instead of failing on it forever."""
    good = tmp_path / "unit-00000-abc.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), good)
    (tmp_path / "unit-00001-def.parquet").write_bytes(b"")
    (tmp_path / "unit-00002-ghi.parquet").write_bytes(good.read_bytes()[:-6])
    assert unit_files(str(tmp_path)) == {"unit-00000-abc.parquet"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit-00000-abc.parquet"]
    # write_unit lands whole files: the temp file is renamed over, nothing else is left.
    write_unit(str(tmp_path / "unit-00003-jkl.parquet"), good.read_bytes(), "t0k3n")
    assert unit_files(str(tmp_path)) == {"unit-00000-abc.parquet", "unit-00003-jkl.parquet"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_unit_outside_the_plan_fails_the_check_before_success(tmp_path) -> None:
    from breakhis.score.check import check_units
    from breakhis.score.units import PENDING_SCHEMA, Plan

    plan = Plan(["unit-00000-aaa.parquet"], [4], PENDING_SCHEMA.empty_table(), [])
    pq.write_table(pa.table({"x": [1]}), tmp_path / "unit-00000-aaa.parquet")
    check_units(str(tmp_path), plan, set())
    # Another job's unit (it planned from another listing of the input) landed meanwhile.
    pq.write_table(pa.table({"x": [1]}), tmp_path / "unit-00000-bbb.parquet")
    with pytest.raises(RuntimeError, match=r"1 unit file\(s\) outside this job's plan"):
        check_units(str(tmp_path), plan, set())
    (tmp_path / "unit-00000-bbb.parquet").unlink()
    (tmp_path / "unit-00000-aaa.parquet").unlink()
    with pytest.raises(RuntimeError, match=r"1 unit file\(s\) of the plan missing"):
        check_units(str(tmp_path), plan, set())
    # A unit that an earlier compaction holds (named by _manifest.json) is not missing.
    check_units(str(tmp_path), plan, {"unit-00000-aaa.parquet"})


@pytest.mark.ray
@pytest.mark.slow
def test_while_a_score_command_runs_another_model_or_a_grown_input_is_refused(tmp_path) -> None:
    """`breakhis score` commands on the output of one that runs (one first job for both
    checks: each costs a Python, a Ray start and its scoring): one with another model fails
    in one line naming what differs; then, once the input has grown, one with the first's
    very options is refused too (before: both ran, and rows of two listings could end under
    `_SUCCESS`). The first finishes with only its own rows, one per tile of its own listing."""
    import pyarrow.parquet as pq
    from test_score import _make_tiles, _save_model

    tiles = tmp_path / "tiles"
    _make_tiles(str(tiles))
    first = _save_model(str(tmp_path / "model-a"))
    _save_model(str(tmp_path / "model-b"), temperature=2.0)
    out = tmp_path / "scores"

    def command(model: str, out_option: str = "--out") -> list[str]:
        return [
            sys.executable, "-m", "breakhis.cli", "score", "--model", model,
            "--input", str(tiles), out_option, str(out), "--attribution", "none",
            "--unit-size", "4", "--batch-size", "4", "--num-actors", "1",
        ]  # fmt: skip

    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    running = subprocess.Popen(
        command(str(tmp_path / "model-a")), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "_job.json").exists() and time.monotonic() < deadline:
            assert running.poll() is None, running.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        other_model = subprocess.run(
            command(str(tmp_path / "model-b")), env=env, capture_output=True, timeout=120
        )
        assert running.poll() is None, "the first job ended before another model was refused"
        # A tile arrives, sorting first: every unit of a new listing differs from the first's.
        shutil.copy(sorted(tiles.rglob("*.png"))[0], tiles / "0-new-tile.png")
        same_options = subprocess.run(
            command(str(tmp_path / "model-a"), "--output"),
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert running.poll() is None, "the first job ended before its twin was refused"
        stdout, stderr = running.communicate(timeout=300)
    finally:
        running.kill()
    errors = [line for line in other_model.stderr.decode().splitlines() if "error:" in line]
    assert other_model.returncode == 2 and len(errors) == 1, other_model.stderr.decode()[-2000:]
    assert "holds the output of another scoring job" in errors[0]
    assert (
        "temperature: 2.0 there, 1.0 now" in errors[0]
        or "temperature: 1.0 there, 2.0 now" in errors[0]
    )
    errors = [line for line in same_options.stderr.decode().splitlines() if "error:" in line]
    assert same_options.returncode == 2 and len(errors) == 1, same_options.stderr.decode()[-2000:]
    assert "is being claimed by another scoring job" in errors[0]
    assert "the same model and options" in errors[0]
    assert running.returncode == 0, stderr.decode()[-3000:]
    # One row per tile of the first job's listing (the new tile in it or not, as its paged
    # listing went), no tile twice, every one scored by the first job's model.
    done = json.loads((out / "_SUCCESS").read_text())["summary"]
    table = pq.read_table(out / "predictions")
    uris = table["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == done["tiles"] in (36, 37)
    assert set(table["model_id"].to_pylist()) == {first.model_id}
