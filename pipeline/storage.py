"""Transport: URI -> file object or filesystem, through fsspec (local, file://, s3://, gs://, ...)."""

from __future__ import annotations

import fsspec
from fsspec.core import url_to_fs

from pipeline.config import StorageConfig


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, storage: StorageConfig):
    """(fsspec filesystem, path inside it) for a URI."""
    return url_to_fs(uri, **storage.fsspec_options(protocol_of(uri)))


def open_binary(uri: str, storage: StorageConfig):
    """A seekable binary file object. Remote files are read in ranges, never copied whole first."""
    return fsspec.open(uri, "rb", **storage.fsspec_options(protocol_of(uri))).open()


def arrow_filesystem(uri: str, storage: StorageConfig):
    """(pyarrow filesystem, path) for writers that take a pyarrow filesystem (Ray Data's write_parquet)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])
