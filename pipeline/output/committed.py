"""What the output already holds: the committed-key rule, and the Ray reads of the output's files
that planning (pipeline/planning/plan.py) and the completeness check use.

An item's key is its id, or for a row without an id its manifest file:line (`source`). Keys are
tagged by kind, so no id, whatever its spelling, can equal the key of an id-less row: ids and
sources are user data. Prompts are tagged likewise, so that no prompt can stand for "no prompt".
Keys are computed when the output is read, from its `id`, `source` and `prompt` columns, so
outputs written by any version read alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline.output.location import OutputLocation
from pipeline.quality.figures import COLUMNS as QUALITY_COLUMNS
from pipeline.quality.figures import QualityCounts
from pipeline.schemas import output_arrow_schema

ID_TAG, SOURCE_TAG = "i", "s"  # the first character of every key: its kind
PROMPT_TAG = "p"  # a prompt's join key is PROMPT_TAG + prompt; no prompt is "" (null never matches in a join)

# The committed side's columns (committed_keys): per committed row its key, prompt, status, media
# type and, for an error row, the file holding it.
COMMITTED_SCHEMA = pa.schema([("c_key", pa.string()), ("c_prompt", pa.string()), ("c_status", pa.string()),
                              ("c_media", pa.string()), ("c_path", pa.string())])


def item_keys(ids, sources):
    """The key of each row: ID_TAG + id, else SOURCE_TAG + source; null when it has neither."""
    import pyarrow.compute as pc

    return pc.coalesce(pc.binary_join_element_wise(ID_TAG, ids, ""), pc.binary_join_element_wise(SOURCE_TAG, sources, ""))


def has_id(keys):
    """Whether each key is an id's (not an id-less row's)."""
    import pyarrow.compute as pc

    return pc.starts_with(keys, ID_TAG)


def prompt_keys(prompts):
    """Each prompt as a join key that is never null: PROMPT_TAG + prompt, or "" for no prompt."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.binary_join_element_wise(PROMPT_TAG, prompts, ""), "")


class OutputError(RuntimeError):
    """A file in the output cannot be read; the message says which and what to do."""


@dataclass
class CommittedKeys:
    """The committed output's rows as a Ray dataset of compact keys (COMMITTED_SCHEMA), and the
    size of the files they come from."""

    keys: object
    bytes: int


def committed_keys(out: OutputLocation, config_key: str, retry_flagged: list[str] = ()) -> CommittedKeys | None:
    """The committed rows made with these settings (rows of other settings do not count), read by
    Ray tasks, a file each. None when nothing is committed."""
    files = out.part_files()
    if not files:
        return None
    keys = read_files(out, sorted(files), _committed_keys, config_key=config_key, retry_flagged=list(retry_flagged))
    return CommittedKeys(keys=keys, bytes=sum(files.values()))


def _committed_keys(rows: pa.Table, path: str, config_key: str, retry_flagged: list[str] = ()) -> pa.Table:
    """Per committed row its key, prompt, status, media type and, for a row a retry may replace, its file.
    An ok row whose text carries a flag of --retry-flagged (and is not itself a retry) has status
    `flagged`: it is to be redone, like an error row under --retry-errors."""
    import pyarrow.compute as pc

    rows = rows.filter(pc.fill_null(pc.equal(rows["config_key"], config_key), False))
    key = item_keys(rows["id"], rows["source"])
    rows, key = rows.filter(pc.is_valid(key)), key.filter(pc.is_valid(key))
    status = rows["status"]
    if retry_flagged:
        status = pc.if_else(flagged_for_retry(rows, retry_flagged), "flagged", status)
    replaceable = pc.fill_null(pc.is_in(status, pa.array(["error", "flagged"])), False)
    error_file = pc.if_else(replaceable, path, pa.scalar(None, pa.string()))
    return pa.table({"c_key": key, "c_prompt": rows["prompt"], "c_status": status, "c_media": rows["media_type"],
                     "c_path": error_file}, schema=COMMITTED_SCHEMA)


_committed_keys.columns = ["id", "prompt", "status", "media_type", "source", "config_key", "quality_flags", "attempt"]


def flagged_for_retry(rows: pa.Table, flags: list[str]):
    """Ok rows of their first attempt whose quality_flags hold one of `flags` (rows of older outputs: none)."""
    import numpy as np
    import pyarrow.compute as pc

    lists = rows["quality_flags"]
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    hit = pc.is_in(pc.list_flatten(lists), value_set=pa.array(list(flags), pa.string()))
    parents = pc.list_parent_indices(lists)
    any_hit = pa.array(np.bincount(parents.to_numpy(), weights=hit.to_numpy(zero_copy_only=False).astype(float),
                                   minlength=len(lists)) > 0) if len(parents) else pa.array(np.zeros(len(lists), bool))
    first = pc.less(pc.fill_null(rows["attempt"], 1), 2)
    return pc.fill_null(pc.and_(pc.and_(pc.equal(rows["status"], "ok"), first), any_hit), False)


def staged_sources(out: OutputLocation, files: list[str]):
    """The `source` of every row in these staged files, as a Ray dataset (for the completeness check)."""
    return read_files(out, files, _sources)


def _sources(rows: pa.Table, path: str) -> pa.Table:
    return rows.select(["source"])


_sources.columns = ["source"]


def read_files(out: OutputLocation, paths: list[str], fn, **kwargs):
    """A Ray dataset made by one task per output file (paths inside `out`'s filesystem):
    fn(rows, path, **kwargs) for each batch of the file's `fn.columns`. (Ray Data's read_parquet
    starts footer-reading actors first: seconds per run, for outputs that hold a few files.)"""
    import ray

    tasks = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    return tasks.map_batches(_read_each, fn_kwargs={"out": out, "fn": fn, "kwargs": kwargs}, batch_size=1,
                             batch_format="pyarrow")


def _read_each(batch: pa.Table, out: OutputLocation, fn, kwargs: dict):
    import pyarrow.dataset as pads

    for path in batch["path"].to_pylist():
        try:
            # the output schema: files written before a column existed read it as nulls
            parts = pads.dataset(path, schema=output_arrow_schema(), format="parquet", filesystem=out.arrow)
            for rows in parts.to_batches(columns=fn.columns, batch_size=100_000):
                yield fn(pa.Table.from_batches([rows]), path, **kwargs)
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"cannot read {out.uri_of(path)} in the output ({type(e).__name__}: {e}); "
                              "restore it from a backup, or move it out of the output folder to compute its rows again") from e


def committed_quality(cfg, out) -> QualityCounts:
    """The quality figures of the rows committed under the run's settings in `out` (an OutputLocation:
    --dry-run's view of an existing output), counted by Ray tasks, a file each; a row per file reaches the driver."""
    import json

    files = out.part_files()
    result = QualityCounts()
    if not files:
        return result
    counts = read_files(out, sorted(files), _counts_of, config_key=cfg.config_key())
    for block in counts.take_all():
        result.merge(QualityCounts.from_dict(json.loads(block["counts"])))
    return result


def _counts_of(rows: pa.Table, path: str, config_key: str) -> pa.Table:
    import json

    import pyarrow.compute as pc

    rows = rows.filter(pc.fill_null(pc.equal(rows["config_key"], config_key), False))
    return pa.table({"counts": [json.dumps(QualityCounts().add(rows).to_dict())]})


_counts_of.columns = [*QUALITY_COLUMNS, "config_key"]
