"""Write: the Parquet dataset under --output, committed so that no row is lost or written twice.

    OUTPUT/part-RUN_ID-*.parquet     committed rows (pyarrow, pandas and DuckDB read the folder)
    OUTPUT/_runs/RUN_ID.json         the ledger of each committed run: its files, counts, config
    OUTPUT/_SUCCESS                  the ledger of the last committed run
    OUTPUT/_staging/RUN_ID/          a run in flight (readers skip names starting with `_`)

A run streams its rows into its staging folder. When every manifest row has output there, the
driver writes `_staging/RUN_ID/_COMPLETE.json` (one atomic PUT: the commit point), then moves each
file into place (a copy then a delete on S3) and writes the ledger. A run that finds a completed
staging folder finishes that commit first (a crash between copy and delete is finished, not redone);
a staging folder without `_COMPLETE.json` belongs to a run that died and is removed. Items already
committed are skipped, so a rerun adds only what is missing, and nothing is ever deleted from
the committed output. One run at a time may write to an output.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.dataset as pads

from pipeline.config import RunConfig
from pipeline.schemas import output_arrow_schema
from pipeline.storage import arrow_filesystem, filesystem, join, protocol_of

log = logging.getLogger("pipeline")
COMPLETE = "_COMPLETE.json"


@dataclass
class WriteResult:
    files: list[str]
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_error_type: Counter = field(default_factory=Counter)
    sources: set = field(default_factory=set)  # manifest rows (file:line) that have output rows


def staging_uri(cfg: RunConfig, run_id: str | None = None) -> str:
    return join(cfg.output, "_staging", run_id or cfg.run_id)


def write(ds, cfg: RunConfig) -> None:
    """Stream the dataset into the staging folder (this is what executes the pipeline)."""
    fs, path = arrow_filesystem(staging_uri(cfg), cfg.storage)
    ds.write_parquet(path, filesystem=fs)


def _uri(fs_path: str, like: str) -> str:
    proto = protocol_of(like)
    return fs_path if proto == "file" else f"{proto}://{fs_path}"


def _read(paths: list[str], cfg: RunConfig, columns: list[str]):
    afs, _ = arrow_filesystem(cfg.output, cfg.storage)
    return pads.dataset(paths, schema=output_arrow_schema(), format="parquet", filesystem=afs).to_table(columns=columns)


def committed(cfg: RunConfig) -> tuple[set, set]:
    """(ids, sources of id-less rows) that the committed output already holds."""
    fs, out = filesystem(cfg.output, cfg.storage)
    fs.invalidate_cache()
    if not fs.exists(out):
        return set(), set()
    files = [p for p in fs.ls(out, detail=False) if p.endswith(".parquet")]
    if not files:
        return set(), set()
    table = _read(files, cfg, ["id", "source"])
    ids = set(table.column("id").to_pylist())
    sources = {s for i, s in zip(table.column("id").to_pylist(), table.column("source").to_pylist()) if i is None}
    ids.discard(None)
    return ids, sources


def staged(cfg: RunConfig) -> WriteResult:
    """What this run wrote to staging: files, row counts by status and error type, sources."""
    fs, staged_dir = filesystem(staging_uri(cfg), cfg.storage)
    fs.invalidate_cache()  # the files were written by other processes: never trust a cached listing
    files = sorted(p for p in fs.find(staged_dir) if p.endswith(".parquet")) if fs.exists(staged_dir) else []
    result = WriteResult(files=[_uri(p, cfg.output) for p in files])
    if files:
        table = _read(files, cfg, ["status", "error_type", "source"])
        result.rows = table.num_rows
        result.by_status.update(table.column("status").to_pylist())
        result.by_error_type.update(e for e in table.column("error_type").to_pylist() if e)
        result.sources.update(table.column("source").to_pylist())
    return result


def commit(cfg: RunConfig, result: WriteResult, ledger: dict) -> None:
    """Mark the staged run complete (the commit point), then move its files into place."""
    fs, _ = filesystem(cfg.output, cfg.storage)
    names = [filesystem(f, cfg.storage)[1].rsplit("/", 1)[-1] for f in result.files]
    ledger = dict(ledger, rows=result.rows, by_status=dict(result.by_status),
                  by_error_type=dict(result.by_error_type), files=[f"part-{cfg.run_id}-{n}" for n in names])
    staged_dir = filesystem(staging_uri(cfg), cfg.storage)[1]
    fs.makedirs(staged_dir, exist_ok=True)  # a run with nothing to write still leaves its ledger
    with fs.open(join(staged_dir, COMPLETE), "w") as f:
        json.dump({"staged": names, "ledger": ledger}, f, indent=2, default=str)
    _finish(cfg, cfg.run_id)


def _finish(cfg: RunConfig, run_id: str) -> None:
    """Idempotently move a completed staging folder's files into place and write its ledger."""
    fs, out = filesystem(cfg.output, cfg.storage)
    staged_dir = filesystem(staging_uri(cfg, run_id), cfg.storage)[1]
    with fs.open(join(staged_dir, COMPLETE)) as f:
        complete = json.load(f)
    fs.makedirs(out, exist_ok=True)
    for name, final in zip(complete["staged"], complete["ledger"]["files"]):
        src, dest = join(staged_dir, name), join(out, final)
        if not fs.exists(dest):
            fs.copy(src, dest)
        if fs.exists(src):
            fs.rm(src)
    body = json.dumps(complete["ledger"], indent=2, default=str)
    fs.makedirs(join(out, "_runs"), exist_ok=True)
    with fs.open(join(out, "_runs", f"{run_id}.json"), "w") as f:
        f.write(body)
    with fs.open(join(out, "_SUCCESS"), "w") as f:
        f.write(body)
    fs.rm(staged_dir, recursive=True)


def recover(cfg: RunConfig) -> list[str]:
    """Finish commits that a crash interrupted; drop staging folders of runs that never completed.
    Returns the run ids whose commits were finished."""
    fs, _ = filesystem(cfg.output, cfg.storage)
    root = filesystem(join(cfg.output, "_staging"), cfg.storage)[1]
    fs.invalidate_cache()
    finished = []
    if not fs.exists(root):
        return finished
    for path in fs.ls(root, detail=False):
        run_id = path.rstrip("/").rsplit("/", 1)[-1]
        if fs.exists(join(path, COMPLETE)):
            log.info("finishing the interrupted commit of run %s", run_id)
            _finish(cfg, run_id)
            finished.append(run_id)
        else:
            log.info("removing the staging files of run %s, which did not complete", run_id)
            fs.rm(path, recursive=True)
    fs.invalidate_cache()
    return finished
