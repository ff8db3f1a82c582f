"""Quality as data in a real run (local Ray, tiny random-weight checkpoint): finish reason and flags on
every generated row, their counts in the ledger, the summary line and --dry-run, the cross-row checks,
and --retry-flagged replacing flagged rows exactly once."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_job import run_job

from pipeline import schemas
from pipeline.config import QualityConfig, RunConfig
from pipeline.output.committed import read_files
from pipeline.output.location import OutputLocation


def rows_of(out) -> list[dict]:
    return pads.dataset(str(out), format="parquet", schema=schemas.output_arrow_schema()).to_table().to_pylist()


@pytest.fixture(scope="module")
def flagged_run(ray_local, samples, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    args = ["--manifest", samples / "manifest.jsonl", "--output", out, "--model", tiny_model, "--max-new-tokens", 24,
            "--num-frames", 2, "--batch-size", 3]
    return args, out


def test_every_generated_row_has_a_finish_reason_and_flags_counted_everywhere(flagged_run, capsys):
    args, out = flagged_run
    assert run_job(*args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rows = rows_of(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6
    for r in ok:
        assert r["finish_reason"] in ("stop", "length") and r["attempt"] == 1
        assert ("truncated" in r["quality_flags"]) == (r["finish_reason"] == "length")
        assert (r["finish_reason"] == "length") == (r["output_tokens"] == 24)
        assert json.loads(r["generation"])["max_new_tokens"] == 24
        # the random-weight model's noise is flagged for what it is (not_text, repetition), not only cut
        assert set(r["quality_flags"]) & {"not_text", "repetition"}, (r["text"], r["quality_flags"])
    error = next(r for r in rows if r["status"] == "error")
    assert error["quality_flags"] is None and error["finish_reason"] is None
    ledger = json.loads((out / "_SUCCESS").read_text())
    flags = Counter(f for r in ok for f in r["quality_flags"])
    assert ledger["quality"] == {"generated_rows": 6, "flagged_rows": 6, "by_flag": dict(sorted(flags.items())),
                                 "by_finish_reason": dict(Counter(r["finish_reason"] for r in ok))}
    assert set(ledger["quality_checks"]) == {"same_text", "near_duplicate_windows"}
    assert "quality: 6 of 6 rows flagged (" in line and f"not_text={flags['not_text']}" in line

    assert run_job(*args, "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "plan: items=7 committed=7 todo=0" in dry and "committed quality: 6 of 6 rows flagged" in dry
    assert run_job(*args, "--dry-run", "--retry-flagged", "not_text,repetition") == 0
    assert "todo=6" in capsys.readouterr().out


def test_retry_flagged_replaces_flagged_rows_once_with_the_fallback(flagged_run, capsys):
    args, out = flagged_run
    if not (out / "_SUCCESS").exists():
        assert run_job(*args) == 0
    before = {r["id"]: r for r in rows_of(out)}
    retried = {i for i, r in before.items() if r["status"] == "ok" and "not_text" in r["quality_flags"]}
    assert retried
    assert run_job(*args, "--retry-flagged", "not_text") == 0
    after = rows_of(out)
    assert sorted(r["id"] for r in after) == sorted(before)  # each (id, prompt) once
    for r in after:
        if r["id"] in retried:
            settings = json.loads(r["generation"])
            assert r["attempt"] == 2 and settings["repetition_penalty"] == 1.2 and settings["no_repeat_ngram_size"] == 4
            assert r["config_key"] == before[r["id"]]["config_key"]  # planned as the run's settings: done from now on
        else:
            assert r == before[r["id"]]
    ledger = json.loads((out / "_SUCCESS").read_text())
    assert ledger["items"] == len(retried)
    # attempt 2 is final: the same command, and a plain rerun, have nothing to do
    for extra in (["--retry-flagged", "not_text"], []):
        assert run_job(*args, *extra) == 0
        assert json.loads((out / "_SUCCESS").read_text())["items"] == 0
    assert len(rows_of(out)) == len(before)


def test_an_output_of_schema_version_1_is_read_and_planned_as_before(ray_local, samples, tiny_model, tmp_path, capsys):
    """A file without the new columns: its rows count as done (no flags), and the settings key is the old one."""
    from pipeline.output.committed import committed_quality

    args = ["--manifest", samples / "manifest.jsonl", "--output", tmp_path, "--model", tiny_model, "--max-new-tokens", 2,
            "--num-frames", 2]
    assert run_job(*args) == 0
    for path in tmp_path.glob("part-*.parquet"):  # as an older version wrote it
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["finish_reason", "quality_flags", "attempt", "generation"]), path)
    assert run_job(*args, "--retry-flagged", "truncated") == 0  # old rows carry no flags: nothing to redo
    assert json.loads((tmp_path / "_SUCCESS").read_text())["items"] == 0
    cfg = RunConfig(manifest=str(samples / "manifest.jsonl"), output=str(tmp_path), model=str(tiny_model), num_frames=2,
                    generation={"max_new_tokens": 2})
    assert committed_quality(cfg, OutputLocation.of(cfg.output, cfg.storage)).generated == 0
    assert len(rows_of(tmp_path)) == 7


def test_cross_row_checks_find_a_collapsed_model_and_near_identical_windows(ray_local, tmp_path):
    """Staged rows written by hand: one caption for six images; three windows of one video, two alike."""
    from pipeline.quality.run_checks import run_checks

    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), model="m",
                    quality=QualityConfig(same_text_min_media=5))
    same = "A close-up of a colorful abstract pattern."
    rows = [dict(id=f"img{i}", uri=f"/m/{i}.jpg", media_type="image", text=same if i < 6 else f"Picture number {i}.")
            for i in range(8)]
    windows = ["A man walks a dog along a river on a sunny day.", "A man walks a dog along a river on a sunny day!",
               "The man throws a stick and the dog swims after it."]
    rows += [dict(id=f"clip{i}", uri="/m/v.mp4", media_type="video", text=t, frame_timestamps_s=[10.0 * i, 10.0 * i + 5])
             for i, t in enumerate(windows)]
    rows += [dict(id="other", uri="/m/w.mp4", media_type="video", text=windows[0], frame_timestamps_s=[0.0])]
    schema = schemas.output_arrow_schema()
    table = pa.Table.from_pylist([{**{n: None for n in schema.names}, "task": "caption", "status": "ok", "model": "m",
                                   "config_key": "k", "run_id": "r", "created_at": pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py(),
                                   "prompt": "Describe.", **r} for r in rows], schema=schema)
    (tmp_path / "out").mkdir()
    pq.write_table(table, tmp_path / "out" / "part-x.parquet")
    errors = table.slice(0, 2).set_column(table.schema.get_field_index("status"), "status", pa.array(["error"] * 2))
    pq.write_table(errors, tmp_path / "out" / "part-y.parquet")  # a file without ok rows beside it
    out = OutputLocation.of(cfg.output, cfg.storage)
    checks = run_checks(cfg, lambda fn: read_files(out, [out.child(f"part-{x}.parquet") for x in "xy"], fn), table.num_rows)
    assert checks["same_text"]["found"] == 1 and checks["same_text"]["rows"] == 6
    assert checks["same_text"]["examples"][0]["text"] == same and checks["same_text"]["examples"][0]["media"] == 6
    near = checks["near_duplicate_windows"]
    assert (near["found"], near["rows"]) == (1, 2) and near["examples"][0]["ids"] == ["clip0", "clip1"]


def test_cross_row_checks_of_a_run_of_error_rows_find_nothing(tmp_path):
    from pipeline.quality.run_checks import run_checks

    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path), model="m")
    schema = schemas.output_arrow_schema()
    rows = [{**{n: None for n in schema.names}, "id": f"e{i}", "task": "caption", "status": "error", "model": "m",
             "config_key": "k", "run_id": "r", "created_at": pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "part-e.parquet")
    out = OutputLocation.of(cfg.output, cfg.storage)
    checks = run_checks(cfg, lambda fn: read_files(out, [out.child("part-e.parquet")], fn), 0)  # no ok rows: nothing to shuffle
    assert checks == {name: {"found": 0, "rows": 0, "examples": []} for name in ("same_text", "near_duplicate_windows")}
