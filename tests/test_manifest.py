import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.planning.manifest import ManifestError, scan_manifest


def cfg_for(manifest, **kw) -> RunConfig:
    kw.setdefault("allowed_uri_prefixes", ["s3://b/", "/"])  # these tests are about parsing, not the URI policy
    return RunConfig(manifest=str(manifest), output="/tmp/unused", model="unused", **kw)


def by_id(scan):
    return {r["id"]: r for r in scan.records.to_pylist() if r["id"] is not None}


def test_jsonl_rows_validated_and_bad_rows_become_error_records(tmp_path):
    lines = [
        json.dumps({"id": "a", "uri": "s3://b/a.mp4", "start_s": 1, "end_s": 3.5}),
        json.dumps({"id": 7, "uri": "x.jpg", "media_type": "image", "extra_column": "kept out"}),
        json.dumps({"uri": "no-id.mp4"}),
        json.dumps({"id": "bad-type", "uri": "x.mp4", "media_type": "audio"}),
        json.dumps({"id": "bad-window", "uri": "x.mp4", "start_s": 5, "end_s": 2}),
        "{not json",
        json.dumps({"id": "a", "uri": "s3://b/other.mp4"}),
        "",
        json.dumps(["a", "list"]),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    scan = scan_manifest(cfg_for(tmp_path / "m.jsonl"))
    rows = scan.records.to_pylist()
    assert len(rows) == 8  # the blank line is not a row
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["id"] for r in ok] == ["a", "7"]
    assert ok[0]["start_s"] == 1.0 and ok[0]["end_s"] == 3.5
    errors = [r for r in rows if r["status"] == "error"]
    assert [e["error_type"] for e in errors] == ["invalid_manifest_row"] * 4 + ["duplicate_id", "invalid_manifest_row"]
    messages = [e["error"] for e in errors]
    assert "'id' is a required property" in messages[0] and "m.jsonl:line 3" in messages[0]
    assert "column 'media_type'" in messages[1]
    assert "end_s (2) must be greater than start_s (5)" in messages[2]
    assert "not valid JSON" in messages[3] and "line 6" in messages[3]
    assert errors[4]["id"] == "a" and "only its first row is processed" in messages[4]
    assert all("Fix this manifest row" in m for m in messages)


def test_csv_and_parquet_and_prefix_with_many_files(tmp_path):
    (tmp_path / "day1").mkdir()
    (tmp_path / "day1" / "a.csv").write_text(
        'id,uri,questions,start_s,end_s\n'
        'c1,v1.mp4,"[""What?"", ""Where?""]",0.5,\n'
        'c2,v2.mp4,,,\n'
        'c3,v3.mp4,,soon,\n'
    )
    pq.write_table(pa.table({"id": ["p1", "p2"], "uri": ["i1.png", "i2.png"], "prompt": ["Say hi.", None]}),
                   tmp_path / "day1" / "b.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "g1", "uri": "g.mp4"}) + "\n")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("not a manifest")
    scan = scan_manifest(cfg_for(tmp_path))
    assert len(scan.files) == 3
    rows = by_id(scan)
    assert rows["c1"]["questions"] == ["What?", "Where?"] and rows["c1"]["start_s"] == 0.5 and rows["c1"]["end_s"] is None
    assert rows["c2"]["status"] == "ok" and rows["c2"]["questions"] is None
    assert rows["c3"]["status"] == "error" and "start_s" in rows["c3"]["error"]
    assert rows["p1"]["prompt"] == "Say hi." and rows["p2"]["prompt"] is None
    assert rows["g1"]["status"] == "ok"


def test_qa_rows_need_questions_or_a_prompt(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "q", "uri": "v.mp4", "questions": ["Why?"]}) + "\n" + json.dumps({"id": "n", "uri": "v.mp4"}) + "\n")
    rows = by_id(scan_manifest(cfg_for(tmp_path / "m.jsonl", task="qa")))
    assert rows["q"]["status"] == "ok"
    assert rows["n"]["status"] == "error" and "--task qa needs questions" in rows["n"]["error"]
    rows = by_id(scan_manifest(cfg_for(tmp_path / "m.jsonl", task="qa", prompt="What happens?")))
    assert rows["n"]["status"] == "ok"


