"""One place that turns a URI into a filesystem and a path.

A URI is either ``s3://bucket/key`` or a local path (``file://`` accepted).
S3 settings come only from the standard AWS environment variables or the
cluster's IAM role, never from code or configs:

- ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``): an S3-compatible server,
  e.g. ``http://127.0.0.1:8333`` for the embedded SeaweedFS;
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (read by the AWS SDK's
  own credential chain, so instance roles work too);
- ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``).

Every S3 request has a connect timeout (5 s) and a read timeout (60 s), and is retried a
bounded number of times (8 attempts, backing off, so a 10 s outage mid-job is survived);
an endpoint that still cannot be reached raises S3UnreachableError, one line naming the
endpoint. ``check_reachable`` asks once, with one retry and a 5 s read timeout, for
commands to fail in seconds before starting any work (also on an endpoint that accepts
connections and never answers).

Transient and permanent errors (``is_transient``): no answer, a timeout, throttling
(SlowDown) or a 5xx may pass, and ``read_retrying`` tries again with backoff, then raises
TransientStorageError: the caller's task fails (Ray retries it, or the job fails and is
rerun); such an error is never recorded as a result. A missing object (NoSuchKey), a refusal
(403) or an object over a size cap (ObjectTooLargeError) is permanent: raised at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from breakhis import faults

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
RETRY_ATTEMPTS = 8
CHECK_TIMEOUT_S = 5.0
"""Read timeout of ``check_reachable``'s request: a bucket lookup answers in milliseconds, so
an endpoint that accepts the connection and never answers fails the check in ~2 x 5 s."""
# What the AWS SDK says when no answer came (refused, reset, DNS, timeout), as opposed to
# an answer such as AccessDenied or NoSuchBucket.
_NETWORK_ERRORS = ("NETWORK_CONNECTION", "curlCode", "Timeout was reached", "timed out")
# And what it says for answers that ask to try again: throttling, timeouts, 5xx.
_TRANSIENT_ANSWERS = (
    "SLOW_DOWN",
    "SlowDown",
    "reduce your request rate",
    "THROTTLING",
    "Throttl",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "REQUEST_TIMEOUT",
    "RequestTimeout",
    "(HTTP status 5",
)
_TRANSIENT_ERRNOS = (errno.ETIMEDOUT, errno.EAGAIN, errno.ECONNRESET, errno.ESTALE)
READ_ATTEMPTS = 4
"""Attempts of ``read_retrying`` (each one the SDK's own RETRY_ATTEMPTS requests)."""
READ_BACKOFF_S = 0.5
"""First wait between two attempts of ``read_retrying``; doubled each time, with jitter."""


class S3UnreachableError(ConnectionError):
    """The S3 endpoint gave no answer (refused, reset, unknown host or timed out)."""


class TransientStorageError(OSError):
    """A storage error that may pass (no answer, timeout, throttling, 5xx), still there after
    the retries: the task fails, to be retried or rerun; never a result."""


class ObjectTooLargeError(ValueError):
    """An object larger than the cap a reader set (permanent: the object is not read)."""

    def __init__(self, uri: str, size: int, cap: int) -> None:
        super().__init__(f"{uri}: {_mib(size)}, over the cap of {_mib(cap)}")
        self.size, self.cap = size, cap


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@dataclass(frozen=True)
class FileEntry:
    """One file found under a URI."""

    uri: str
    size: int


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def endpoint_name() -> str:
    """The S3 endpoint requests go to: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS's
    regional endpoint (for messages; holds no credentials)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint or f"https://s3.{_region()}.amazonaws.com"


def s3_filesystem(
    retry_attempts: int | None = None, request_timeout_s: float = REQUEST_TIMEOUT_S
) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the AWS environment variables, with the
    module's connect timeout, ``request_timeout_s`` to read an answer (on Linux the SDK's
    low-speed limit: no byte for that long) and ``retry_attempts`` attempts per request
    (None: RETRY_ATTEMPTS).

    Credentials are left to the AWS SDK's default chain (environment, shared
    config, instance role), so they never pass through this code.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": _region(),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(retry_attempts or RETRY_ATTEMPTS),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible servers (SeaweedFS, MinIO) want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def _unreachable(
    uri: str, err: OSError, attempts: int, read_timeout_s: float = REQUEST_TIMEOUT_S
) -> S3UnreachableError | None:
    """The one-line error for an SDK error that means no answer came, else None."""
    text = str(err)
    if not any(marker in text for marker in _NETWORK_ERRORS):
        return None
    reason = text.split("Details:", 1)[-1].strip().splitlines()[0]
    return S3UnreachableError(
        f"S3 endpoint {endpoint_name()} is unreachable ({reason}; {attempts} attempt(s), "
        f"{CONNECT_TIMEOUT_S:g} s connect and {read_timeout_s:g} s read timeout) while "
        f"accessing {uri}; check AWS_ENDPOINT_URL and the network"
    )


@contextlib.contextmanager
def _naming_the_endpoint(uri: str) -> Iterator[None]:
    """Raise S3UnreachableError instead of the SDK's OSError when nothing answered."""
    try:
        yield
    except OSError as err:
        unreachable = _unreachable(uri, err, RETRY_ATTEMPTS) if is_s3(uri) else None
        if unreachable is None or isinstance(err, S3UnreachableError):
            raise
        raise unreachable from err


def check_reachable(uri: str) -> None:
    """Ask the S3 endpoint of ``uri`` about its bucket with two attempts, so that a command
    fails within seconds, before any work, when nothing answers. Any answer, even
    AccessDenied or NoSuchBucket, counts as reachable. Local paths are not checked.

    Raises S3UnreachableError naming the endpoint.
    """
    if not is_s3(uri):
        return
    bucket = uri[len("s3://") :].strip("/").split("/", 1)[0]
    try:
        s3_filesystem(retry_attempts=2, request_timeout_s=CHECK_TIMEOUT_S).get_file_info(bucket)
    except OSError as err:
        unreachable = _unreachable(uri, err, attempts=2, read_timeout_s=CHECK_TIMEOUT_S)
        if unreachable is not None:
            raise unreachable from err


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI.

    ``s3://bucket/key`` gives an S3 filesystem and ``bucket/key``; anything
    else is a local path, made absolute. Raises ValueError for other schemes.
    """
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise ValueError(f"{uri!r}: an s3:// URI needs a bucket, e.g. s3://bucket/prefix")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"{uri!r}: unsupported scheme; accepted: s3://bucket/key or a local path")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def location(uri: str) -> tuple[str, ...]:
    """A URI as comparable path parts: ``("s3", bucket, key parts...)`` or ``("file", parts of
    the absolute, symlink-resolved local path...)``; ``a//b/`` and ``a/b`` compare equal, and
    so do a folder and a symlink to it. ``a[: len(b)] == b``: ``a`` is ``b`` or inside it."""
    if is_s3(uri):
        return ("s3", *(part for part in uri[len("s3://") :].split("/") if part))
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return ("file", *(part for part in os.path.realpath(path).split(os.sep) if part))


def file_in_the_way(uri: str) -> str | None:
    """The local file that keeps ``uri`` from being or becoming a folder (the path itself,
    or its nearest existing parent, when that is not a folder); None when nothing is in the
    way, and for s3:// URIs (a key and a prefix of the same name can both exist)."""
    if is_s3(uri):
        return None
    path = resolve(uri)[1]
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (s3:// URIs as they are): for what runs in
    another working directory (Tune trials run in their own)."""
    return uri if is_s3(uri) else resolve(uri)[1]


def for_ray(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(path, filesystem)`` for Ray's storage_path/storage_filesystem options: the
    bucket path and this module's S3 filesystem (its endpoint, timeouts and credentials
    chain) for s3:// URIs; an absolute local path and None (Ray's own) otherwise."""
    fs, path = resolve(uri)
    return (path, fs) if is_s3(uri) else (path, None)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (works for s3:// and local)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,119}")
_HASHED_NAME = re.compile(r".*-[0-9a-f]{16}")


def safe_name(text: str) -> str:
    """A file name made from data (e.g. a tile id), never a path: ``text`` itself when it
    is a plain name (letters, digits, ``.``, ``_``, ``-``, not starting with a dot, at
    most 120 characters), else a slug of it (other characters as ``_``, at most 80) plus
    ``-`` and 16 hex digits of its SHA-256. Stable, and two texts never share a name: a
    plain name that looks hashed is hashed too."""
    if _PLAIN_NAME.fullmatch(text) and not _HASHED_NAME.fullmatch(text):
        return text
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80].lstrip(".")
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI for a path on a filesystem returned by resolve()."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def walk(uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[FileEntry]:
    """Yield every file below ``uri`` (any depth), sorted by URI.

    ``suffixes`` keeps only names ending in one of them (case-insensitive).
    Raises FileNotFoundError naming the URI when nothing exists there.
    """
    fs, path = resolve(uri)
    with _naming_the_endpoint(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri}: no such file or folder")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    entries = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        if wanted and not item.base_name.lower().endswith(wanted):
            continue
        entries.append(FileEntry(uri=to_uri(fs, item.path), size=item.size or 0))
    yield from sorted(entries, key=lambda e: e.uri)


def exists(uri: str) -> bool:
    """True when a file or folder exists at the URI."""
    fs, path = resolve(uri)
    with _naming_the_endpoint(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    """True when a file (not a folder) exists at the URI."""
    fs, path = resolve(uri)
    with _naming_the_endpoint(uri):
        return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole content of one file. Raises FileNotFoundError naming the URI, and
    ObjectTooLargeError, before reading it, for a file over ``max_bytes``."""
    faults.before_read(uri)
    fs, path = resolve(uri)
    try:
        # An input file knows its size before any byte is read (on S3 from the HEAD request
        # that opening it makes anyway; then one ranged GET).
        with _naming_the_endpoint(uri), fs.open_input_file(path) as stream:
            size = stream.size()
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLargeError(uri, size, max_bytes)
            return stream.read(size)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri}: no such file") from err


def is_transient(err: BaseException) -> bool:
    """True for an error that may pass if the same request is made again: no answer, a
    timeout, throttling (SlowDown), a 5xx; False for a missing object, a refusal (403), a
    local file problem or anything else."""
    if isinstance(err, TransientStorageError | ConnectionError | TimeoutError):
        return True
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if not isinstance(err, OSError):
        return False
    if err.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(err)
    return any(marker in text for marker in _NETWORK_ERRORS + _TRANSIENT_ANSWERS)


def retrying(call: Callable[[], T], uri: str, attempts: int | None = None) -> T:
    """``call()``, made again after a transient error (``is_transient``) with exponential
    backoff (READ_BACKOFF_S, doubled, with jitter), ``attempts`` times in all (None:
    READ_ATTEMPTS). Raises TransientStorageError naming ``uri`` when every attempt failed
    so; any other error at once."""
    attempts, attempt = attempts or READ_ATTEMPTS, 1
    while True:
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise TransientStorageError(
                    f"{uri}: {err} (still failing after {attempts} attempts)"
                ) from err
            wait = READ_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("%s: %s; trying again in %.1f s", uri, err, wait)
            time.sleep(wait)
            attempt += 1


def read_retrying(uri: str, max_bytes: int | None = None) -> bytes:
    """``read_bytes`` made through ``retrying``: the bytes, or TransientStorageError after
    READ_ATTEMPTS transient failures; FileNotFoundError, ObjectTooLargeError or any other
    permanent error at once."""
    return retrying(lambda: read_bytes(uri, max_bytes), uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that a reader never sees it half-written.

    Locally: write a hidden temp file beside it, then rename (replace_durably). On S3 a
    single PUT is atomic by itself.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.S3FileSystem):
        with _naming_the_endpoint(uri), fs.open_output_stream(path) as out:
            out.write(data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    replace_durably(os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp"), path, data)


def replace_durably(tmp: str, path: str, data: bytes) -> None:
    """Write ``data`` to the local file ``tmp``, fsync it, rename it to ``path`` and fsync
    the folder: after a crash (power, kernel) ``path`` is the old file or the whole new
    one, never an empty or torn one (a rename can reach the disk before the data does)."""
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def delete(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError), _naming_the_endpoint(uri):
        fs.delete_file(path)


def make_dirs(uri: str) -> None:
    """Create a local folder (no-op on S3, where folders are implicit)."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(path, recursive=True)
