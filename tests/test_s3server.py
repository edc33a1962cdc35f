"""The embedded SeaweedFS server: storage.py and pyarrow on it, isolation, credentials, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore
import botocore.config
import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakhis import storage
from breakhis.dev.s3server import S3Server, S3ServerError, embedded_s3, start_s3_server

pytestmark = pytest.mark.s3

_TCP_LISTEN = "0A"


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # the fd closed while we looked
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != _TCP_LISTEN or inode not in inodes:
                continue
            addr_hex, port_hex = local.split(":")
            if table == "tcp":
                address = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1])
            else:
                words = [bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, 32, 8)]
                address = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            found.append((address, int(port_hex, 16)))
    return found


def _weed_children() -> set[int]:
    """PIDs of weed processes this test process started and has not reaped."""
    me = str(os.getpid())
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if fields[1] == me and comm == "weed":
            pids.add(int(proc.name))
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _client(server: S3Server, access_key: str = "", secret: str = "", unsigned: bool = False):
    """A boto3 client for ``server``, with its own keys unless others are given."""
    config = botocore.config.Config(
        retries={"max_attempts": 1},
        signature_version=botocore.UNSIGNED if unsigned else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=access_key or server.access_key,
        aws_secret_access_key=secret or server.secret_key,
        region_name="us-east-1",
        config=config,
    )


def test_storage_round_trip(s3_prefix: str) -> None:
    files = {"a/b/one.bin": b"\x00\x01binary", "two.txt": b"two", "a/three.png": b"\x89PNG"}
    for key, data in files.items():
        storage.write_bytes(storage.join(s3_prefix, key), data)

    entries = list(storage.walk(s3_prefix))
    assert [e.uri for e in entries] == sorted(storage.join(s3_prefix, k) for k in files)
    assert {e.uri: e.size for e in entries} == {
        storage.join(s3_prefix, k): len(v) for k, v in files.items()
    }
    assert [e.uri for e in storage.walk(s3_prefix, suffixes=(".PNG",))] == [
        storage.join(s3_prefix, "a/three.png")
    ]
    for key, data in files.items():
        assert storage.read_bytes(storage.join(s3_prefix, key)) == data
    assert storage.exists(storage.join(s3_prefix, "a"))

    storage.delete(storage.join(s3_prefix, "a/b/one.bin"))
    storage.delete(storage.join(s3_prefix, "a/b/one.bin"))  # a missing file is not an error
    assert not storage.exists(storage.join(s3_prefix, "a/b/one.bin"))
    assert len(list(storage.walk(s3_prefix))) == 2
    with pytest.raises(FileNotFoundError, match="one.bin"):
        storage.read_bytes(storage.join(s3_prefix, "a/b/one.bin"))


def test_parquet_round_trip(s3_prefix: str) -> None:
    table = pa.table(
        {
            "tile_id": pa.array(["SOB_B_A-14-22549AB-40-001", "SOB_M_DC-14-2523-400-010"]),
            "label": pa.array([0, 1], pa.int8()),
            "png": pa.array([b"\x89PNG-a", b"\x89PNG-b" * 1000], pa.binary()),
        }
    )
    fs, path = storage.resolve(storage.join(s3_prefix, "shards/part-00000.parquet"))
    pq.write_table(table, path, filesystem=fs)

    assert pq.read_table(path, filesystem=fs).equals(table)
    assert [e.uri.rsplit("/", 1)[1] for e in storage.walk(s3_prefix)] == ["part-00000.parquet"]


def test_buckets_exist_and_env_points_at_server(s3_server: S3Server) -> None:
    names = {b["Name"] for b in _client(s3_server).list_buckets()["Buckets"]}
    assert {"breakhis", "test"} <= names
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    s3_server.create_buckets(["breakhis"])  # creating again is not an error


def test_listens_only_on_loopback(s3_server: S3Server) -> None:
    expected = set(s3_server.ports.values())
    # The admin server comes up a moment after S3 answers, so wait for every port.
    deadline = time.monotonic() + 15
    while {port for _, port in _listening(s3_server.pid)} != expected:
        assert time.monotonic() < deadline, (
            f"listening {sorted(_listening(s3_server.pid))}, expected ports {sorted(expected)}"
        )
        time.sleep(0.2)
    sockets = _listening(s3_server.pid)
    assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets


def test_secret_stays_out_of_repr_argv_and_log(s3_server: S3Server) -> None:
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.secret_key not in str(s3_server)
    argv = Path(f"/proc/{s3_server.pid}/cmdline").read_bytes()
    assert b"weed" in argv
    assert s3_server.secret_key.encode() not in argv
    assert s3_server.secret_key not in s3_server.log_path.read_text(errors="replace")


def test_wrong_or_missing_credentials_are_refused(s3_server: S3Server) -> None:
    key = f"{uuid.uuid4().hex}.bin"
    _client(s3_server).put_object(Bucket="test", Key=key, Body=b"ok")

    with pytest.raises(botocore.exceptions.ClientError) as wrong:
        _client(s3_server, secret="not-the-secret").get_object(Bucket="test", Key=key)
    assert wrong.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")

    with pytest.raises(botocore.exceptions.ClientError) as anonymous:
        _client(s3_server, unsigned=True).get_object(Bucket="test", Key=key)
    assert anonymous.value.response["Error"]["Code"] == "AccessDenied"

    with pytest.raises(botocore.exceptions.ClientError):
        _client(s3_server, secret="not-the-secret").put_object(Bucket="test", Key="x", Body=b"")


def test_two_servers_run_at_once(s3_server: S3Server) -> None:
    other = start_s3_server(buckets=("test",))
    try:
        assert other.is_running() and s3_server.is_running()
        assert not set(other.ports.values()) & set(s3_server.ports.values())
        assert other.secret_key != s3_server.secret_key

        key = f"{uuid.uuid4().hex}.bin"
        _client(other).put_object(Bucket="test", Key=key, Body=b"only on the other one")
        assert _client(other).get_object(Bucket="test", Key=key)["Body"].read() == (
            b"only on the other one"
        )
        with pytest.raises(botocore.exceptions.ClientError):
            _client(s3_server).head_object(Bucket="test", Key=key)
        # Each server accepts only its own keys.
        stranger = _client(s3_server, access_key=other.access_key, secret=other.secret_key)
        with pytest.raises(botocore.exceptions.ClientError):
            stranger.list_buckets()
    finally:
        other.stop()


def test_embedded_s3_sets_env_then_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "outer-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://elsewhere.invalid")
    monkeypatch.delenv("AWS_REGION", raising=False)

    with embedded_s3(buckets=("inner",)) as server:
        assert {k: os.environ.get(k) for k in server.env()} == server.env()
        assert "AWS_ENDPOINT_URL_S3" not in os.environ
        storage.write_bytes("s3://inner/k.txt", b"inside")
        assert storage.read_bytes("s3://inner/k.txt") == b"inside"
        pid, data_dir, port = server.pid, server.data_dir, server.ports["s3.port"]
        assert data_dir.is_dir()

    assert os.environ["AWS_ACCESS_KEY_ID"] == "outer-key"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://elsewhere.invalid"
    assert "AWS_REGION" not in os.environ
    assert not server.is_running()
    assert pid not in _weed_children()
    assert not data_dir.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    server.stop()  # a second stop is harmless


def test_server_ends_when_its_parent_is_killed() -> None:
    # A test run killed with SIGKILL never reaches stop() or atexit; weed must not linger.
    script = (
        "import json, os, signal\n"
        "from breakhis.dev.s3server import start_s3_server\n"
        "s = start_s3_server(buckets=())\n"
        "facts = [s.pid, str(s.log_path.parent), str(s.data_dir), s.ports]\n"
        "print(json.dumps(facts), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    pid, runtime_dir, data_dir, ports = json.loads(child.stdout)
    try:
        deadline = time.monotonic() + 15
        while b"weed" in _cmdline(pid):
            assert time.monotonic() < deadline, f"weed pid {pid} outlived its parent"
            time.sleep(0.1)
    finally:
        # Nobody called stop(), so clean up what it would have removed.
        shutil.rmtree(runtime_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        for port in ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                leftover.unlink(missing_ok=True)


def test_given_data_dir_is_kept_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "seaweed"
    first = start_s3_server(buckets=("kept",), data_dir=data_dir)
    try:
        first.client().put_object(Bucket="kept", Key="a.txt", Body=b"persisted")
    finally:
        first.stop()
    assert data_dir.is_dir() and any(data_dir.iterdir())

    second = start_s3_server(buckets=("kept",), data_dir=data_dir)
    try:
        body = second.client().get_object(Bucket="kept", Key="a.txt")["Body"].read()
        assert body == b"persisted"
        # Keys live only in the server's memory: the first server's no longer work.
        stale = _client(second, access_key=first.access_key, secret=first.secret_key)
        with pytest.raises(botocore.exceptions.ClientError):
            stale.list_buckets()
    finally:
        second.stop()


def test_failed_start_names_the_problem_and_leaves_no_process(s3_server: S3Server) -> None:
    before = _weed_children()
    with pytest.raises(S3ServerError, match="not ready after"):
        start_s3_server(buckets=(), timeout_s=0.001)
    assert _weed_children() == before


def test_bad_arguments_are_rejected_before_starting() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        start_s3_server(timeout_s=0)
    with pytest.raises(ValueError, match="sequence of names"):
        start_s3_server(buckets="breakhis")
    for name in ("ab", "No_Such_Bucket!", "-breakhis"):
        with pytest.raises(ValueError, match=f"bucket name '{name}' is not valid"):
            start_s3_server(buckets=(name,))


def _proto_string(field_number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (enough to hand-encode a request)."""
    length = len(value)
    varint = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([field_number << 3 | 2]) + bytes(varint) + value


