"""Plan a run on Ray Data: the manifest's records, repeated ids marked, set against what the output
already holds under the run's settings -> the records still to do.

    manifest files --(a task per file: scan_file)--> records -------------+
                                                                          +--> by id partition: plan_partition
    committed part files --(a task per file: committed.committed_keys)--> keys -+  (duplicates, still to do, prompts done)

Every row of an id, from the manifest and from the output, lands in the same partition (a hash of
the id), where pyarrow handles the partition as one table. The driver lists files and reads a few
counts per partition; no row passes through it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.io.urls import media_prefixes
from pipeline.output.committed import COMMITTED_SCHEMA, OutputError, committed_keys, has_id, item_keys, prompt_keys
from pipeline.output.location import OutputLocation
from pipeline.planning.manifest import RECORD_SCHEMA, SCAN_SCHEMA, ManifestError, mark_duplicates, own_prompts, scan_file

# The committed side's columns (COMMITTED_SCHEMA) are null on manifest rows, as the records' are on these.
PLAN_INPUT_SCHEMA = pa.schema(list(SCAN_SCHEMA) + list(COMMITTED_SCHEMA) + [pa.field("_part", pa.int32())])
# `_todo`: the record has a prompt still to do; `_replaces`: committed files holding error rows of
# its id that its new rows replace (--retry-errors), or flagged rows (--retry-flagged)
# (a partition's summary row, which holds no record, carries its counts: `_items`, `_invalid`)
PLANNED_SCHEMA = pa.schema(list(SCAN_SCHEMA) + [pa.field("_todo", pa.bool_()), pa.field("_replaces", pa.list_(pa.string())),
                                                pa.field("_items", pa.int64()), pa.field("_invalid", pa.int64())])
MAX_SCAN_TASKS = 512
PARTITION_BYTES = 128 << 20  # manifest bytes per partition (about a million rows of JSONL)


def _todo_expr():
    from ray.data.expressions import col

    return col("_todo")


@dataclass
class Plan:
    """What a run will do: `records` (materialized; PLANNED_SCHEMA: the records to do, and a
    summary row per partition) and its counts."""

    records: object
    files: list[str]
    items: int
    todo: int
    invalid: int
    partitions: int

    @property
    def committed(self) -> int:
        return self.items - self.todo

    def line(self) -> str:
        """For scripts: key=value pairs."""
        return (f"plan: items={self.items} committed={self.committed} todo={self.todo} invalid={self.invalid} "
                f"manifest_files={len(self.files)}")

    def pending(self):
        """The records still to do, as the pipeline takes them (RECORD_SCHEMA)."""
        return self.records.filter(expr=_todo_expr()).select_columns(RECORD_SCHEMA.names)

    def superseded(self) -> dict[str, list[str]]:
        """Committed rows that this run's new rows replace (error rows: --retry-errors; flagged rows:
        --retry-flagged): {file: [ids]}.
        One row per retried item reaches the driver."""
        out: dict[str, set] = {}
        rows = self.records.filter(expr=_todo_expr()).map_batches(_replacing, batch_format="pyarrow", batch_size=None)
        for row in rows.iter_rows():
            for path in row["_replaces"]:
                out.setdefault(path, set()).add(row["id"])
        return {path: sorted(ids) for path, ids in out.items()}

    def missing(self, staged_sources) -> tuple[int, list[str]]:
        """Records still to do that have no row among the staged rows (a dataset of `source`), found
        by source partition as the plan finds ids: how many, and a few of their sources."""
        todo = self.records.filter(expr=_todo_expr()).select_columns(["source"])
        if staged_sources is None:
            return self.todo, sorted(r["source"] for r in todo.take(3))
        sided = [ds.map_batches(_by_source, fn_kwargs={"staged": staged, "parts": self.partitions}, batch_format="pyarrow")
                 for ds, staged in ((todo, False), (staged_sources, True))]
        both = sided[0].union(sided[1])
        grouped = both.groupby("_part", num_partitions=self.partitions) if self.partitions > 1 else both.groupby(None)
        gone = grouped.map_groups(_unmatched, batch_format="pyarrow").materialize()
        return gone.count(), sorted(r["source"] for r in gone.take(3))


def _by_source(rows: pa.Table, staged: bool, parts: int) -> pa.Table:
    return pa.table({"source": rows["source"], "_staged": pa.repeat(pa.scalar(staged), rows.num_rows),
                     "_part": _partition_of(rows["source"], parts)})


def _unmatched(rows: pa.Table) -> pa.Table:
    """The sources to do (not `_staged`) that no staged row has."""
    import pyarrow.compute as pc

    staged = rows.filter(rows["_staged"])["source"]
    todo = rows.filter(pc.invert(rows["_staged"]))["source"]
    return pa.table({"source": todo.filter(pc.invert(pc.is_in(todo, value_set=_array(staged))))})


def _replacing(rows: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return rows.filter(pc.is_valid(rows["_replaces"])).select(["id", "_replaces"])


def plan_run(cfg: RunConfig, out: OutputLocation, files: dict[str, int]) -> Plan:
    """The plan of a run over these manifest files ({file: bytes}, as manifest.manifest_file_sizes
    lists them: the run's one listing of the manifest) against what `out` holds, computed by Ray
    Data and materialized."""
    import ray

    manifest_bytes = sum(files.values())
    if "RAY_DATA_SHUFFLE_COMPRESSION" not in os.environ:
        # lz4, not Ray's default zstd, for the shuffle by id partition: zstd made a 10 M-row plan
        # twice as slow on 2 cores (135 s vs 70 s, benchmarks/scale.py)
        ray.data.DataContext.get_current().shuffle_compression = "lz4"
    committed = committed_keys(out, cfg.config_key(), cfg.retry_flagged)
    committed_bytes = committed.bytes if committed else 0
    # the output's Parquet holds a row in fewer bytes than JSONL: weigh it up
    parts = max(1, min(64, math.ceil((manifest_bytes + 4 * committed_bytes) / PARTITION_BYTES)))
    prefixes = media_prefixes(cfg.allowed_uri_prefixes, cfg.manifest)  # here: a relative --manifest resolves against this process's folder
    # a task per file, up to MAX_SCAN_TASKS (then each reads several: 100 k one-row files are not 100 k tasks)
    tasks = ray.data.from_items([{"uri": uri, "index": i} for i, uri in enumerate(files)],
                                override_num_blocks=min(len(files), MAX_SCAN_TASKS))
    inputs = tasks.map_batches(_scan_files, fn_kwargs={"prefixes": prefixes, "cfg": cfg, "parts": parts}, batch_size=None,
                               batch_format="pyarrow")
    if committed:
        inputs = inputs.union(committed.keys.map_batches(_committed_rows, fn_kwargs={"parts": parts}, batch_format="pyarrow"))
    grouped = inputs.groupby("_part", num_partitions=parts) if parts > 1 else inputs.groupby(None)
    planned = grouped.map_groups(plan_partition, fn_kwargs={"cfg": cfg}, batch_format="pyarrow")
    try:
        planned = planned.materialize()
    except Exception as e:  # a task's ManifestError or OutputError arrives wrapped in Ray's errors: raise it as itself
        cause = e
        while cause is not None and not isinstance(cause, (ManifestError, OutputError)):
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise (type(cause)(str(cause)) if cause else e) from e
    counts = planned.map_batches(_counts, batch_format="pyarrow", batch_size=None).take_all()  # a row per block
    return Plan(records=planned, files=list(files), items=sum(c["items"] for c in counts), todo=sum(c["todo"] for c in counts),
                invalid=sum(c["invalid"] for c in counts), partitions=parts)


def _scan_files(batch: pa.Table, prefixes: list[str], cfg: RunConfig, parts: int):
    for uri, index in zip(batch["uri"].to_pylist(), batch["index"].to_pylist()):
        for records in scan_file(uri, index, prefixes, cfg):
            n = records.num_rows
            yield pa.Table.from_arrays([*records.columns, *(pa.nulls(n, f.type) for f in COMMITTED_SCHEMA),
                                        _partition_of(item_keys(records["id"], records["source"]), parts)], schema=PLAN_INPUT_SCHEMA)


def _committed_rows(keys: pa.Table, parts: int) -> pa.Table:
    n = keys.num_rows
    return pa.Table.from_arrays([*(pa.nulls(n, f.type) for f in SCAN_SCHEMA), *(keys[f.name] for f in COMMITTED_SCHEMA),
                                 _partition_of(keys["c_key"], parts)], schema=PLAN_INPUT_SCHEMA)


def _partition_of(keys, parts: int):
    """The partition of each key: the same key, the same partition, in every task of the run."""
    if parts == 1:
        return pa.repeat(pa.scalar(0, pa.int32()), len(keys))
    import polars as pl

    hashed = pl.Series(pa.chunked_array(keys) if isinstance(keys, pa.Array) else keys).hash(seed=0) % parts
    return hashed.cast(pl.Int32).to_arrow()


def plan_partition(rows: pa.Table, cfg: RunConfig) -> pa.Table:
    """One partition: every manifest row and committed row of its ids -> its records still to do
    (in the manifest's order), then one summary row (no record: `_items`, `_invalid`), so that
    counting needs no pass over the records already done (most of them, night after night)."""
    import pyarrow.compute as pc

    side = pc.is_valid(rows["c_key"])
    records = mark_duplicates(rows.filter(pc.invert(side)).select(SCAN_SCHEMA.names))
    planned = still_to_do(records, rows.filter(side).select(COMMITTED_SCHEMA.names), cfg)
    todo = planned.filter(planned["_todo"]).sort_by("_order")
    summary = {name: pa.nulls(1, field.type) for name, field in zip(PLANNED_SCHEMA.names, PLANNED_SCHEMA)}
    invalid = pc.sum(pc.cast(pc.is_valid(records["error_type"]), pa.int64())).as_py() or 0
    summary.update(_todo=pa.array([False]), _items=pa.array([records.num_rows], pa.int64()), _invalid=pa.array([invalid], pa.int64()))
    return pa.concat_tables([todo, pa.table(summary, schema=PLANNED_SCHEMA)])


def still_to_do(records: pa.Table, committed: pa.Table, cfg: RunConfig) -> pa.Table:
    """`records` (SCAN_SCHEMA, repeated ids marked) with `_todo`, `prompts` (for the records to do:
    the prompts not committed yet, or null for the run's default prompt) and `_replaces`, given the
    committed rows (COMMITTED_SCHEMA) of their keys: a record is to do unless every prompt it expects
    is committed (with --retry-errors: committed ok)."""
    import numpy as np
    import pyarrow.compute as pc

    n = records.num_rows
    key = item_keys(records["id"], records["source"])  # as committed_keys keys the committed rows
    # a finished committed row: ok, or any row without --retry-errors; a row without an id is done
    # once committed, whatever its status and prompt (it has none)
    no_id = pc.invert(has_id(committed["c_key"]))
    finished = committed.set_column(1, "c_prompt", pc.if_else(no_id, pa.scalar(None, pa.string()), committed["c_prompt"]))
    # (`flagged`: an ok row --retry-flagged redoes, see committed.committed_keys)
    status = committed["c_status"]
    done = pc.or_(pc.equal(status, "ok"), pc.and_(pc.equal(status, "error"), pa.scalar(not cfg.retry_errors)))
    finished = finished.filter(pc.fill_null(pc.or_(done, no_id), False))
    # the media type an earlier run found in the file (its first row that has one), else the manifest's
    typed = committed.filter(pc.is_valid(committed["c_media"]))
    media = pc.coalesce(pc.take(typed["c_media"], pc.index_in(key, typed["c_key"])), records["media_type"])
    own = own_prompts(records, cfg)
    expected = _expected_prompts(records, own, media, cfg)
    lengths = pc.list_value_length(expected).to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(n), lengths)
    expected_flat = expected.flatten()
    wanted = pa.table({"c_key": pc.take(key, pa.array(row_of)), "p": prompt_keys(expected_flat), "prompt": expected_flat,
                       "row": pa.array(row_of), "pos": pa.array(np.arange(len(row_of)))})
    have = pa.table({"c_key": finished["c_key"], "p": prompt_keys(finished["c_prompt"])})
    # the expected prompts not finished, in each record's order: a record is to do while it has one
    left = wanted.join(have, keys=["c_key", "p"], join_type="left anti", use_threads=False).sort_by("pos")
    remaining = np.bincount(left["row"].to_numpy(), minlength=n) if n else np.zeros(0, dtype=np.int64)
    todo = remaining > 0
    offsets = pa.array(np.concatenate(([0], np.cumsum(remaining))).astype(np.int32))
    unfinished = pa.ListArray.from_arrays(offsets, _array(left["prompt"]))
    # the records to do carry them; one that takes the run's default prompt carries null: the decode
    # stage picks the default for the media type it finds
    asks = pc.is_valid(own).to_numpy(zero_copy_only=False)
    prompts = pc.if_else(pa.array(todo & asks), unfinished, pa.scalar(None, pa.list_(pa.string())))
    records = records.set_column(records.schema.get_field_index("prompts"), "prompts", prompts)
    flagged = committed.filter(pc.fill_null(pc.and_(pc.equal(status, "flagged"), pc.is_valid(committed["c_prompt"])), False))
    if flagged.num_rows:  # the prompts of a record to do that redo flagged rows: attempt 2, fallback settings
        retry = (flagged.select(["c_key", "c_prompt"]).group_by(["c_key", "c_prompt"], use_threads=False).aggregate([])
                 .sort_by([("c_key", "ascending"), ("c_prompt", "ascending")])
                 .group_by("c_key", use_threads=False).aggregate([("c_prompt", "list")]))
        retry_prompts = pc.if_else(pa.array(todo), pc.take(retry["c_prompt_list"], pc.index_in(key, retry["c_key"])),
                                   pa.scalar(None, pa.list_(pa.string())))
        records = records.set_column(records.schema.get_field_index("retry_prompts"), "retry_prompts", retry_prompts)
    records = records.append_column("_todo", pa.array(todo))
    redone = pc.or_(pc.and_(pc.equal(status, "error"), pa.scalar(cfg.retry_errors)), pc.equal(status, "flagged"))
    errors = committed.filter(pc.fill_null(pc.and_(redone, pc.is_valid(committed["c_path"])), False))
    replaces = pa.nulls(n, pa.list_(pa.string()))
    if errors.num_rows:
        files = errors.group_by("c_key", use_threads=False).aggregate([("c_path", "distinct")])
        replaces = pc.take(files["c_path_distinct"], pc.index_in(key, files["c_key"]))
        replaces = pc.if_else(pa.array(todo & pc.is_valid(records["id"]).to_numpy(zero_copy_only=False)), replaces, pa.scalar(None, replaces.type))
    records = records.append_column("_replaces", replaces)
    return records.append_column("_items", pa.nulls(n, pa.int64())).append_column("_invalid", pa.nulls(n, pa.int64())).cast(PLANNED_SCHEMA)


def _expected_prompts(records: pa.Table, own, media, cfg: RunConfig):
    """manifest.prompts_for for a whole table: a list of prompts per record (null: no prompt): its
    `own` (manifest.own_prompts), else the run's default prompt for `media`."""
    import numpy as np
    import pyarrow.compute as pc

    several = pc.fill_null(pc.greater(pc.list_value_length(records["uris"]), 1), False)
    kind = pc.if_else(several, "images", pc.fill_null(media, "video"))
    default = pc.if_else(pc.equal(kind, "images"), cfg.default_prompt("images"),
                         pc.if_else(pc.equal(kind, "image"), cfg.default_prompt("image"), cfg.default_prompt("video")))
    offsets = pa.array(np.arange(records.num_rows + 1, dtype=np.int32))  # one prompt per record
    return _array(pc.if_else(pc.is_valid(own), own, pa.ListArray.from_arrays(offsets, _array(default))))


def _array(values):
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _counts(rows: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    def total(column):
        return pc.sum(pc.cast(rows[column], pa.int64())).as_py() or 0

    return pa.table({"items": [total("_items")], "todo": [total("_todo")], "invalid": [total("_invalid")]})
