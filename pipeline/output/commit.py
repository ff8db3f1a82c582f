"""Write: the Parquet dataset under --output, committed so that no row is lost or written twice.

    OUTPUT/part-RUN_ID-*.parquet     committed rows (pyarrow, pandas and DuckDB read the folder)
    OUTPUT/_runs/RUN_ID.json         the ledger of each committed run: its files, counts, config
    OUTPUT/_SUCCESS                  the ledger of the last committed run
    OUTPUT/_staging/RUN_ID/          a run in flight (readers skip names starting with `_`)

A run streams its rows into its staging folder. When every manifest row has output there, the
driver writes `_staging/RUN_ID/_COMPLETE.json` (the commit point, written in one step: one PUT, or
locally a rename), then moves each file into place and writes the ledger. A move never leaves a
part of a file under a final name: on S3 a server-side copy (atomic), locally a copy under a `_`
temporary name in the output folder, synced, then renamed. The staged file is deleted only after
its copy is checked against the size and row count recorded in the commit point. A run that finds
a completed staging folder finishes that commit first (a crash mid-move is finished, not redone);
a staging folder without a whole `_COMPLETE.json` belongs to a run that died and is removed. Items
already committed are skipped, so a rerun adds only what is missing, and nothing is ever deleted
from the committed output. One run at a time writes to an output: it holds the output's lease
(pipeline/output/lease.py) from before its recovery to the end of its commit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.io.storage import arrow_filesystem, filesystem, is_local, join, protocol_of, put_whole
from pipeline.quality.figures import QualityCounts
from pipeline.schemas import output_arrow_schema

log = logging.getLogger("pipeline")
COMPLETE = "_COMPLETE.json"


@dataclass
class WriteResult:
    files: list[str]
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_error_type: Counter = field(default_factory=Counter)
    quality: QualityCounts = field(default_factory=QualityCounts)  # rows per quality flag and finish reason


def staging_uri(cfg: RunConfig, run_id: str | None = None) -> str:
    return join(cfg.output, "_staging", run_id or cfg.run_id)


def write(ds, cfg: RunConfig) -> None:
    """Stream the dataset into the staging folder (this is what executes the pipeline), in files of
    about --output-file-rows rows (Ray Data gathers the small blocks the decode stage works on), in
    row groups that readers read and skip on their own."""
    fs, path = arrow_filesystem(staging_uri(cfg), cfg.storage)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=cfg.output_file_rows, row_group_size=cfg.output_row_group_rows)


def _uri(fs_path: str, like: str) -> str:
    proto = protocol_of(like)
    return fs_path if proto == "file" else f"{proto}://{fs_path}"


NO_ID = "\x00source:"  # the key of a row without an id: its manifest file and line (no id starts with NUL)


@dataclass
class CommittedKeys:
    """The committed output's rows as a Ray dataset of compact keys (plan.COMMITTED_SCHEMA), and
    the size of the files they come from."""

    keys: object
    bytes: int


def committed_keys(cfg: RunConfig) -> CommittedKeys | None:
    """The committed rows made with this run's settings (rows of other settings do not count), read
    by Ray tasks, a file each: per row its key (the id, or NO_ID + file:line), prompt, status,
    media type, and for an error row the file holding it. None when nothing is committed."""
    files = committed_files(cfg)
    if not files:
        return None
    keys = read_files(cfg, sorted(files), _committed_keys, config_key=cfg.config_key(), retry_flagged=cfg.retry_flagged)
    return CommittedKeys(keys=keys, bytes=sum(files.values()))


def committed_files(cfg: RunConfig) -> dict[str, int]:
    """The output's committed Parquet files and their sizes (names starting with `_` or `.` are not committed)."""
    fs, out = filesystem(cfg.output, cfg.storage)
    fs.invalidate_cache()
    if not fs.exists(out):
        return {}
    return {i["name"]: i["size"] for i in fs.ls(out, detail=True) if i["type"] == "file"
            and i["name"].endswith(".parquet") and not i["name"].rsplit("/", 1)[-1].startswith(("_", "."))}


def read_files(cfg: RunConfig, paths: list[str], fn, **kwargs):
    """A Ray dataset made by one task per output file: fn(rows, path, **kwargs) for each batch of
    the file's `fn.columns`. (Ray Data's read_parquet starts footer-reading actors first: seconds
    per run, for outputs that hold a few files.)"""
    import ray

    tasks = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    return tasks.map_batches(_read_each, fn_kwargs={"cfg": cfg, "fn": fn, "kwargs": kwargs}, batch_size=1,
                             batch_format="pyarrow")


