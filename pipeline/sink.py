"""Write: the Parquet dataset under --output, and what the run wrote.

Rows are written to a staging folder inside the output (`_staging/RUN_ID/`, which readers skip:
pyarrow, pandas and DuckDB ignore names starting with `_`), then moved next to `_SUCCESS` when the
run completed. A rerun replaces the previous run's files, so each (id, prompt) appears once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.dataset as pads

from pipeline.config import RunConfig
from pipeline.schemas import output_arrow_schema
from pipeline.storage import arrow_filesystem, filesystem, join, protocol_of


@dataclass
class WriteResult:
    files: list[str]
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_error_type: Counter = field(default_factory=Counter)
    sources: set = field(default_factory=set)  # manifest rows (file:line) that have output rows


def staging_uri(cfg: RunConfig) -> str:
    return join(cfg.output, "_staging", cfg.run_id)


def write(ds, cfg: RunConfig) -> None:
    """Stream the dataset into the staging folder (this is what executes the pipeline)."""
    fs, path = arrow_filesystem(staging_uri(cfg), cfg.storage)
    ds.write_parquet(path, filesystem=fs)


def _uri(fs_path: str, like: str) -> str:
    proto = protocol_of(like)
    return fs_path if proto == "file" else f"{proto}://{fs_path}"


def staged(cfg: RunConfig) -> WriteResult:
    """What this run wrote to staging: files, row counts by status and error type, sources."""
    fs, staged_dir = filesystem(staging_uri(cfg), cfg.storage)
    fs.invalidate_cache()  # the files were written by other processes: never trust a cached listing
    files = sorted(p for p in fs.find(staged_dir) if p.endswith(".parquet"))
    result = WriteResult(files=[_uri(p, cfg.output) for p in files])
    if files:
        afs, _ = arrow_filesystem(cfg.output, cfg.storage)
        table = pads.dataset(files, schema=output_arrow_schema(), format="parquet", filesystem=afs).to_table(
            columns=["status", "error_type", "source"])
        result.rows = table.num_rows
        result.by_status.update(table.column("status").to_pylist())
        result.by_error_type.update(e for e in table.column("error_type").to_pylist() if e)
        result.sources.update(table.column("source").to_pylist())
    return result


def commit(cfg: RunConfig, result: WriteResult, summary: dict) -> list[str]:
    """Replace the previous output with this run's staged files and write `_SUCCESS`."""
    fs, out = filesystem(cfg.output, cfg.storage)
    fs.makedirs(out, exist_ok=True)  # an empty manifest writes no file, but the run still completed
    fs.invalidate_cache()
    for p in fs.ls(out, detail=False):
        if p.endswith(".parquet"):
            fs.rm(p)
    files = []
    for uri in result.files:
        src = filesystem(uri, cfg.storage)[1]
        dest = join(out, f"{cfg.run_id}-{src.rsplit('/', 1)[-1]}")
        fs.mv(src, dest)
        files.append(_uri(dest, cfg.output))
    staging_root = join(out, "_staging")
    fs.invalidate_cache()
    if fs.exists(join(staging_root, cfg.run_id)):
        fs.rm(join(staging_root, cfg.run_id), recursive=True)
    if fs.exists(staging_root) and not fs.ls(staging_root):
        fs.rm(staging_root, recursive=True)
    summary = dict(summary, rows=result.rows, by_status=dict(result.by_status),
                   by_error_type=dict(result.by_error_type), files=files)
    with fs.open(join(out, "_SUCCESS"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return files
