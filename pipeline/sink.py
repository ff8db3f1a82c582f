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
from pipeline.storage import arrow_filesystem, filesystem, join, protocol_of


@dataclass
class WriteResult:
    files: list[str]
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_error_type: Counter = field(default_factory=Counter)


def staging_uri(cfg: RunConfig) -> str:
    return join(cfg.output, "_staging", cfg.run_id)


def write(ds, cfg: RunConfig) -> None:
    """Stream the dataset into the staging folder (this is what executes the pipeline)."""
    fs, path = arrow_filesystem(staging_uri(cfg), cfg.storage)
    ds.write_parquet(path, filesystem=fs)


def _uri(fs_path: str, like: str) -> str:
    proto = protocol_of(like)
    return fs_path if proto == "file" else f"{proto}://{fs_path}"


def tally(files: list[str], cfg: RunConfig) -> WriteResult:
    """Count rows by status and error type, reading only those two columns."""
    result = WriteResult(files=files)
    if not files:
        return result
    fs, _ = arrow_filesystem(cfg.output, cfg.storage)
    paths = [filesystem(f, cfg.storage)[1] for f in files]
    table = pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["status", "error_type"])
    result.rows = table.num_rows
    result.by_status.update(table.column("status").to_pylist())
    result.by_error_type.update(e for e in table.column("error_type").to_pylist() if e)
    return result


def commit(cfg: RunConfig, summary: dict) -> WriteResult:
    """Replace the previous output with this run's staged files and write `_SUCCESS`."""
    fs, out = filesystem(cfg.output, cfg.storage)
    _, staged_dir = filesystem(staging_uri(cfg), cfg.storage)
    staged = sorted(p for p in fs.find(staged_dir) if p.endswith(".parquet"))
    result = tally([_uri(p, cfg.output) for p in staged], cfg)
    fs.makedirs(out, exist_ok=True)  # an empty manifest writes no file, but the run still completed
    previous = [p for p in fs.ls(out, detail=False) if p.endswith(".parquet")]
    for p in previous:
        fs.rm(p)
    files = []
    for p in staged:
        dest = join(out, f"{cfg.run_id}-{p.rsplit('/', 1)[-1]}")
        fs.mv(p, dest)
        files.append(_uri(dest, cfg.output))
    if fs.exists(staged_dir):
        fs.rm(staged_dir, recursive=True)
    staging_root = join(out, "_staging")
    if fs.exists(staging_root) and not fs.ls(staging_root):
        fs.rm(staging_root, recursive=True)
    result.files = files
    summary = dict(summary, rows=result.rows, by_status=dict(result.by_status),
                   by_error_type=dict(result.by_error_type), files=files)
    with fs.open(join(out, "_SUCCESS"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return result