def _read_each(batch: pa.Table, cfg: RunConfig, fn, kwargs: dict):
    import pyarrow.dataset as pads

    afs, _ = arrow_filesystem(cfg.output, cfg.storage)
    for path in batch["path"].to_pylist():
        try:
            # the output schema: files written before a column existed read it as nulls
            parts = pads.dataset(path, schema=output_arrow_schema(), format="parquet", filesystem=afs)
            for rows in parts.to_batches(columns=fn.columns, batch_size=100_000):
                yield fn(pa.Table.from_batches([rows]), path, **kwargs)
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"cannot read {_uri(path, cfg.output)} in the output ({type(e).__name__}: {e}); "
                              "restore it from a backup, or move it out of the output folder to compute its rows again") from e


class OutputError(RuntimeError):
    """A file in the output cannot be read; the message says which and what to do."""


def _committed_keys(rows: pa.Table, path: str, config_key: str, retry_flagged: list[str] = ()) -> pa.Table:
    """Per committed row its key, prompt, status, media type and, for a row a retry may replace, its file.
    An ok row whose text carries a flag of --retry-flagged (and is not itself a retry) has status
    `flagged`: it is to be redone, like an error row under --retry-errors."""
    import pyarrow.compute as pc

    rows = rows.filter(pc.fill_null(pc.equal(rows["config_key"], config_key), False))
    key = pc.coalesce(rows["id"], pc.binary_join_element_wise(NO_ID, rows["source"], ""))
    rows, key = rows.filter(pc.is_valid(key)), key.filter(pc.is_valid(key))
    status = rows["status"]
    if retry_flagged:
        status = pc.if_else(flagged_for_retry(rows, retry_flagged), "flagged", status)
    replaceable = pc.fill_null(pc.is_in(status, pa.array(["error", "flagged"])), False)
    error_file = pc.if_else(replaceable, path, pa.scalar(None, pa.string()))
    return pa.table({"c_key": key, "c_prompt": rows["prompt"], "c_status": status, "c_media": rows["media_type"],
                     "c_path": error_file})


_committed_keys.columns = ["id", "prompt", "status", "media_type", "source", "config_key", "quality_flags", "attempt"]


def flagged_for_retry(rows: pa.Table, flags: list[str]):
    """Ok rows of their first attempt whose quality_flags hold one of `flags` (rows of older outputs: none)."""
    import pyarrow.compute as pc

    lists = rows["quality_flags"]
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    hit = pc.is_in(pc.list_flatten(lists), value_set=pa.array(list(flags), pa.string()))
    parents = pc.list_parent_indices(lists)
    any_hit = pa.array(np.bincount(parents.to_numpy(), weights=hit.to_numpy(zero_copy_only=False).astype(float),
                                   minlength=len(lists)) > 0) if len(parents) else pa.array(np.zeros(len(lists), bool))
    first = pc.less(pc.fill_null(rows["attempt"], 1), 2)
    return pc.fill_null(pc.and_(pc.and_(pc.equal(rows["status"], "ok"), first), any_hit), False)


def staged_sources(cfg: RunConfig, files: list[str]):
    """The `source` of every staged row of this run, as a Ray dataset (for the completeness check)."""
    return read_files(cfg, [filesystem(f, cfg.storage)[1] for f in files], _sources)


def _sources(rows: pa.Table, path: str) -> pa.Table:
    return rows.select(["source"])


_sources.columns = ["source"]


def staged(cfg: RunConfig) -> WriteResult:
    """What this run wrote to staging: files and row counts by status and error type, quality flag and
    finish reason, from a few small columns of one file at a time (a run's files are few: --output-file-rows each)."""
    import pyarrow.parquet as pq

    from pipeline.quality import figures

    fs, staged_dir = filesystem(staging_uri(cfg), cfg.storage)
    fs.invalidate_cache()  # the files were written by other processes: never trust a cached listing
    files = sorted(p for p in fs.find(staged_dir) if p.endswith(".parquet")) if fs.exists(staged_dir) else []
    result = WriteResult(files=[_uri(p, cfg.output) for p in files])
    afs, _ = arrow_filesystem(cfg.output, cfg.storage)
    for path in files:
        table = pq.read_table(path, columns=["status", "error_type", *figures.COLUMNS[1:]], filesystem=afs)
        result.quality.add(table)
        counts = table.group_by(["status", "error_type"], use_threads=False).aggregate([([], "count_all")])
        for status, error_type, n in zip(*(counts[c].to_pylist() for c in ("status", "error_type", "count_all"))):
            result.rows += n
            result.by_status[status] += n
            if error_type:
                result.by_error_type[error_type] += n
    return result


