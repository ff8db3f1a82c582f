"""The job end to end on a local Ray cluster: sample data, tiny checkpoint, Parquet out."""

import json

import duckdb
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from jobs import caption_videos
from pipeline import schemas


def run_job(*args) -> int:
    return caption_videos.main([str(a) for a in args])


@pytest.fixture(scope="module")
def caption_run(ray_local, samples, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("captions")
    code = run_job("--manifest", samples / "manifest.jsonl", "--output", out, "--model", tiny_model,
                   "--max-new-tokens", 6, "--num-frames", 4, "--batch-size", 3)
    return code, out


def test_caption_run_writes_one_row_per_item_with_the_output_schema(caption_run, samples):
    code, out = caption_run
    assert code == 0
    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.schema == schemas.output_arrow_schema()
    manifest_ids = [json.loads(line)["id"] for line in (samples / "manifest.jsonl").read_text().splitlines()]
    assert sorted(table.column("id").to_pylist()) == sorted(manifest_ids)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["missing"]["status"] == "error" and rows["missing"]["error_type"] == "not_found"
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["text"] is not None and r["output_tokens"] >= 1 for r in ok)
    assert len({r["run_id"] for r in rows.values()}) == 1 and all(r["task"] == "caption" for r in ok)
    street = rows["street"]
    assert (street["media_type"], street["codec"], street["num_frames"]) == ("video", "h264", 4)
    assert street["frame_timestamps_s"][0] == 0.0 and street["duration_s"] == pytest.approx(4.0)
    assert street["prompt"] == "Describe this video in detail."
    assert rows["beach"]["codec"] == "vp9"
    assert rows["photo"]["prompt"] == "Describe this photo in one sentence."
    assert (rows["photo"]["width"], rows["photo"]["height"], rows["photo"]["num_frames"]) == (120, 80, 1)
    assert rows["palette"]["prompt"] == "Describe this image in detail."
    clip = rows["long-gop-clip"]
    assert 2.0 <= clip["frame_timestamps_s"][0] and clip["frame_timestamps_s"][-1] < 8.0
    assert all(r["prompt_tokens"] > 0 for r in ok)
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows"] == 7 and success["by_status"] == {"ok": 6, "error": 1}