def _anonymous_http(port: int, method: str, path: str, body: bytes, tls: bool) -> str:
    """What an HTTP(S) request without credentials or client certificate gets from a port."""
    import http.client
    import ssl

    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return f"{response.status} {response.read()[:200]!r}"
    except (OSError, http.client.HTTPException) as err:
        return f"refused: {type(err).__name__}"
    finally:
        conn.close()


def test_no_port_but_s3_accepts_an_anonymous_write(s3_server: S3Server) -> None:
    import grpc

    key = f"anon-{uuid.uuid4().hex}"
    ports = s3_server.ports
    attempts = {}
    # The filer's HTTP API writes a file with a plain PUT; the master's /submit stores a blob
    # and hands out write tokens (/dir/assign); the volume server stores blobs by id.
    for flag, method, path in (
        ("filer.port", "PUT", f"/buckets/test/{key}"),
        ("master.port", "POST", "/submit"),
        ("master.port", "GET", "/dir/assign"),
        ("volume.port", "PUT", "/1,01637037d6"),
        ("admin.port", "GET", "/"),
    ):
        for tls in (False, True):
            answer = _anonymous_http(ports[flag], method, path, b"anonymous", tls)
            attempts[f"{'https' if tls else 'http'} {flag} {method} {path}"] = answer
    accepted = {k: v for k, v in attempts.items() if v[:1] in ("1", "2", "3")}
    assert not accepted, f"answered without credentials: {accepted}"

    # The filer's gRPC API creates entries for any caller that reaches it unless it wants a
    # client certificate.
    request = _proto_string(1, b"/buckets/test") + _proto_string(2, _proto_string(1, key.encode()))
    for flag in ("filer.port.grpc", "master.port.grpc", "volume.port.grpc", "s3.port.grpc"):
        with grpc.insecure_channel(f"127.0.0.1:{ports[flag]}") as channel:
            call = channel.unary_unary("/filer_pb.SeaweedFiler/CreateEntry")
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (flag, refused.value)

    with pytest.raises(botocore.exceptions.ClientError):
        _client(s3_server).head_object(Bucket="test", Key=key)
    # The S3 API, with the server's keys, still reads and writes.
    _client(s3_server).put_object(Bucket="test", Key=key, Body=b"signed")
    assert _client(s3_server).get_object(Bucket="test", Key=key)["Body"].read() == b"signed"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_endpoint_is_one_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    # Fewer attempts than jobs make, so that this test takes seconds; the backoff is the SDK's.
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 3)
    for call in (
        lambda: storage.exists("s3://test/x"),
        lambda: list(storage.walk("s3://test/raw")),
        lambda: storage.read_bytes("s3://test/x.png"),
        lambda: storage.write_bytes("s3://test/x.png", b"x"),
        lambda: storage.delete("s3://test/x.png"),
    ):
        started = time.monotonic()
        with pytest.raises(storage.S3UnreachableError) as err:
            call()
        assert time.monotonic() - started < 30
        message = str(err.value)
        assert f"S3 endpoint {endpoint} is unreachable" in message and "\n" not in message
    # Local paths never ask an endpoint.
    storage.check_reachable("/tmp")


