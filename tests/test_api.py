"""The public Python API (pipeline.caption): a user's own Ray Data pipeline around the stages, as the
README's example writes it; rows checked by the manifest's rules; the config it takes."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import REPO

import pipeline
from pipeline import schemas


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def user_table(path, samples):
    """The user's own table: manifest columns and one of their own (`split`), good and bad media."""
    rows = [  # (id, uri, prompt, split)
        ("street", samples / "street.mp4", None, "eval"),
        ("photo", samples / "photo.jpg", "Describe this photo in one sentence.", "eval"),
        ("palette", samples / "palette.gif", None, "eval"),  # an image the table does not say is one
        ("beach", samples / "beach.webm", None, "train"),  # left out by the user's filter
        ("missing", samples / "does-not-exist.mp4", None, "eval"),
        ("outside", "/etc/hostname", None, "eval"),  # not under the allowed prefixes: never read
        ("no-media", None, None, "eval"),  # neither uri nor uris
    ]
    columns = list(zip(*rows))
    pq.write_table(pa.table({"id": list(columns[0]), "uri": [str(u) if u else None for u in columns[1]],
                             "prompt": pa.array(columns[2], pa.string()), "split": list(columns[3])}), path)


def test_the_readme_example_runs_a_users_read_filter_caption_and_write(ray_local, samples, tiny_model, tmp_path):
    table, out = tmp_path / "clips.parquet", tmp_path / "captions"
    user_table(table, samples)
    code = readme_example()
    (line,) = [ln for ln in code.splitlines() if ln.startswith("TABLE, MEDIA, MODEL, OUT = ")]
    code = code.replace(line, f"TABLE, MEDIA, MODEL, OUT = {str(table)!r}, {f'{samples}/'!r}, {str(tiny_model)!r}, {str(out)!r}")
    namespace = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102 - the README's own example

    written = pads.dataset(str(out), format="parquet").to_table()
    assert set(written.column_names) == set(schemas.OUTPUT_COLUMNS)
    rows = {r["id"]: r for r in written.to_pylist()}
    assert sorted(rows) == ["missing", "no-media", "outside", "palette", "photo", "street"]  # beach: filtered out
    for rid in ("street", "photo", "palette"):
        assert rows[rid]["status"] == "ok" and rows[rid]["text"] and rows[rid]["output_tokens"] >= 1, rows[rid]
    assert rows["street"]["prompt"] == "Describe this video in detail." and rows["street"]["media_type"] == "video"
    assert rows["street"]["num_frames"] == 8 and rows["street"]["codec"] == "h264"
    assert rows["photo"]["prompt"] == "Describe this photo in one sentence."
    assert rows["palette"]["prompt"] == "Describe this image in detail." and rows["palette"]["media_type"] == "image"
    assert (rows["missing"]["status"], rows["missing"]["error_type"]) == ("error", "not_found")
    assert rows["outside"]["error_type"] == "uri_not_allowed" and "input row 'outside'" in rows["outside"]["error"]
    assert rows["no-media"]["error_type"] == "invalid_manifest_row" and rows["no-media"]["prompt"] is None
    config = namespace["config"]
    assert {(r["run_id"], r["config_key"], r["task"]) for r in rows.values()} == {(config.run_id, config.config_key(), "caption")}
    # nothing committed: no ledger, commit point, staging or lease anywhere, only the user's own files
    assert not [p for p in tmp_path.rglob("_*")] and not [p for p in samples.rglob("_*")]
    assert {p.suffix for p in out.iterdir()} == {".parquet"}


def test_input_rows_are_checked_by_the_manifests_rules(tmp_path):
    """The same rows as a manifest file and as a table: the same records (but for where a row came from)."""
    from pipeline.config import CaptionConfig, RunConfig
    from pipeline.planning.manifest import records_from_rows, scan_manifest

    media = tmp_path / "media"
    media.mkdir()
    rows = [
        {"id": "ok", "uri": f"{media}/a.mp4", "start_s": 1.0, "end_s": 3.0},
        {"id": "pair", "uris": [f"{media}/a.jpg", f"{media}/b.jpg"]},
        {"id": "qa", "uri": f"{media}/c.jpg", "questions": ["Red?", "Blue?"]},
        {"id": "own", "uri": f"{media}/d.jpg", "prompt": "Say it."},
        {"id": "outside", "uri": "/etc/passwd"},
        {"id": "dotdot", "uri": f"{media}/../secret.mp4"},
        {"id": "both", "uri": f"{media}/a.mp4", "uris": [f"{media}/a.jpg"]},
        {"id": "window", "uri": f"{media}/a.mp4", "start_s": 5.0, "end_s": 2.0},
        {"id": "kind", "uri": f"{media}/a.mp4", "media_type": "audio"},
        {"uri": f"{media}/no-id.mp4"},
    ]
    (media / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task in ("caption", "qa"):
        scanned = scan_manifest(RunConfig(manifest=str(media / "m.jsonl"), output="/tmp/unused", model="unused", task=task,
                                          prompt="What?" if task == "qa" else None))
        cfg = CaptionConfig(model="unused", allowed_uri_prefixes=[f"{media}/"], task=task, prompt="What?" if task == "qa" else None)
        table = pa.Table.from_pylist([{k: r.get(k) for k in ("id", "uri", "uris", "media_type", "prompt", "questions", "start_s", "end_s")}
                                      | {"extra": 1} for r in rows])
        got = records_from_rows(table, scanned.prefixes, cfg).to_pylist()
        want = scanned.records.to_pylist()
        assert [r["id"] for r in got] == [r["id"] for r in want]
        drop = ("source", "error")
        assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [{k: v for k, v in r.items() if k not in drop} for r in want]
        assert all(r["source"] is None for r in got)
        for mine, theirs in zip(got, want):  # the same reason, named by the row instead of the file and line
            if theirs["error"]:
                reason = mine["error"].split(": ", 1)[1].split("; if this source is trusted")[0].removesuffix(". Fix this row and rerun.")
                assert reason in theirs["error"], (mine["error"], theirs["error"])
    kinds = {r["id"]: r["error_type"] for r in got}
    assert kinds["outside"] == kinds["dotdot"] == "uri_not_allowed" and kinds["both"] == kinds["window"] == "invalid_manifest_row"
    assert {r["id"]: r["prompts"] for r in got}["qa"] == ["Red?", "Blue?"]


def test_the_config_names_where_media_may_be_and_import_stays_cheap():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="allowed_uri_prefixes"):
        pipeline.CaptionConfig(model="m")
    with pytest.raises(ValidationError, match="at least 1 item"):
        pipeline.CaptionConfig(model="m", allowed_uri_prefixes=[])
    config = pipeline.CaptionConfig(model="m", allowed_uri_prefixes=["s3://media/"], batch_size=2)
    assert not {"manifest", "output", "lease_ttl_s"} & set(type(config).model_fields)
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipeline; pipeline.caption, pipeline.CaptionConfig; "
                             "print(sorted(m for m in ('torch', 'ray', 'transformers', 'av') if m in sys.modules))"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
