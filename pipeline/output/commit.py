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
import shutil
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.io.storage import join, put_whole, write_whole
from pipeline.output.location import OutputLocation
from pipeline.quality.figures import QualityCounts
from pipeline.schemas import output_arrow_schema

log = logging.getLogger("pipeline")
COMPLETE = "_COMPLETE.json"


@dataclass
class WriteResult:
    files: list[str]  # staged files: paths inside the output's filesystem
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_error_type: Counter = field(default_factory=Counter)
    quality: QualityCounts = field(default_factory=QualityCounts)  # rows per quality flag and finish reason


def write(ds, out: OutputLocation, cfg: RunConfig) -> None:
    """Stream the dataset into the run's staging folder (this is what executes the pipeline), in
    files of about --output-file-rows rows (Ray Data gathers the small blocks the decode stage works
    on), in row groups that readers read and skip on their own."""
    ds.write_parquet(out.staging(cfg.run_id), filesystem=out.arrow, min_rows_per_file=cfg.output_file_rows,
                     row_group_size=cfg.output_row_group_rows)


def staged(out: OutputLocation, run_id: str) -> WriteResult:
    """What a run wrote to staging: files and row counts by status and error type, quality flag and
    finish reason, from a few small columns of one file at a time (a run's files are few: --output-file-rows each)."""
    import pyarrow.parquet as pq

    from pipeline.quality import figures

    fs, staged_dir = out.fs, out.staging(run_id)
    fs.invalidate_cache()  # the files were written by other processes: never trust a cached listing
    files = sorted(p for p in fs.find(staged_dir) if p.endswith(".parquet")) if fs.exists(staged_dir) else []
    result = WriteResult(files=files)
    for path in files:
        table = pq.read_table(path, columns=["status", "error_type", *figures.COLUMNS[1:]], filesystem=out.arrow)
        result.quality.add(table)
        counts = table.group_by(["status", "error_type"], use_threads=False).aggregate([([], "count_all")])
        for status, error_type, n in zip(*(counts[c].to_pylist() for c in ("status", "error_type", "count_all"))):
            result.rows += n
            result.by_status[status] += n
            if error_type:
                result.by_error_type[error_type] += n
    return result


def commit(out: OutputLocation, cfg: RunConfig, result: WriteResult, ledger: dict, supersedes: dict | None = None) -> None:
    """Mark the staged run complete (the commit point), then move its files into place.
    `supersedes` ({committed file: [ids]}) names error rows that this run's rows replace."""
    fs = out.fs
    names = [p.rsplit("/", 1)[-1] for p in result.files]
    ledger = dict(ledger, rows=result.rows, by_status=dict(result.by_status),
                  by_error_type=dict(result.by_error_type), quality=result.quality.to_dict(),
                  files=[f"part-{cfg.run_id}-{n}" for n in names])
    staged_dir = out.staging(cfg.run_id)
    fs.makedirs(staged_dir, exist_ok=True)  # a run with nothing to write still leaves its ledger
    # Size and row count of each staged file: a moved copy is checked against them before the
    # staged file is deleted, so a copy cut short never replaces the only good one.
    checks = {n: _size_and_rows(fs, p) for n, p in zip(names, result.files)}
    point = {"staged": names, "checks": checks, "ledger": ledger, "supersedes": supersedes or {},
             "config_key": cfg.config_key(), "replaces": {"errors": cfg.retry_errors, "flags": cfg.retry_flagged}}
    put_whole(fs, join(staged_dir, COMPLETE), json.dumps(point, indent=2, default=str).encode())
    _finish(out, cfg.run_id)


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


def _place(out: OutputLocation, src: str, dest: str, expected: list[int] | None) -> None:
    """Copy a staged file to its final name so that the final name only ever holds a whole file.
    S3 (and other object stores): a server-side copy, atomic. Local and NFS: written in one step
    (storage.write_whole), the copy checked before it takes the final name."""
    if not out.is_local:
        out.fs.copy(src, dest)
        return

    def copy(f) -> None:
        with open(src, "rb") as staged_file:
            shutil.copyfileobj(staged_file, f, 1 << 20)

    def check(tmp: str) -> None:
        if not _is_whole(out.fs, tmp, expected):
            raise CommitError(f"the copy {tmp} of {src} does not match it; the staged file is kept, rerun to retry")

    write_whole(out.fs, dest, copy, check=check)


def _finish(out: OutputLocation, run_id: str) -> None:
    """Idempotently move a completed staging folder's files into place and write its ledger.
    A staged file is deleted only once its copy under the final name is checked whole. A driver that
    stalled mid-commit (its lease expired) may find that another run finished the commit meanwhile:
    then there is nothing left to do, and it must not write the ledger and _SUCCESS again."""
    try:
        _finish_steps(out, run_id)
    except FileNotFoundError as e:
        out.fs.invalidate_cache()
        if out.fs.exists(out.ledger(run_id)) and not out.fs.exists(out.staging(run_id)):
            log.warning("the commit of run %s was finished by another run while this one stalled (its lease had "
                        "expired); its rows are committed once, nothing left to do", run_id)
            return
        raise CommitError(f"the commit of run {run_id} lost a file midway ({e}); rerun the same command to finish it") from e