def commit(cfg: RunConfig, result: WriteResult, ledger: dict, supersedes: dict | None = None) -> None:
    """Mark the staged run complete (the commit point), then move its files into place.
    `supersedes` ({committed file: [ids]}) names error rows that this run's rows replace."""
    fs, _ = filesystem(cfg.output, cfg.storage)
    staged_paths = [filesystem(f, cfg.storage)[1] for f in result.files]
    names = [p.rsplit("/", 1)[-1] for p in staged_paths]
    ledger = dict(ledger, rows=result.rows, by_status=dict(result.by_status),
                  by_error_type=dict(result.by_error_type), quality=result.quality.to_dict(), files=[f"part-{cfg.run_id}-{n}" for n in names])
    staged_dir = filesystem(staging_uri(cfg), cfg.storage)[1]
    fs.makedirs(staged_dir, exist_ok=True)  # a run with nothing to write still leaves its ledger
    # Size and row count of each staged file: a moved copy is checked against them before the
    # staged file is deleted, so a copy cut short never replaces the only good one.
    checks = {n: _size_and_rows(fs, p) for n, p in zip(names, staged_paths)}
    point = {"staged": names, "checks": checks, "ledger": ledger, "supersedes": supersedes or {},
             "config_key": cfg.config_key(), "replaces": {"errors": cfg.retry_errors, "flags": cfg.retry_flagged}}
    put_whole(fs, join(staged_dir, COMPLETE), json.dumps(point, indent=2, default=str).encode())
    _finish(cfg, cfg.run_id)


class CommitError(RuntimeError):
    """An interrupted commit cannot be finished; the message says what is missing."""


def _size_and_rows(fs, path: str) -> list[int]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return [fs.size(path), pq.ParquetFile(f).metadata.num_rows]


def _is_whole(fs, path: str, expected: list[int] | None) -> bool:
    """The file exists with a readable Parquet footer and, when known, the staged file's size and rows."""
    try:
        if not fs.exists(path):
            return False
        found = _size_and_rows(fs, path)
    except Exception:  # noqa: BLE001 - no footer: a file cut short
        return False
    return expected is None or found == list(expected)


def _place(fs, src: str, dest: str, expected: list[int] | None) -> None:
    """Copy a staged file to its final name so that the final name only ever holds a whole file.
    S3 (and other object stores): a server-side copy, atomic. Local and NFS: a copy under a `_`
    temporary name in the output folder, synced and checked, then renamed within that folder."""
    if not is_local(fs):
        fs.copy(src, dest)
        return
    folder, name = dest.rsplit("/", 1)
    tmp = f"{folder}/_{name}.tmp"
    with open(src, "rb") as i, open(tmp, "wb") as o:
        shutil.copyfileobj(i, o, 1 << 20)
        o.flush()
        os.fsync(o.fileno())
    if not _is_whole(fs, tmp, expected):
        raise CommitError(f"the copy {tmp} of {src} does not match it; the staged file is kept, rerun to retry")
    os.replace(tmp, dest)


def _finish(cfg: RunConfig, run_id: str) -> None:
    """Idempotently move a completed staging folder's files into place and write its ledger.
    A staged file is deleted only once its copy under the final name is checked whole."""
    fs, out = filesystem(cfg.output, cfg.storage)
    fs.invalidate_cache()
    staged_dir = filesystem(staging_uri(cfg, run_id), cfg.storage)[1]
    with fs.open(join(staged_dir, COMPLETE)) as f:
        complete = json.load(f)
    fs.makedirs(out, exist_ok=True)
    checks = complete.get("checks", {})  # absent in commit points written before checks existed
    for name, final in zip(complete["staged"], complete["ledger"]["files"]):
        src, dest = join(staged_dir, name), join(out, final)
        has_src = fs.exists(src)
        expected = checks.get(name) or (_size_and_rows(fs, src) if has_src else None)
        if not _is_whole(fs, dest, expected):
            if not has_src:
                raise CommitError(f"cannot finish the commit of run {run_id}: {dest} is missing or incomplete "
                                  f"and its staged copy {src} is gone; restore it from a backup or remove "
                                  f"{join(cfg.output, '_staging', run_id)} and rerun to compute its rows again")
            _place(fs, src, dest, expected)
            fs.invalidate_cache()
            if not _is_whole(fs, dest, expected):
                raise CommitError(f"the committed copy {dest} of {src} does not match it; the staged file is "
                                  "kept, rerun to retry")
        if has_src:
            fs.rm(src)
    # commit points written before --retry-flagged replaced error rows only
    rule = complete.get("replaces", {"errors": True, "flags": []})
    for path, ids in complete.get("supersedes", {}).items():
        _drop_error_rows(cfg, fs, path, set(ids), complete["config_key"], rule)
    body = json.dumps(complete["ledger"], indent=2, default=str).encode()
    fs.makedirs(join(out, "_runs"), exist_ok=True)
    put_whole(fs, join(out, "_runs", f"{run_id}.json"), body)
    put_whole(fs, join(out, "_SUCCESS"), body)
    fs.rm(staged_dir, recursive=True)