def test_unreadable_manifest_stops_the_run_with_a_reason(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        scan_manifest(cfg_for(tmp_path / "missing.jsonl"))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="cannot tell the format"):
        scan_manifest(cfg_for(tmp_path / "m.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no manifest files"):
        scan_manifest(cfg_for(tmp_path / "empty"))


def test_uri_policy_default_is_the_manifests_own_folder_or_bucket(tmp_path):
    from pipeline.io.urls import default_media_prefixes

    media = tmp_path / "media"
    media.mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (media / "link.mp4").symlink_to(tmp_path / "outside.mp4")  # a symlink out of the folder
    rows = {
        "inside": str(media / "a.mp4"),
        "relative": "sub/b.mp4",  # beside the manifest
        "file-scheme": f"file://{media}/c.mp4",
        "dotdot": f"{media}/../outside.mp4",
        "symlink": str(media / "link.mp4"),
        "etc": "file:///etc/passwd",
        "concat": f"concat:{media}/a.mp4|/etc/passwd",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "bucket": "s3://other-bucket/a.mp4",
        "chained": f"simplecache::{media}/a.mp4",
    }
    manifest = media / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": k, "uri": u}) + "\n" for k, u in rows.items()))
    scan = scan_manifest(RunConfig(manifest=str(manifest), output="/tmp/unused", model="unused"))
    got = by_id(scan)
    allowed = {"inside", "relative", "file-scheme"}
    assert {k for k, r in got.items() if r["status"] == "ok"} == allowed
    assert got["relative"]["uri"] == f"{media}/sub/b.mp4"
    for key in set(rows) - allowed:
        assert got[key]["error_type"] == "uri_not_allowed", key
        assert "--allow-uri-prefix" in got[key]["error"]
    assert default_media_prefixes("s3://bucket/manifests/dt=2026-11-21/") == ["s3://bucket/"]


def test_allow_uri_prefix_replaces_the_default(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "s3", "uri": "s3://media/clips/a.mp4"}) + "\n"
                        + json.dumps({"id": "s3-other", "uri": "s3://media/private/a.mp4"}) + "\n"
                        + json.dumps({"id": "local", "uri": str(tmp_path / "a.mp4")}) + "\n"
                        + json.dumps({"id": "local", "uri": "s3://media/clips/dup.mp4"}) + "\n")
    got = scan_manifest(RunConfig(manifest=str(manifest), output="/tmp/unused", model="unused",
                                  allowed_uri_prefixes=["s3://media/clips/"])).records.to_pylist()
    assert [(r["id"], r["status"], r["error_type"]) for r in got] == [
        ("s3", "ok", None), ("s3-other", "error", "uri_not_allowed"), ("local", "error", "uri_not_allowed"),
        ("local", "error", "duplicate_id")]


def test_rows_with_several_images(tmp_path):
    from pipeline.planning.manifest import prompts_for

    lines = [
        {"id": "pair", "uris": ["s3://b/1.jpg", "s3://b/2.png"]},
        {"id": "both", "uri": "s3://b/1.jpg", "uris": ["s3://b/2.png"]},
        {"id": "neither", "prompt": "What?"},
        {"id": "as-video", "uris": ["a.jpg", "b.jpg"], "media_type": "video"},
        {"id": "empty", "uris": []},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "m.csv").write_text('id,uris\ncsv-pair,"[""x.jpg"", ""y.jpg""]"\n')
    cfg = cfg_for(tmp_path)
    rows = by_id(scan_manifest(cfg))
    assert rows["pair"]["status"] == "ok" and rows["pair"]["uris"] == ["s3://b/1.jpg", "s3://b/2.png"]
    assert rows["pair"]["uri"] is None
    assert prompts_for(rows["pair"], "image", cfg) == ["Describe these images in detail."]
    assert rows["csv-pair"]["status"] == "ok" and rows["csv-pair"]["uris"] == [str(tmp_path / "x.jpg"), str(tmp_path / "y.jpg")]
    assert "give 'uri' (one media file) or 'uris' (several images), not both" in rows["both"]["error"]
    assert "missing 'uri' (one media file) or 'uris' (several images)" in rows["neither"]["error"]
    assert "holds images" in rows["as-video"]["error"]
    assert "column 'uris'" in rows["empty"]["error"]
    assert {r["error_type"] for k, r in rows.items() if "pair" not in k} == {"invalid_manifest_row"}


