"""The output folder of a run, resolved once: its fsspec filesystem and path, its pyarrow
filesystem, and the names inside it that the commit protocol uses (pipeline/output/commit.py).

    OUTPUT/part-RUN_ID-*.parquet     committed rows
    OUTPUT/_runs/RUN_ID.json         ledgers
    OUTPUT/_SUCCESS                  the ledger of the last committed run
    OUTPUT/_staging/RUN_ID/          runs in flight
    OUTPUT/_lease/                   the writer's lease (pipeline/output/lease.py)

Paths are the filesystem's own (no scheme); `uri_of` turns one back into a URI for messages.
Sent to Ray tasks, a location travels as its URI and storage settings and is resolved there again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from pipeline.config import StorageConfig
from pipeline.io.storage import filesystem, is_local, join, protocol_of


@dataclass(frozen=True, eq=False)
class OutputLocation:
    uri: str  # as the user gave it (--output)
    storage: StorageConfig
    fs: object = field(repr=False)
    path: str  # the folder inside `fs`

    @classmethod
    def of(cls, uri: str, storage: StorageConfig) -> OutputLocation:
        fs, path = filesystem(uri, storage)
        return cls(uri=uri, storage=storage, fs=fs, path=path.rstrip("/") or path)

    def __reduce__(self):
        return OutputLocation.of, (self.uri, self.storage)

    @cached_property
    def arrow(self):
        """The same filesystem for pyarrow readers and writers (Ray Data's write_parquet)."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    def child(self, *parts: str) -> str:
        return join(self.path, *parts)

    @property
    def staging_root(self) -> str:
        return self.child("_staging")

    def staging(self, run_id: str) -> str:
        return join(self.staging_root, run_id)

    def ledger(self, run_id: str) -> str:
        return self.child("_runs", f"{run_id}.json")

    @property
    def success(self) -> str:
        return self.child("_SUCCESS")

    def uri_of(self, path: str) -> str:
        """A path inside the output's filesystem as a URI (for messages and ledgers)."""
        proto = protocol_of(self.uri)
        return path if proto == "file" else f"{proto}://{path}"

    def part_files(self) -> dict[str, int]:
        """{committed Parquet file: bytes}: the output's top-level `.parquet` files, hidden and `_` names skipped."""
        self.fs.invalidate_cache()  # other processes write here: never trust a cached listing
        if not self.fs.exists(self.path):
            return {}
        return {i["name"]: i["size"] for i in self.fs.ls(self.path, detail=True) if i["type"] == "file"
                and i["name"].endswith(".parquet") and not i["name"].rsplit("/", 1)[-1].startswith(("_", "."))}


def _prefix(proto: str, path: str) -> str:
    """`scheme://path/`, local paths with symlinks resolved, for prefix comparisons."""
    proto = {"s3a": "s3", "local": "file"}.get(proto, proto)
    if proto == "file":
        path = os.path.realpath(path)
    return f"{proto}://{path.rstrip('/')}/"


def output_overlaps_manifest(out: OutputLocation, manifest: str) -> str | None:
    """Why the output and --manifest may not be used together, or None. An output inside the manifest
    prefix would be scanned as manifest rows by the next run (its ledgers, its Parquet files);
    a manifest inside the output would be read as committed rows."""
    output = _prefix(protocol_of(out.uri), out.path)
    inputs = _prefix(protocol_of(manifest), filesystem(manifest, out.storage)[1])
    if output.startswith(inputs):
        return (f"--output {out.uri} is inside the manifest prefix {manifest}: the next run would read "
                "the output's own files as manifest rows. Write the output outside the manifest prefix.")
    if inputs.startswith(output):
        return (f"--manifest {manifest} is inside --output {out.uri}: the run would read it as committed "
                "output. Keep manifests outside the output prefix.")
    return None