def _finish_steps(out: OutputLocation, run_id: str) -> None:
    fs = out.fs
    fs.invalidate_cache()
    staged_dir = out.staging(run_id)
    with fs.open(join(staged_dir, COMPLETE)) as f:
        complete = json.load(f)
    fs.makedirs(out.path, exist_ok=True)
    checks = complete.get("checks", {})  # absent in commit points written before checks existed
    for name, final in zip(complete["staged"], complete["ledger"]["files"]):
        src, dest = join(staged_dir, name), out.child(final)
        has_src = fs.exists(src)
        expected = checks.get(name) or (_size_and_rows(fs, src) if has_src else None)
        if not _is_whole(fs, dest, expected):
            if not has_src:
                raise CommitError(f"cannot finish the commit of run {run_id}: {out.uri_of(dest)} is missing or incomplete "
                                  f"and its staged copy {out.uri_of(src)} is gone; restore it from a backup or remove "
                                  f"{out.uri_of(staged_dir)} and rerun to compute its rows again")
            _place(out, src, dest, expected)
            fs.invalidate_cache()
            if not _is_whole(fs, dest, expected):
                raise CommitError(f"the committed copy {out.uri_of(dest)} of {out.uri_of(src)} does not match it; "
                                  "the staged file is kept, rerun to retry")
        if has_src:
            fs.rm(src)
    # commit points written before --retry-flagged replaced error rows only
    rule = complete.get("replaces", {"errors": True, "flags": []})
    for path, ids in complete.get("supersedes", {}).items():
        _drop_error_rows(out, path, set(ids), complete["config_key"], rule)
    fs.invalidate_cache()
    if not fs.exists(join(staged_dir, COMPLETE)):  # another run finished this commit meanwhile (see _finish)
        raise FileNotFoundError(join(staged_dir, COMPLETE))
    body = json.dumps(complete["ledger"], indent=2, default=str).encode()
    fs.makedirs(out.child("_runs"), exist_ok=True)
    put_whole(fs, out.ledger(run_id), body)
    put_whole(fs, out.success, body)
    fs.rm(staged_dir, recursive=True)


def _drop_error_rows(out: OutputLocation, path: str, ids: set, key: str, rule: dict) -> None:
    """Rewrite a committed file without the rows of `ids` (made under `key`) that a retry replaced:
    error rows (rule["errors"]: --retry-errors) and ok rows carrying a flag of rule["flags"] in their
    first attempt (--retry-flagged). Idempotent; the new file replaces the old in one step
    (storage.write_whole), so readers see the old file or the new one, never a part."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.output.committed import flagged_for_retry

    if not out.fs.exists(path):
        return
    table = pq.read_table(path, filesystem=out.arrow, schema=output_arrow_schema())
    retried = pc.and_(pc.equal(table["status"], "error"), pa.scalar(bool(rule.get("errors"))))
    if rule.get("flags"):
        retried = pc.or_(retried, flagged_for_retry(table, rule["flags"]))
    drop = pc.and_(pc.and_(pc.is_in(table["id"], pa.array(sorted(ids), pa.string())), retried),
                   pc.equal(table["config_key"], key))
    drop = pc.fill_null(drop, False)
    if not pc.any(drop).as_py():
        return
    kept = table.filter(pc.invert(drop))
    write_whole(out.fs, path, lambda f: pq.write_table(kept, f))
    log.info("replaced %d retried rows in %s", table.num_rows - kept.num_rows, out.uri_of(path))


def _is_commit_point(fs, path: str) -> bool:
    """A whole `_COMPLETE.json`. One cut short (written by a version that wrote it in place) means
    the crash came before the commit point, so no file was moved yet: the run did not commit."""
    try:
        with fs.open(path) as f:
            return "ledger" in json.load(f)
    except (FileNotFoundError, ValueError):
        return False


def recover(out: OutputLocation) -> int:
    """Finish commits that a crash interrupted; drop staging folders of runs that never completed.
    Returns how many rows those dropped folders held: work done by runs that died, done again now."""
    import pyarrow.parquet as pq

    fs, root = out.fs, out.staging_root
    fs.invalidate_cache()
    discarded = 0
    if not fs.exists(root):
        return discarded
    for path in fs.ls(root, detail=False):
        run_id = path.rstrip("/").rsplit("/", 1)[-1]
        if _is_commit_point(fs, join(path, COMPLETE)):
            log.info("finishing the interrupted commit of run %s", run_id)
            _finish(out, run_id)
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