def test_output_is_readable_by_pandas_and_duckdb(caption_run):
    _, out = caption_run
    df = pd.read_parquet(out)
    assert len(df) == 7 and set(df.columns) == set(schemas.OUTPUT_COLUMNS)
    counts = duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{out}/*.parquet') GROUP BY status ORDER BY status").fetchall()
    assert counts == [("error", 1), ("ok", 6)]


def test_qa_gives_one_row_per_question_and_reruns_do_not_duplicate(ray_local, samples, tiny_model, tmp_path):
    args = ["--manifest", samples / "manifest.jsonl", "--output", tmp_path, "--model", tiny_model, "--task", "qa",
            "--prompt", "What happens?", "--max-new-tokens", 4, "--num-frames", 2]
    assert run_job(*args) == 0
    assert run_job(*args) == 0  # rerun into the same output
    df = pd.read_parquet(tmp_path)
    assert not df.duplicated(["id", "prompt"]).any()
    assert len(df) == 9  # beach and logo have two questions each
    assert sorted(df[df.id == "beach"].prompt) == ["What colors do you see?", "What moves in this video?"]
    assert set(df[df.id == "street"].prompt) == {"What happens?"}
    assert df.run_id.nunique() == 1


def test_bad_manifest_rows_become_error_rows(ray_local, samples, tiny_model, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"id": "good", "uri": str(samples / "photo.jpg")}),
        json.dumps({"id": "no-uri"}),
        "not json at all",
        json.dumps({"id": "good", "uri": str(samples / "logo.png")}),
        json.dumps({"id": "zero", "uri": str(tmp_path / "zero.mp4")}),
    ]) + "\n")
    (tmp_path / "zero.mp4").write_bytes(b"")
    out = tmp_path / "out"
    assert run_job("--manifest", manifest, "--output", out, "--model", tiny_model, "--max-new-tokens", 3,
                   "--allow-uri-prefix", samples, "--allow-uri-prefix", tmp_path) == 0
    df = pd.read_parquet(out)
    assert len(df) == 5
    assert df[df.status == "ok"].id.tolist() == ["good"]
    kinds = sorted(df[df.status == "error"].error_type)
    assert kinds == ["duplicate_id", "invalid_manifest_row", "invalid_manifest_row", "undecodable"]
    assert df.error[df.status == "error"].str.len().min() > 20


def test_malformed_uris_and_a_relative_manifest_path(ray_local, samples, tiny_model, tmp_path, monkeypatch):
    """A relative --manifest admits the relative media paths in it; malformed URIs are error rows
    and the run completes (exit 0)."""
    import shutil

    (tmp_path / "data").mkdir()
    shutil.copy(samples / "photo.jpg", tmp_path / "data" / "photo.jpg")
    shutil.copy(samples / "photo.jpg", tmp_path / "data" / "odd[name.jpg")
    (tmp_path / "data" / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "relative", "uri": "photo.jpg"},
        {"id": "bracket", "uri": "odd[name.jpg"},
        {"id": "nul", "uri": "photo\x00.jpg"},
        {"id": "bad-host", "uri": "http://[::1/x.mp4"},
    ]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert run_job("--manifest", "data/m.jsonl", "--output", "out", "--model", tiny_model, "--max-new-tokens", 2) == 0
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    assert df.loc[["relative", "bracket"], "status"].tolist() == ["ok", "ok"], df.error.to_dict()
    assert df.loc[["nul", "bad-host"], "error_type"].tolist() == ["uri_not_allowed"] * 2


def test_a_run_that_cannot_start_exits_non_zero_with_the_reason(ray_local, tiny_model, tmp_path, capsys):
    code = run_job("--manifest", tmp_path / "nope.jsonl", "--output", tmp_path / "o", "--model", tiny_model)
    assert code != 0
    assert "manifest not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_job("--manifest", "m", "--output", "o", "--model", tiny_model, "--num-frames", 0)
    assert e.value.code == 2


def test_an_empty_manifest_completes_with_no_rows(ray_local, tiny_model, tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    assert run_job("--manifest", tmp_path / "m.jsonl", "--output", tmp_path / "out", "--model", tiny_model) == 0
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["rows"] == 0


def test_cuda_on_a_cluster_without_gpus_is_refused(ray_local, samples, tiny_model, tmp_path, capsys):
    code = run_job("--manifest", samples / "manifest.jsonl", "--output", tmp_path, "--model", tiny_model,
                   "--device", "cuda")
    assert code != 0 and "has no GPUs" in capsys.readouterr().err


def test_a_run_that_lost_rows_commits_nothing_and_the_rerun_does_only_the_rest(
        ray_local, samples, tiny_model, tmp_path, monkeypatch, capsys):
    import pipeline.batch.run

    lines = (samples / "manifest.jsonl").read_text().splitlines(keepends=True)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(lines[:3]))
    out = tmp_path / "out"
    args = ["--manifest", manifest, "--output", out, "--model", tiny_model, "--max-new-tokens", 2, "--num-frames", 2]
    assert run_job(*args) == 0
    first = pd.read_parquet(out)
    assert len(first) == 3

    manifest.write_text("".join(lines))  # four more items
    build = pipeline.batch.run.build_dataset
    drop_photo = lambda table: table.filter(pc.field("id") != "photo")  # noqa: E731  (a stage losing a row)
    monkeypatch.setattr(pipeline.batch.run, "build_dataset",
                        lambda *a, **kw: build(*a, **kw).map_batches(drop_photo, batch_format="pyarrow"))
    assert run_job(*args) != 0
    assert "1 manifest rows have no output row" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)  # nothing committed, nothing lost

    monkeypatch.setattr(pipeline.batch.run, "build_dataset", build)
    assert run_job(*args) == 0
    final = pd.read_parquet(out)
    assert sorted(final.id) == sorted(json.loads(line)["id"] for line in lines)
    assert final.run_id.nunique() == 2 and (final.run_id != first.run_id[0]).sum() == 4
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
