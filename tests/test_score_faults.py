"""Faults injected at the storage layer (breakhis.faults, test-only hooks): transient errors
are retried and never stored as results, permanent ones are."""

from __future__ import annotations

import json

import pytest
from test_score import _make_tiles

from breakhis import faults, storage


def _inject(monkeypatch, rules: dict) -> None:
    monkeypatch.setenv(faults.READ_FAULTS_ENV, json.dumps(rules))
    faults._raised.clear()
    monkeypatch.setattr(storage, "READ_BACKOFF_S", 0.01)


def test_storage_tells_transient_from_permanent_errors() -> None:
    transient = [
        "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Please reduce your "
        "request rate.",
        "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.",
        "AWS Error THROTTLING during HeadObject operation: Rate exceeded",
        "AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an internal error",
        "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was "
        "reached",
    ]
    permanent = [
        "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
        "AWS Error UNKNOWN (HTTP status 400) during GetObject operation: Bad Request",
    ]
    assert all(storage.is_transient(OSError(f"When reading x: {t}")) for t in transient)
    assert not any(storage.is_transient(OSError(f"When reading x: {p}")) for p in permanent)
    assert storage.is_transient(storage.S3UnreachableError("no answer"))
    assert not storage.is_transient(FileNotFoundError("s3://b/k: no such file"))
    assert not storage.is_transient(ValueError("decode: not a PNG"))


def test_prepare_fails_its_task_on_transient_errors_instead_of_rejecting(
    tmp_path, monkeypatch
) -> None:
    from breakhis.catalog import scan_catalog
    from breakhis.prepare import plan_shards, write_shard

    _make_tiles(str(tmp_path / "raw"))
    plan = plan_shards(scan_catalog(str(tmp_path / "raw")).table, shard_mb=1000)[0]
    victim = plan.rows[0]["uri"]
    _inject(monkeypatch, {victim: "slowdown"})
    with pytest.raises(storage.TransientStorageError, match=victim):
        write_shard(plan, str(tmp_path / "a" / "shards"), 16)
    assert not (tmp_path / "a" / "shards").exists()  # nothing written, nothing rejected
    _inject(monkeypatch, {victim: "denied"})  # permanent: a reject, as before
    result = write_shard(plan, str(tmp_path / "b" / "shards"), 16)
    assert [(r.uri, r.stage) for r in result.rejects if r.uri == victim] == [(victim, "read")]
