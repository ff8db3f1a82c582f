"""Checks no single row can make, over a run's staged rows, on Ray Data (no row passes through the driver):

- same_text: one text (case and outer white space aside) written for at least `same_text_min_media`
  distinct media: a model that collapsed to one caption whatever it is shown.
- near_duplicate_windows: consecutive clip windows of one video (rows of one `uri` and prompt, in the
  order of their first frame) whose captions' word sets have a Jaccard similarity of at least
  `near_duplicate_jaccard` (Cosmos Curator's flag_near_duplicate, 0.9).

Each check returns how many texts / pairs it found and a few examples, for the ledger and the report.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa

from pipeline.config import RunConfig

EXAMPLES = 3
_COLUMNS = ["id", "uri", "uris", "media_type", "prompt", "text", "status", "frame_timestamps_s"]


def run_checks(cfg: RunConfig, read, rows: int) -> dict:
    """Both checks over a run's staged rows, which hold `rows` ok rows: {check: {"found": n, "rows": n,
    "examples": [...]}}. `read(fn)` is the Ray dataset of fn over the staged files (the caller's reader,
    output.committed.read_files: this module checks rows and knows nothing of where they are kept)."""
    if not rows:
        return {name: {"found": 0, "rows": 0, "examples": []} for name in CHECKS}
    ds = read(_check_rows)
    parts = max(1, min(64, math.ceil(rows / 200_000)))
    # one shuffle for both checks: a row goes to its text's group, and a video row also to its window group
    keyed = ds.map_batches(_keyed, batch_format="pyarrow")
    q = cfg.quality
    found = keyed.groupby("group", num_partitions=parts).map_groups(
        _check_group, fn_kwargs={"min_media": q.same_text_min_media, "jaccard": q.near_duplicate_jaccard}, batch_format="pyarrow")
    blocks = found.map_batches(_block_sums, batch_format="pyarrow", batch_size=None).take_all()  # a row per check and block
    return {name: _summed([b for b in blocks if b["check"] == name]) for name in CHECKS}


CHECKS = ("same_text", "near_duplicate_windows")


def _keyed(rows: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    texts = rows.append_column("group", pc.binary_join_element_wise("T", rows["norm"], "\x1f"))
    videos = rows.filter(rows["is_video"])
    windows = videos.append_column("group", pc.binary_join_element_wise("W", videos["window_key"], "\x1f"))
    return pa.concat_tables([texts, windows])


def _check_group(group: pa.Table, min_media: int, jaccard: float) -> pa.Table:
    if group["group"][0].as_py().startswith("T"):
        return _same_text(group, min_media).append_column("check", pa.array(["same_text"]))
    return _near_duplicates(group, jaccard).append_column("check", pa.array(["near_duplicate_windows"]))


def _check_rows(rows: pa.Table, path: str) -> pa.Table:
    """The ok rows with their normalized text, media key and window key."""
    import pyarrow.compute as pc

    rows = rows.filter(pc.fill_null(pc.equal(rows["status"], "ok"), False))
    media = pc.coalesce(rows["uri"], pc.binary_join(pc.fill_null(rows["uris"], pa.scalar([], pa.list_(pa.string()))), "\n"))
    first = pc.list_element(pc.fill_null(rows["frame_timestamps_s"], pa.scalar([0.0], pa.list_(pa.float64()))), 0)
    return pa.table({
        "id": rows["id"], "media": media, "text": rows["text"],
        "norm": pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(rows["text"], ""))),
        "window_key": pc.binary_join_element_wise(pc.fill_null(rows["uri"], ""), pc.fill_null(rows["prompt"], ""), "\x1f"),
        "is_video": pc.fill_null(pc.and_(pc.equal(rows["media_type"], "video"), pc.is_valid(rows["uri"])), False),
        "start": pc.fill_null(first, 0.0),
    })


_check_rows.columns = _COLUMNS


def _result(found: int, rows: int, examples: list) -> pa.Table:
    return pa.table({"found": [found], "rows": [rows], "examples": [json.dumps(examples[:EXAMPLES])]})


def _same_text(group: pa.Table, min_media: int) -> pa.Table:
    """One text: found when it was written for at least min_media distinct media."""
    import pyarrow.compute as pc

    text = group["norm"][0].as_py()
    media = pc.count_distinct(group["media"]).as_py()
    if not text or media < min_media:
        return _result(0, 0, [])
    return _result(1, group.num_rows, [{"text": group["text"][0].as_py(), "media": media, "ids": group["id"].to_pylist()[:5]}])


def _near_duplicates(group: pa.Table, jaccard: float) -> pa.Table:
    """The clip windows of one video and prompt, in time order: consecutive pairs of near-identical captions."""
    from pipeline.quality.flags import words

    rows = group.sort_by("start").select(["id", "text", "start"]).to_pylist()
    found, ids, examples = 0, set(), []
    for a, b in zip(rows, rows[1:]):
        wa, wb = set(words(a["text"] or "")), set(words(b["text"] or ""))
        if wa and wb and len(wa & wb) / len(wa | wb) >= jaccard:
            found += 1
            ids |= {a["id"], b["id"]}
            examples.append({"ids": [a["id"], b["id"]], "texts": [a["text"], b["text"]]})
    return _result(found, len(ids), examples)


def _block_sums(results: pa.Table) -> pa.Table:
    rows = results.to_pylist()
    sums = [_summed([r for r in rows if r["check"] == name]) for name in CHECKS]
    return pa.table({"check": list(CHECKS), "found": [x["found"] for x in sums], "rows": [x["rows"] for x in sums],
                     "examples": [json.dumps(x["examples"]) for x in sums]})


def _summed(results: list[dict]) -> dict:
    examples = [e for r in results for e in json.loads(r["examples"])]
    return {"found": sum(r["found"] for r in results), "rows": sum(r["rows"] for r in results), "examples": examples[:EXAMPLES]}
