"""One place that turns a URI into a filesystem and a path.

A URI is either ``s3://bucket/key`` or a local path (``file://`` accepted).
S3 settings come only from the standard AWS environment variables or the
cluster's IAM role, never from code or configs:

- ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``): an S3-compatible server,
  e.g. ``http://127.0.0.1:8333`` for the embedded SeaweedFS;
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (read by the AWS SDK's
  own credential chain, so instance roles work too);
- ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class FileEntry:
    """One file found under a URI."""

    uri: str
    size: int


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the AWS environment variables.

    Credentials are left to the AWS SDK's default chain (environment, shared
    config, instance role), so they never pass through this code.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {"region": region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(10)}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible servers (SeaweedFS, MinIO) want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


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


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (works for s3:// and local)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI for a path on a filesystem returned by resolve()."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def walk(uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[FileEntry]:
    """Yield every file below ``uri`` (any depth), sorted by URI.

    ``suffixes`` keeps only names ending in one of them (case-insensitive).
    Raises FileNotFoundError naming the URI when nothing exists there.
    """
    fs, path = resolve(uri)
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
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole content of one file. Raises FileNotFoundError naming the URI."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri}: no such file") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that a reader never sees it half-written.

    Locally: write a hidden temp file beside it, then rename. On S3 a single
    PUT is atomic by itself.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def delete(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def make_dirs(uri: str) -> None:
    """Create a local folder (no-op on S3, where folders are implicit)."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(path, recursive=True)