def _drop_error_rows(cfg: RunConfig, fs, path: str, ids: set, key: str, rule: dict) -> None:
    """Rewrite a committed file without the rows of `ids` (made under `key`) that a retry replaced:
    error rows (rule["errors"]: --retry-errors) and ok rows carrying a flag of rule["flags"] in their
    first attempt (--retry-flagged). Idempotent; the new file replaces the old in one step (one PUT on S3, a rename locally),
    so readers see the old file or the new one, never a part."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not fs.exists(path):
        return
    afs, _ = arrow_filesystem(cfg.output, cfg.storage)
    table = pq.read_table(path, filesystem=afs, schema=output_arrow_schema())
    retried = pc.and_(pc.equal(table["status"], "error"), pa.scalar(bool(rule.get("errors"))))
    if rule.get("flags"):
        retried = pc.or_(retried, flagged_for_retry(table, rule["flags"]))
    drop = pc.and_(pc.and_(pc.is_in(table["id"], pa.array(sorted(ids), pa.string())), retried),
                   pc.equal(table["config_key"], key))
    drop = pc.fill_null(drop, False)
    if not pc.any(drop).as_py():
        return
    kept = table.filter(pc.invert(drop))
    if protocol_of(cfg.output) == "file":
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/_{name}.rewrite"  # "_": readers skip it if a crash leaves it behind
        pq.write_table(kept, tmp)
        fs.mv(tmp, path)
    else:
        pq.write_table(kept, path, filesystem=afs)
    log.info("replaced %d retried rows in %s", table.num_rows - kept.num_rows, path)


def _is_commit_point(fs, path: str) -> bool:
    """A whole `_COMPLETE.json`. One cut short (written by a version that wrote it in place) means
    the crash came before the commit point, so no file was moved yet: the run did not commit."""
    try:
        with fs.open(path) as f:
            return "ledger" in json.load(f)
    except (FileNotFoundError, ValueError):
        return False


def recover(cfg: RunConfig) -> int:
    """Finish commits that a crash interrupted; drop staging folders of runs that never completed.
    Returns how many rows those dropped folders held: work done by runs that died, done again now."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(cfg.output, cfg.storage)
    root = filesystem(join(cfg.output, "_staging"), cfg.storage)[1]
    fs.invalidate_cache()
    discarded = 0
    if not fs.exists(root):
        return discarded
    for path in fs.ls(root, detail=False):
        run_id = path.rstrip("/").rsplit("/", 1)[-1]
        if _is_commit_point(fs, join(path, COMPLETE)):
            log.info("finishing the interrupted commit of run %s", run_id)
            _finish(cfg, run_id)
            continue
        for part in fs.find(path):
            if part.endswith(".parquet"):
                try:
                    with fs.open(part, "rb") as f:
                        discarded += pq.ParquetFile(f).metadata.num_rows
                except Exception:  # noqa: BLE001 - a file cut short by the crash: its rows are lost work too
                    pass
        log.info("removing the staging files of run %s, which did not complete", run_id)
        fs.rm(path, recursive=True)
    fs.invalidate_cache()
    return discarded


def _location(uri: str, cfg: RunConfig) -> str:
    """A URI as `scheme://path/`, local paths with symlinks resolved, for prefix comparisons."""
    proto = {"s3a": "s3", "local": "file"}.get(protocol_of(uri), protocol_of(uri))
    path = filesystem(uri, cfg.storage)[1]
    if proto == "file":
        path = os.path.realpath(path)
    return f"{proto}://{path.rstrip('/')}/"


def output_overlaps_manifest(cfg: RunConfig) -> str | None:
    """Why --output and --manifest may not be used together, or None. An output inside the manifest
    prefix would be scanned as manifest rows by the next run (its ledgers, its Parquet files);
    a manifest inside the output would be read as committed rows."""
    output, manifest = _location(cfg.output, cfg), _location(cfg.manifest, cfg)
    if output.startswith(manifest):
        return (f"--output {cfg.output} is inside the manifest prefix {cfg.manifest}: the next run would read "
                "the output's own files as manifest rows. Write the output outside the manifest prefix.")
    if manifest.startswith(output):
        return (f"--manifest {cfg.manifest} is inside --output {cfg.output}: the run would read it as committed "
                "output. Keep manifests outside the output prefix.")
    return None