@pytest.mark.parametrize("uri", ["bad\x00name.mp4", "/abs/bad\x00name.mp4", "http://[::1/x.mp4", "https://[fe80::1/a.mp4",
                                 "https://ex[ample.com/a.mp4", "file:///tmp/\x00"])
def test_malformed_uris_become_error_rows_not_a_crash(tmp_path, uri):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "bad", "uri": uri}) + "\n"
                                      + json.dumps({"id": "good", "uri": "ok.mp4"}) + "\n")
    scan = scan_manifest(RunConfig(manifest=str(tmp_path / "m.jsonl"), output="/tmp/unused", model="unused",
                                   allowed_uri_prefixes=[str(tmp_path), "s3://b/", "https://example.com/"]))
    rows = by_id(scan)
    assert rows["bad"]["status"] == "error" and rows["bad"]["error_type"] == "uri_not_allowed", rows["bad"]
    assert "--allow-uri-prefix" in rows["bad"]["error"] or "Fix this manifest row" in rows["bad"]["error"]
    assert rows["good"]["status"] == "ok"


def test_a_relative_manifest_path_admits_the_relative_media_paths_in_it(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.jsonl").write_text(json.dumps({"id": "a", "uri": "clip.mp4"}) + "\n")
    monkeypatch.chdir(tmp_path)
    scan = scan_manifest(RunConfig(manifest="data/m.jsonl", output="/tmp/unused", model="unused"))
    (row,) = scan.records.to_pylist()
    assert row["status"] == "ok", row["error"]
    assert row["uri"] == str(tmp_path / "data" / "clip.mp4")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifests_saved_with_a_utf8_byte_order_mark_parse(tmp_path, suffix):
    body = ("id,uri,prompt\nx1,a.mp4,Describe it.\n" if suffix == ".csv"
            else json.dumps({"id": "x1", "uri": "a.mp4", "prompt": "Describe it."}) + "\n")
    (tmp_path / f"m{suffix}").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (row,) = scan_manifest(cfg_for(tmp_path / f"m{suffix}")).records.to_pylist()
    assert row["status"] == "ok", row["error"]
    assert row["id"] == "x1" and row["prompt"] == "Describe it."


def test_a_line_nested_too_deep_is_an_error_row_not_a_crash(tmp_path):
    """`{"id":"b","uri":"x.mp4","extra":` and 100,000 '[' raised RecursionError out of the scan."""
    deep = '{"id": "b", "uri": "s3://b/x.mp4", "extra": ' + "[" * 100_000
    (tmp_path / "m.jsonl").write_text("\n".join([json.dumps({"id": "a", "uri": "s3://b/a.mp4"}), deep,
                                                 json.dumps({"id": "c", "uri": "s3://b/c.mp4"})]) + "\n")
    rows = {r["source"].rsplit(" ", 1)[1]: r for r in scan_manifest(cfg_for(tmp_path / "m.jsonl")).records.to_pylist()}
    assert rows["2"]["status"] == "error" and rows["2"]["error_type"] == "invalid_manifest_row", rows["2"]
    assert "nests" in rows["2"]["error"]
    assert rows["1"]["status"] == rows["3"]["status"] == "ok"
    (tmp_path / "m.csv").write_text('id,uri,questions\nq,s3://b/q.mp4,"' + "[" * 100_000 + '"\n')
    [row] = scan_manifest(cfg_for(tmp_path / "m.csv", task="qa")).records.to_pylist()
    assert row["error_type"] == "invalid_manifest_row", row


def test_folders_whose_names_start_with_a_dot_or_underscore_hold_no_manifests(tmp_path):
    """.git/, _temporary/ (Spark's and Hadoop's writers), _runs/ under a manifest prefix used to be read
    as manifests although the README says `.` and `_` names are skipped."""
    (tmp_path / "day1").mkdir()
    (tmp_path / "day1" / "a.jsonl").write_text(json.dumps({"id": "a", "uri": "s3://b/a.mp4"}) + "\n")
    for folder in (".git/objects", "_temporary/0/task", "_runs", "day1/.hidden", "day1/_staging/run"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "part.jsonl").write_text(json.dumps({"id": f"from-{folder}", "uri": "s3://b/x.mp4"}) + "\n")
    scan = scan_manifest(cfg_for(tmp_path))
    assert scan.files == [str(tmp_path / "day1" / "a.jsonl")]
    assert set(by_id(scan)) == {"a"}
    inside_dot = tmp_path / ".cache" / "manifests"  # a prefix that itself sits under a dot folder is still read
    inside_dot.mkdir(parents=True)
    (inside_dot / "m.jsonl").write_text(json.dumps({"id": "d", "uri": "s3://b/d.mp4"}) + "\n")
    assert set(by_id(scan_manifest(cfg_for(inside_dot)))) == {"d"}


def test_an_overlong_jsonl_line_is_an_error_row_read_past_without_being_held(tmp_path):
    """A line without a newline used to be held whole (carry + block, again and again, then parsed:
    ~10x its size). Scanned in a fresh process whose peak memory (VmHWM) is read before and after."""
    import subprocess
    import sys
    from pathlib import Path

    good = [json.dumps({"id": f"g{i}", "uri": "s3://b/a.mp4"}) for i in range(3)]
    huge = '{"id": "huge", "uri": "s3://b/x.mp4", "prompt": "' + "x" * (40 << 20)  # 40 MB, no newline in it
    (tmp_path / "m.jsonl").write_text("\n".join([good[0], huge + '"}', good[1], huge]) + "\n" + good[2])
    (tmp_path / "end.jsonl").write_text(good[0] + "\n" + huge)  # an overlong last line without a newline
    (tmp_path / "warm.jsonl").write_text("\n".join(good + ['{"id": "bad", "uri": 3}', "{not json"]) + "\n")
    del huge
    code = f"""
import json, re
from pipeline.config import RunConfig
from pipeline.planning import manifest
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
manifest.MAX_LINE_BYTES = 1 << 20
manifest.SCAN_CHUNK_BYTES = 64 << 10
warm = RunConfig(manifest={str(tmp_path)!r} + "/warm.jsonl", output="/tmp/unused", model="unused", allowed_uri_prefixes=["s3://b/"])
manifest.scan_manifest(warm)  # the scan's own imports and buffers, before the measurement
before = peak_mb()
out = {{}}
for name in ("m.jsonl", "end.jsonl"):
    cfg = RunConfig(manifest={str(tmp_path)!r} + "/" + name, output="/tmp/unused", model="unused", allowed_uri_prefixes=["s3://b/"])
    out[name] = [[r["status"], r["error_type"], r["error"]] for r in manifest.scan_manifest(cfg).records.to_pylist()]
print(json.dumps({{"grown_mb": peak_mb() - before, "rows": out}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["grown_mb"] < 30, result["grown_mb"]  # the two 40 MB lines were never held
    rows = result["rows"]["m.jsonl"]
    assert [r[0] for r in rows] == ["ok", "error", "ok", "error", "ok"], rows
    assert all(rows[n][1] == "invalid_manifest_row" and "longer than 1 MB" in rows[n][2] for n in (1, 3))
    assert [r[0] for r in result["rows"]["end.jsonl"]] == ["ok", "error"]


def test_questions_and_images_per_row_are_bounded_with_a_short_message(tmp_path):
    """10,000 questions about one item were accepted (each a row carrying the item's pixels)."""
    rows = [{"id": "many", "uri": "s3://b/a.mp4", "questions": [f"Q{i}?" for i in range(10_000)]},
            {"id": "most", "uri": "s3://b/a.mp4", "questions": [f"Q{i}?" for i in range(256)]},
            {"id": "album", "uris": [f"s3://b/{i}.jpg" for i in range(65)]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = by_id(scan_manifest(cfg_for(tmp_path / "m.jsonl", task="qa")))
    assert got["most"]["status"] == "ok"
    for rid, n, most in (("many", "10,000", 256), ("album", "65", 64)):
        assert got[rid]["error_type"] == "invalid_manifest_row", got[rid]
        assert f"{n} items, more than the {most}" in got[rid]["error"] and len(got[rid]["error"]) < 300
