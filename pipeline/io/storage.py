"""Transport: URI -> file object or filesystem, through fsspec (local, file://, s3://, gs://, ...)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import BinaryIO

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


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def write_whole(fs, path: str, content: bytes | Callable[[BinaryIO], object], *, exclusive: bool = False,
                check: Callable[[str], None] | None = None) -> None:
    """Write a file in one step: readers see the old file or the new one, never a part; a crash
    leaves at most a temporary named `_...` (readers skip `_` names). The one way the project
    writes a file that others read (ledgers, commit points, leases, committed Parquet).

    `content`: the bytes, or a function that writes them to a binary file (a Parquet writer, a copy).
    `check(path)`: called on the written temporary (a local file); it raises if that is not what
    was meant, and then nothing is placed. `exclusive`: create the name or raise FileExistsError,
    so that of several writers exactly one succeeds.
    Object stores: one PUT (If-None-Match: * when exclusive; a large file is a multipart upload,
    visible only once complete), from a local temporary when `content` is a function or `check`
    is given. Local and NFS: a temporary `_` name in the same folder, synced, then renamed (or,
    when exclusive, hard-linked: a link fails on an existing name), and the folder synced."""
    mode = {"mode": "create"} if exclusive else {}
    if not is_local(fs):
        if not callable(content) and check is None:
            fs.pipe_file(path, content, **mode)
            return
        with tempfile.TemporaryDirectory(prefix="pipeline-write-") as folder:
            tmp = os.path.join(folder, "part")
            _write_synced(tmp, content, check)
            fs.put_file(tmp, path, **mode)
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/_{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_synced(tmp, content, check)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if exclusive or os.path.exists(tmp):
                os.unlink(tmp)
    _sync_folder(folder)


def _write_synced(path: str, content, check) -> None:
    with open(path, "wb") as f:
        content(f) if callable(content) else f.write(content)
        f.flush()
        os.fsync(f.fileno())
    if check is not None:
        check(path)


def _sync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (a crash right after it may otherwise undo it)."""
    with contextlib.suppress(OSError):  # some filesystems refuse to sync a folder: the rename still holds
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def put_whole(fs, path: str, data: bytes) -> None:
    """write_whole of bytes, replacing any file of that name."""
    write_whole(fs, path, data)


def create_whole(fs, path: str, data: bytes) -> None:
    """write_whole of bytes to a new name, or FileExistsError: of several writers exactly one succeeds."""
    write_whole(fs, path, data, exclusive=True)
