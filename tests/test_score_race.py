"""One scoring job per output: racing claimers with different models never both win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from breakhis import storage
from breakhis.score_output import (
    CLAIMS,
    STALE_TEMP_S,
    JobMismatchError,
    claim_output,
    new_token,
    release_claim,
    unit_files,
    verify_claim,
)

TRIES = 20


def _race(output: str, conditional: bool = True) -> list[str]:
    """Two claimers with different models on ``output`` at once; the models that won."""
    records = {"a": {"format": 2, "model_id": "aaaa"}, "b": {"format": 2, "model_id": "bbbb"}}
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


def test_s3_server_honours_the_exclusive_create(s3_prefix) -> None:
    from breakhis.score_output import _put_if_absent

    uri = f"{s3_prefix}/_job.json"
    assert _put_if_absent(uri, b"first") is True
    assert _put_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_rerun_claims_again_and_a_stolen_output_fails_verification(tmp_path) -> None:
    output, record = str(tmp_path / "out"), {"format": 2, "model_id": "aaaa"}
    first = new_token()
    claim_output(output, record, first)
    # A second run with the same record (a killed job's claim still there) may resume.
    second = new_token()
    claim_output(output, record, second)
    verify_claim(output, record, second)
    with pytest.raises(JobMismatchError, match="model_id: 'aaaa' there, 'bbbb' now"):
        claim_output(output, {"format": 2, "model_id": "bbbb"}, new_token())
    assert sorted(os.listdir(tmp_path / "out" / CLAIMS)) == sorted(
        [f"{first}.json", f"{second}.json"]
    )  # the refused claimer left nothing behind
    (tmp_path / "out" / "_job.json").write_text(json.dumps({"model_id": "bbbb"}))
    with pytest.raises(JobMismatchError, match="holds the output of another scoring job"):
        verify_claim(output, record, second)
    release_claim(output, first)
    release_claim(output, second)
    assert sorted(os.listdir(tmp_path / "out")) == ["_job.json"]


def test_a_rival_claim_in_flight_refuses_the_job(tmp_path) -> None:
    output = str(tmp_path / "out")
    rival = storage.join(output, CLAIMS, "f" * 32 + ".json")
    storage.write_bytes(
        rival, json.dumps({"token": "f" * 32, "record": {"model_id": "b"}}).encode()
    )
    with pytest.raises(JobMismatchError, match="is being claimed by another scoring job"):
        claim_output(output, {"model_id": "a"}, new_token())


def test_only_stale_temp_files_are_deleted(tmp_path) -> None:
    (tmp_path / "unit-00000-abc.parquet").write_bytes(b"x")
    fresh = tmp_path / ".unit-00001-def.parquet.1234.tmp"
    old = tmp_path / ".unit-00002-ghi.parquet.5678.tmp"
    fresh.write_bytes(b"half")
    old.write_bytes(b"half")
    past = time.time() - STALE_TEMP_S - 60
    os.utime(old, (past, past))
    assert unit_files(str(tmp_path)) == {"unit-00000-abc.parquet"}
    assert fresh.exists() and not old.exists()  # a live writer's temp file is never deleted


@pytest.mark.ray
@pytest.mark.slow
def test_second_score_command_with_another_model_is_refused(tmp_path) -> None:
    """Two `breakhis score` commands with different models on one output: while the first
    runs, the second fails in one line and the first finishes with only its own rows."""
    import pyarrow.parquet as pq
    from test_score import _make_tiles, _save_model

    _make_tiles(str(tmp_path / "tiles"))
    first = _save_model(str(tmp_path / "model-a"))
    _save_model(str(tmp_path / "model-b"), temperature=2.0)
    out = tmp_path / "scores"

    def command(model: str) -> list[str]:
        return [
            sys.executable, "-m", "breakhis.cli", "score", "--model", model,
            "--input", str(tmp_path / "tiles"), "--out", str(out), "--attribution", "none",
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
        second = subprocess.run(
            command(str(tmp_path / "model-b")), env=env, capture_output=True, timeout=120
        )
        assert running.poll() is None, "the first job ended before the second was refused"
        stdout, stderr = running.communicate(timeout=300)
    finally:
        running.kill()
    errors = [line for line in second.stderr.decode().splitlines() if "error:" in line]
    assert second.returncode == 2 and len(errors) == 1, second.stderr.decode()[-2000:]
    assert "holds the output of another scoring job" in errors[0]
    assert (
        "temperature: 2.0 there, 1.0 now" in errors[0]
        or "temperature: 1.0 there, 2.0 now" in errors[0]
    )
    assert running.returncode == 0, stderr.decode()[-3000:]
    table = pq.read_table(out / "tiles")
    assert table.num_rows == 36 and set(table["model_id"].to_pylist()) == {first.model_id}
    assert (out / "_SUCCESS").exists()
