"""Local paths and ``s3://`` URIs behind one small set of file operations.

S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_REGION`` ...), so MinIO, moto or any S3-compatible store
works the same way as AWS. Pure pyarrow: no Ray, no torch.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    # Transient errors (throttling, resets, 5xx) are retried by the S3 client itself; AWS_MAX_ATTEMPTS is the
    # standard AWS setting for how often.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=_max_attempts())
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


DEFAULT_MAX_ATTEMPTS = 5


def _max_attempts() -> int:
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)))
    except ValueError:
        return DEFAULT_MAX_ATTEMPTS


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    if is_remote(uri):
        parsed = urlparse(uri)
        return _s3_filesystem(), (parsed.netloc + parsed.path).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(uri: str) -> int:
    """Size in bytes of the file at ``uri``; FileNotFoundError when there is none."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file")
    return int(info.size)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers never see it half-written.

    Locally it goes to a temporary name and is renamed into place; an S3 PUT is atomic by itself.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_dir(uri: str) -> bool:
    """A folder (locally), or a prefix with objects under it (S3)."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def modified(uri: str) -> Optional[float]:
    """Last-modified time (seconds since the epoch) of the file at ``uri``; None when there is none."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound or info.mtime is None:
        return None
    return info.mtime.timestamp()


def list_names(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under a folder; [] when it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's files (recursively) to a local path or ``s3://`` URI."""
    local_dir = Path(local_dir)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        write_bytes(join(uri, *file.relative_to(local_dir).parts), file.read_bytes())
