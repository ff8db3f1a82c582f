"""Transport: URI -> file object or filesystem, through fsspec (local, file://, s3://, gs://, ...)."""

from __future__ import annotations

import os
import uuid

from fsspec.core import url_to_fs

from pipeline.config import StorageConfig


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, storage: StorageConfig):
    """(fsspec filesystem, path inside it) for a URI."""
    fs, path = url_to_fs(uri, **storage.fsspec_options(protocol_of(uri)))
    if hasattr(fs, "retries"):
        # s3fs retries each call 5 times around botocore, which retries too (max_attempts):
        # 25 requests per read against a store that stays down. botocore's backoff is enough.
        fs.retries = 1
    return fs, path


def open_binary(uri: str, storage: StorageConfig):
    """A seekable binary file object. Remote files are read in ranges, never copied whole first;
    http(s) connections go only to public addresses checked at connect time, redirects are refused
    (pipeline/io/pinned_http.py)."""
    if protocol_of(uri) in ("http", "https"):
        from pipeline.io.pinned_http import open_http

        return open_http(uri, storage.connect_timeout_s, storage.read_timeout_s)
    fs, path = filesystem(uri, storage)
    return fs.open(path, "rb")


def arrow_filesystem(uri: str, storage: StorageConfig):
    """(pyarrow filesystem, path) for writers that take a pyarrow filesystem (Ray Data's write_parquet)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def put_whole(fs, path: str, data: bytes) -> None:
    """Write a file in one step: readers see the old content or the new, never a part.
    Object stores: one PUT. Local and NFS: a temporary `_` name in the same folder, then a rename."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/_{name}.{uuid.uuid4().hex[:8]}.tmp"
    _write_synced(tmp, data)
    os.replace(tmp, path)


def create_whole(fs, path: str, data: bytes) -> None:
    """Create a file in one step, or raise FileExistsError if the name exists: of several writers
    exactly one succeeds. S3: a PUT with If-None-Match: *. Local and NFS: written under a
    temporary name, then hard-linked to the final one (link fails on an existing name)."""
    if not is_local(fs):
        fs.pipe_file(path, data, mode="create")
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/_{name}.{uuid.uuid4().hex[:8]}.tmp"
    _write_synced(tmp, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
