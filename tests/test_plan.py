"""Planning at scale (issue 15): the manifest scan's table-at-once path gives exactly what the
row-by-row path gives, and the plan (repeated ids, rows already committed) is the same in one
partition or many, and the same as the per-record rules it replaced."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.io.urls as urls
import pipeline.planning.manifest as manifest
from pipeline.config import RunConfig
from pipeline.planning.manifest import scan_manifest


def odd_rows(root, rng: random.Random, n: int) -> list[str]:
    """JSONL lines, mostly plain, with every kind of trouble the per-row path words."""
    (root / "media").mkdir(exist_ok=True)
    (root / "outside.mp4").write_bytes(b"x")
    link = root / "media" / "link.mp4"
    if not link.exists():
        link.symlink_to(root / "outside.mp4")
    kinds = [
        lambda i: {"id": f"v{i}", "uri": f"s3://b/clips/{i}.mp4", "media_type": "video"},
        lambda i: {"id": f"r{i}", "uri": f"media/{i}.jpg", "prompt": "Say what you see, é ✓."},
        lambda i: {"id": f"w{i}", "uri": f"s3://b/{i}.mp4", "start_s": i % 5, "end_s": i % 5 + 2.5},
        lambda i: {"id": f"m{i}", "uris": [f"s3://b/{i}.jpg", f"rel/{i}.png"], "extra": {"nested": [1, "x"]}},
        lambda i: {"id": f"q{i}", "uri": f"s3://b/{i}.mp4", "questions": ["Why?", "Where?"]},
        lambda i: {"id": f"d{i % 7}", "uri": f"s3://b/dup-{i}.mp4", "prompt": "Again?"},  # repeated ids
        lambda i: {"id": f"n{i}", "uri": f"s3://b/{i}.mp4", "prompt": None, "media_type": None},
        lambda i: {"id": "", "uri": "s3://b/empty-id.mp4"},
        lambda i: {"id": f"t{i}", "uri": f"s3://b/{i}.mp4", "media_type": "audio"},
        lambda i: {"id": f"e{i}", "uri": f"s3://b/{i}.mp4", "start_s": 4, "end_s": 1},
        lambda i: {"id": f"s{i}", "uri": f"s3://b/{i}.mp4", "start_s": "soon"},
        lambda i: {"id": f"b{i}", "uri": f"s3://b/{i}.mp4", "uris": ["s3://b/x.jpg"]},
        lambda i: {"id": f"x{i}", "uris": []},
        lambda i: {"id": f"y{i}", "uris": ["s3://b/a.jpg", ""]},
        lambda i: {"id": f"z{i}", "uris": ["a.jpg", "b.jpg"], "media_type": "video"},
        lambda i: {"id": f"p{i}", "uri": f"s3://other/{i}.mp4"},
        lambda i: {"id": f"c{i}", "uri": f"s3://b/ctl\x07{i}.mp4"},
        lambda i: {"id": f"k{i}", "uri": f"simplecache::s3://b/{i}.mp4"},
        lambda i: {"id": f"u{i}", "uri": f"{root}/media/../outside.mp4"},
        lambda i: {"id": f"l{i}", "uri": str(link)},
        lambda i: {"id": f"f{i}", "uri": f"file://{root}/media/{i}.mp4"},
        lambda i: {"id": f"j{i}", "uri": f"file:{root}/media/{i}.mp4"},
        lambda i: {"id": f"colon{i}", "uri": f"media/{i}:x.mp4"},  # relative, with a colon: not resolved
        lambda i: {"id": f"h{i}", "uri": f"http://169.254.169.254/{i}"},
        lambda i: {"id": f"g{i}", "uri": f"s3://b//double//{i}.mp4"},
        lambda i: {"id": f"a{i}", "uri": f"s3://b/{i}.mp4", "questions": "not a list"},
        lambda i: {"id": f"o{i}", "uri": f"s3://b/{i}.mp4", "prompt": 5},
        lambda i: {"id": True, "uri": f"s3://b/{i}.mp4"},
    ]
    raw = ["{not json", '["a", "list"]', '{"id": "two"}{"id": "objects"}', '{"id": "over",', ' "uri": "two-lines"}',
           "   ", "", '{"id": "dupkey", "id": "again", "uri": "s3://b/k.mp4"}', '{"id": "crlf", "uri": "s3://b/c.mp4"}\r']
    lines = []
    for i in range(n):
        if rng.random() < 0.004:  # rare, as in real manifests: most chunks are parsed by pyarrow
            lines.append(rng.choice(raw))
        else:
            row = rng.choices(kinds, weights=[200] + [3] * (len(kinds) - 1))[0](i)
            lines.append(json.dumps(row, ensure_ascii=rng.random() < 0.5))
    return lines


def row_by_row(monkeypatch):
    """Send every row through the per-row path (json.loads, validate_row, check_media_uri)."""
    import numpy as np

    def never_plain(table, cfg):
        return np.zeros(table.num_rows, dtype=bool)

    def never_sure(uris, prefixes):
        return np.zeros(len(uris), dtype=bool)

    monkeypatch.setattr(manifest, "_plain_rows", never_plain)
    monkeypatch.setattr(urls, "media_uris_surely_allowed", never_sure)
    monkeypatch.setattr("pyarrow.json.read_json", lambda *a, **k: (_ for _ in ()).throw(pa.ArrowInvalid("forced")))


@pytest.mark.parametrize("task,prompt", [("caption", None), ("qa", "What is it?"), ("qa", None)])
def test_the_table_at_once_scan_gives_what_the_row_by_row_scan_gives(tmp_path, monkeypatch, task, prompt):
    rng = random.Random(15)
    lines = odd_rows(tmp_path, rng, 3000)
    (tmp_path / "media" / "m.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n")
    (tmp_path / "media" / "numbers.jsonl").write_text("".join(json.dumps({"id": i, "uri": f"s3://b/{i}.mp4"}) + "\n"
                                                              for i in range(500)) + '{"id": "v1", "uri": "s3://b/v.mp4"}')
    pick = lambda *values: [rng.choice(values) for _ in range(300)]  # noqa: E731
    pq.write_table(pa.table({
        "id": pa.array([f"pq{i}" if i % 13 else None for i in range(300)]),
        "uri": pa.array(pick("s3://b/p.mp4", "p.jpg", "s3://other/p.mp4", "")).dictionary_encode(),
        "start_s": pa.array(pick(None, float("nan"), 1.0, -2.0)), "prompt": pa.array(pick(None, "Hi", "")),
        "questions": pa.array(pick(None, ["A?"], [], ["B?", None]), pa.list_(pa.string()))}), tmp_path / "media" / "n.parquet")
    pq.write_table(pa.table({"id": pa.array(range(50)), "uri": pa.array(["s3://b/i.mp4"] * 50, pa.large_string()),
                             "end_s": pa.array(range(50), pa.int32())}), tmp_path / "media" / "n2.parquet")
    csv_lines = ["id,uri,questions,start_s,end_s,prompt"] + [
        f'c{i},{rng.choice(["s3://b/a.mp4", "rel.mp4", "s3://other/x.mp4", ""])},'
        f'{rng.choice(["", "Why?", chr(34) + "[" + chr(34) * 2 + "A?" + chr(34) * 2 + "]" + chr(34)])},'
        f'{rng.choice(["", "1", "2.5", " 3 ", "soon", "-1", "1e2", "inf"])},{rng.choice(["", "4", "0"])},'
        f'{rng.choice(["", "Hi", chr(34) + "two" + chr(10) + "lines" + chr(34)])}' for i in range(600)]
    (tmp_path / "media" / "o.csv").write_text("\n".join(csv_lines) + "\n")
    cfg = RunConfig(manifest=str(tmp_path / "media"), output="/tmp/unused", model="unused", task=task, prompt=prompt,
                    allowed_uri_prefixes=[str(tmp_path / "media"), "s3://b/"])
    monkeypatch.setattr(manifest, "SCAN_CHUNK_BYTES", 4096)  # many chunks: rows cut at every kind of boundary
    monkeypatch.setattr(manifest, "SCAN_BATCH_ROWS", 37)
    fast_rows = []
    fast_records = manifest._fast_records

    def counted(*args):
        records, unsure = fast_records(*args)
        fast_rows.append(records.num_rows)
        return records, unsure

    monkeypatch.setattr(manifest, "_fast_records", counted)
    fast = scan_manifest(cfg).records.to_pylist()
    if prompt or task == "caption":  # (qa rows without questions or a --prompt are invalid: the per-row path words it)
        assert sum(fast_rows) > len(fast) / 3  # the table-at-once path did much of the work (a third of the rows are odd)
    with monkeypatch.context() as slow:
        row_by_row(slow)
        reference = scan_manifest(cfg).records.to_pylist()
    assert len(fast) == len(reference) > 3000
    for got, want in zip(fast, reference):
        assert got == want
    kinds = {(r["status"], r["error_type"]) for r in fast}
    assert {("ok", None), ("error", "invalid_manifest_row"), ("error", "uri_not_allowed"), ("error", "duplicate_id")} <= kinds


def test_the_fast_uri_check_admits_only_what_the_per_row_check_admits(tmp_path):
    from pipeline.io.urls import URLRejected, check_media_uri, media_uris_surely_allowed

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "link").symlink_to("/etc")
    prefixes = [str(tmp_path / "in"), "s3://b/", "s3://c", "https://example.com/", "gs://"]
    tricky = ["s3://b/x.mp4", "s3://bx/y.mp4", "s3://c/z.mp4", "s3://cc/z.mp4", "s3://b/a::b", "s3://b/\x00",
              "S3://b/x.mp4", "s3://b/../c/x.mp4", "gs://any/x", "https://example.com/a.mp4", "http://example.com/a",
              f"{tmp_path}/in/a.mp4", f"{tmp_path}/in/../a.mp4", f"{tmp_path}/in/link/passwd", f"{tmp_path}/in//a",
              f"{tmp_path}/in/./a", f"{tmp_path}/inside/a", f"file://{tmp_path}/in/a", f"file:{tmp_path}/in/a",
              f"FILE://{tmp_path}/in/a", "relative.mp4", f"{tmp_path}/in/a\n", "s3://b/[x].mp4", "s3://b/x?y#z",
              f"{tmp_path}/in/..", f"{tmp_path}/in/a:b", "s3://b", "s3://b/", "data:,x", f"{tmp_path}/in"]
    sure = media_uris_surely_allowed(pa.array(tricky), prefixes)
    for uri, fast in zip(tricky, sure):
        try:
            check_media_uri(uri, prefixes, resolve=lambda *a, **k: [(0, 0, 0, "", ("93.184.216.34", 0))])
            allowed = True
        except URLRejected:
            allowed = False
        assert allowed or not fast, uri  # the fast path never admits what the per-row check refuses
    assert sure.sum() >= 5  # and it does admit the plain cases


def reference_still_to_do(records: list[dict], committed: list[tuple], cfg) -> list[tuple]:
    """The per-record rules that planning had before it ran on Ray Data (pipeline/batch/run.py:pending
    and superseded), written out for comparison: (to do, prompts still to do, files whose error rows
    it replaces) per record; the prompts are None for a record that takes the run's default prompt
    (the decode stage picks it for the media type it finds). Committed rows of one (id, prompt):
    finished if any of them is."""
    from pipeline.planning.manifest import prompts_for

    rows, sources = {}, set()
    for rid, source, prompt, status, media, path in committed:
        if rid is None:
            sources.add(source)
        else:
            rows.setdefault(rid, []).append((prompt, status, media, path))
    out = []
    for rec in records:
        if rec["id"] is None:
            todo = rec["source"] not in sources
            out.append((todo, [None] if todo else None, None) + ((None,) if cfg.retry_flagged else ()))
            continue
        mine = rows.get(rec["id"], [])
        finished = {p for p, status, _, _ in mine if status == "ok" or (status == "error" and not cfg.retry_errors)}
        media = next((m for _, _, m, _ in mine if m), rec["media_type"])
        expected = prompts_for(rec, media, cfg)
        todo = not finished.issuperset(expected)
        no_item = rec["error_type"] in ("invalid_manifest_row", "duplicate_id")
        default = not no_item and not rec["prompt"] and not (cfg.task == "qa" and rec["questions"])
        # the files of the rows the new ones replace: error rows (--retry-errors) and flagged rows (--retry-flagged)
        errors = sorted({path for _, status, _, path in mine if (status == "error" and cfg.retry_errors) or status == "flagged"})
        row = (todo, [p for p in expected if p not in finished] if todo and not default else None,  # (only the records to do need them)
               errors if todo and errors else None)
        if cfg.retry_flagged:
            retry = sorted({p for p, status, _, _ in mine if status == "flagged" and p is not None})
            row += ((retry or None) if todo else None,)
        out.append(row)
    return out


def random_plan_inputs(rng: random.Random, n: int, flagged: bool = False):
    from pipeline.output.committed import item_keys
    from pipeline.planning.manifest import SCAN_SCHEMA
    from pipeline.planning.plan import COMMITTED_SCHEMA

    records, committed, media_of = [], [], {}
    for i in range(n):
        kind = rng.random()
        rid = None if kind < 0.05 else f"id{rng.randrange(n // 2)}"  # repeated ids on purpose
        if 0.05 <= kind < 0.1:  # ids that spell another row's key, or what once marked a row without an id
            line = f"m.jsonl:line {rng.randrange(n) + 1}"
            rid = rng.choice(["\x00source:" + line, line, "s" + line, "i" + line, "", "\x00", "a\x00b"])
        error_type = rng.choice([None] * 8 + ["invalid_manifest_row", "duplicate_id", "uri_not_allowed"])
        if rid is None:
            error_type = "invalid_manifest_row"
        media = media_of.setdefault(rid, rng.choice([None, "video", "image"]))  # an item's type is its file's
        rec = {name: None for name in SCAN_SCHEMA.names}
        rec.update(id=rid, source=f"m.jsonl:line {i + 1}", media_type=media, _order=i,
                   status="error" if error_type else "ok", error_type=error_type,
                   prompt=rng.choice([None, None, "Say it."]), questions=rng.choice([None, ["A?"], ["A?", "B?"]]),
                   uris=rng.choice([None, None, ["a.jpg", "b.jpg"], ["a.jpg"]]))
        records.append(rec)
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            prompt = rng.choice([None, "Say it.", "A?", "B?", "\x00", "", "Describe this video in detail.",
                                 "Describe this image in detail.", "Describe these images in detail."])
            status = rng.choice(["ok", "ok", "error", *(["flagged"] if flagged else [])])
            committed.append((rid, rec["source"], prompt, status, media if rid is not None else None,
                              f"out/part-{rng.randrange(3)}.parquet" if status in ("error", "flagged") else None))
    ids, sources = pa.array([c[0] for c in committed], pa.string()), pa.array([c[1] for c in committed], pa.string())
    keys = item_keys(ids, sources)  # as committed.committed_keys computes them from the output's columns
    return (pa.Table.from_pylist(records, schema=SCAN_SCHEMA),
            pa.Table.from_arrays([keys, *(pa.array([c[k] for c in committed], pa.string()) for k in range(2, 6))],
                                 schema=COMMITTED_SCHEMA), committed)


@pytest.mark.parametrize("task,retry", [("caption", False), ("caption", True), ("qa", False), ("qa", True)])
def test_a_partition_plans_as_the_per_record_rules_did(task, retry):
    from pipeline.planning.plan import still_to_do

    cfg = RunConfig(manifest="/tmp/m.jsonl", output="/tmp/unused", model="unused", task=task, retry_errors=retry)
    records, committed, raw = random_plan_inputs(random.Random(f"{task}{retry}"), 2000)
    got = still_to_do(records, committed, cfg).to_pylist()
    want = reference_still_to_do(records.to_pylist(), raw, cfg)
    assert [(r["_todo"], r["prompts"], sorted(r["_replaces"]) if r["_replaces"] else None) for r in got] == want
    assert 0.1 < sum(t for t, _, _ in want) / len(want) < 0.9  # both kinds of record are there


@pytest.mark.parametrize("retry_errors", [False, True])
def test_retry_flagged_redoes_flagged_rows_with_the_fallback_prompts_marked(retry_errors):
    from pipeline.planning.plan import still_to_do

    cfg = RunConfig(manifest="/tmp/m.jsonl", output="/tmp/unused", model="unused", retry_errors=retry_errors,
                    retry_flagged=["repetition"])
    records, committed, raw = random_plan_inputs(random.Random(f"flagged{retry_errors}"), 2000, flagged=True)
    got = still_to_do(records, committed, cfg).to_pylist()
    want = reference_still_to_do(records.to_pylist(), raw, cfg)
    assert [(r["_todo"], r["prompts"], sorted(r["_replaces"]) if r["_replaces"] else None, r["retry_prompts"])
            for r in got] == want
    assert any(w[3] for w in want)  # some records redo flagged rows


def test_flagged_rows_for_retry_are_first_attempts_with_a_chosen_flag():
    from pipeline.output.committed import flagged_for_retry

    rows = pa.table({"status": ["ok", "ok", "ok", "error", "ok", "ok"],
                     "quality_flags": pa.array([["repetition"], ["truncated"], ["repetition"], None, None, []], pa.list_(pa.string())),
                     "attempt": pa.array([1, 1, 2, None, None, 1], pa.int64())})
    assert flagged_for_retry(rows, ["repetition", "echo"]).to_pylist() == [True, False, False, False, False, False]


def test_many_partitions_plan_as_one_does(ray_local, tmp_path, monkeypatch):
    """Repeated ids across files and committed rows meet in their id's partition, whatever the
    number of partitions (the hash split of ids across Ray tasks)."""
    from datetime import datetime, timezone

    import pipeline.planning.plan as plan
    from pipeline.output.location import OutputLocation
    from pipeline.planning.manifest import manifest_file_sizes
    from pipeline.schemas import output_arrow_schema

    rng = random.Random(7)
    (tmp_path / "m").mkdir()
    for f in range(3):
        (tmp_path / "m" / f"day{f}.jsonl").write_text("".join(
            json.dumps({"id": f"i{rng.randrange(400)}", "uri": f"s3://b/{f}-{i}.mp4"}) + "\n" for i in range(300))
            + '{"uri": "s3://b/no-id.mp4"}\n')
    cfg = RunConfig(manifest=str(tmp_path / "m"), output=str(tmp_path / "out"), model="unused", allowed_uri_prefixes=["s3://b/"])
    (tmp_path / "out").mkdir()
    done = [f"i{i}" for i in range(0, 400, 3)]
    schema = output_arrow_schema()
    committed = {"id": done, "prompt": [cfg.default_prompt("video")] * len(done), "media_type": ["video"] * len(done),
                 "status": ["ok"] * len(done), "config_key": [cfg.config_key()] * len(done), "task": ["caption"] * len(done),
                 "model": ["unused"] * len(done), "run_id": ["earlier"] * len(done),
                 "created_at": [datetime.now(timezone.utc)] * len(done)}
    pq.write_table(pa.table({n: committed.get(n, pa.nulls(len(done), schema.field(n).type)) for n in schema.names},
                            schema=schema), tmp_path / "out" / "part-earlier-0.parquet")
    files = manifest_file_sizes(cfg.manifest, cfg)

    def planned():
        p = plan.plan_run(cfg, OutputLocation.of(cfg.output, cfg.storage), files)
        rows = sorted((r for r in p.records.take_all() if r["_todo"]), key=lambda r: r["_order"])
        return p, [(r["id"], r["source"], r["error_type"], r["prompts"]) for r in rows]

    one, rows_one = planned()
    monkeypatch.setattr(plan, "PARTITION_BYTES", 12_000)  # about 5 partitions
    many, rows_many = planned()
    assert one.partitions == 1 and many.partitions >= 4
    assert rows_many == rows_one
    assert (many.items, many.todo, many.invalid) == (one.items, one.todo, one.invalid)
    kinds = [e for _, _, e, _ in rows_one]
    assert one.items == 903 and one.todo == len(rows_one) and kinds.count("invalid_manifest_row") == 3
    assert kinds.count("duplicate_id") > 100 and one.invalid == kinds.count("duplicate_id") + 3
    # the first row of an id committed earlier is not done again; the others are, with the run's default prompt
    firsts = [rid for rid, _, e, _ in rows_one if e is None]
    assert len(firsts) == len(set(firsts)) and not set(firsts) & set(done)
    assert set(firsts) | set(done) == {f"i{i}" for i in range(400)} & ({r for r, _, _, _ in rows_one} | set(done))
    assert all(prompts is None for _, _, e, prompts in rows_one if e is None) and one.committed == 903 - one.todo > 100


def test_an_unreadable_committed_file_stops_the_plan_naming_it(ray_local, tmp_path):
    from pipeline.output.committed import OutputError
    from pipeline.output.location import OutputLocation
    from pipeline.planning.manifest import manifest_file_sizes
    from pipeline.planning.plan import plan_run

    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "uri": "s3://b/a.mp4"}) + "\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-x-0.parquet").write_bytes(b"PAR1 not really")
    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), model="unused",
                    allowed_uri_prefixes=["s3://b/"])
    with pytest.raises(OutputError, match=r"cannot read .*part-x-0.parquet in the output .*move it out of the output"):
        plan_run(cfg, OutputLocation.of(cfg.output, cfg.storage), manifest_file_sizes(cfg.manifest, cfg))