@contextlib.contextmanager
def _silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts every connection and never sends a byte."""
    held: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    held.append(server.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}"
        finally:
            stop.set()
            thread.join()
            for connection in held:
                connection.close()


def test_the_reachability_check_gives_up_quickly_on_an_endpoint_that_never_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connecting works, no answer ever comes: the check fails in about 2 x its short read
    timeout, not 2 x the 60 s a job's requests wait (121 s before)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with _silent_endpoint() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        with pytest.raises(storage.S3UnreachableError) as err:
            storage.check_reachable("s3://test/prefix")
        seconds = time.monotonic() - started
    assert seconds < 4 * storage.CHECK_TIMEOUT_S, f"{seconds:.1f} s"
    message = str(err.value)
    assert f"S3 endpoint {endpoint} is unreachable" in message and "\n" not in message
    assert f"{storage.CHECK_TIMEOUT_S:g} s read timeout" in message


def test_a_command_fails_in_seconds_when_the_endpoint_does_not_answer(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    for argv in (["prepare", "s3://test/raw", str(tmp_path / "out")], ["synth", "s3://test/raw"]):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "breakhis.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        elapsed = time.monotonic() - started
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith(f"breakhis {argv[0]}: error: S3 endpoint {endpoint} ")
        assert elapsed < 20, f"{argv[0]} took {elapsed:.1f} s to fail"
    assert not (tmp_path / "out").exists()
