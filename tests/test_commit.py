"""Atomic, idempotent, incremental output: on local disk and on S3 (moto server)."""

import json
import tempfile

import pandas as pd
import pyarrow.dataset as pads
import pytest
from pyarrow import fs as pafs

from pipeline.batch.run import run
from pipeline.config import RunConfig
from pipeline.io.storage import filesystem, join
from pipeline.output import commit
from pipeline.output.location import OutputLocation


def config(manifest, output, model, **kw):
    if "://" not in str(manifest):  # local manifests name the shared sample files in another temp folder
        kw.setdefault("allowed_uri_prefixes", [tempfile.gettempdir()])
    cfg = RunConfig(manifest=str(manifest), output=str(output), model=str(model), num_frames=2, **kw)
    cfg.generation.max_new_tokens = 2
    return cfg


def write_day(root, day, lines):
    folder = root / f"dt={day}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part.jsonl").write_text("".join(lines))


def test_reruns_are_keyed_by_settings_and_retry_errors_replaces_error_rows(ray_local, samples, tiny_model, tmp_path):
    import shutil

    shutil.copy(samples / "photo.jpg", tmp_path / "photo.jpg")
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out"
    manifest.write_text(json.dumps({"id": "photo", "uri": "photo.jpg", "questions": ["Colors?", "Shapes?"]}) + "\n"
                        + json.dumps({"id": "late", "uri": "late.png"}) + "\n")  # not uploaded yet
    cfg = dict(task="qa", prompt="What is it?")
    first = run(config(manifest, out, tiny_model, **cfg))
    assert (first.ok, first.error_types) == (2, {"not_found": 1})
    again = run(config(manifest, out, tiny_model, **cfg))
    assert again.items == 0 and again.skipped == 2  # same settings: nothing to do
    longer = config(manifest, out, tiny_model, **cfg)
    longer.generation.max_new_tokens = 3  # other settings: other rows, beside the first ones
    assert run(longer).rows == 3

    shutil.copy(samples / "logo.png", tmp_path / "late.png")
    manifest.write_text(manifest.read_text() + json.dumps({"id": "more", "uri": "photo.jpg"}) + "\n")
    lines = manifest.read_text().splitlines()
    lines[0] = json.dumps({"id": "photo", "uri": "photo.jpg", "questions": ["Colors?", "Shapes?", "Size?"]})
    manifest.write_text("\n".join(lines) + "\n")
    no_retry = run(config(manifest, out, tiny_model, **cfg))
    assert no_retry.rows == 2  # the new question and the new item; the error row stays
    retry = run(config(manifest, out, tiny_model, retry_errors=True, **cfg))
    assert (retry.items, retry.rows, retry.ok) == (1, 1, 1)  # only the failed item, now readable

    df = pd.read_parquet(out)
    assert not df.duplicated(["id", "prompt", "config_key"]).any()
    key = config(manifest, out, tiny_model, **cfg).config_key()
    mine = df[df.config_key == key]
    assert sorted(zip(mine.id, mine.prompt)) == [("late", "What is it?"), ("more", "What is it?"), ("photo", "Colors?"),
                                                 ("photo", "Shapes?"), ("photo", "Size?")]
    assert (mine.status == "ok").all()  # the not_found row was replaced by the retry's ok row
    assert len(df) == 5 + 3


def test_nightly_runs_on_a_growing_prefix_do_only_new_rows(ray_local, samples, tiny_model, tmp_path):
    manifests, out = tmp_path / "manifests", tmp_path / "out"
    lines = (samples / "manifest.jsonl").read_text().splitlines(keepends=True)
    write_day(manifests, "2026-11-20", lines[:3])
    first = run(config(manifests, out, tiny_model))
    assert first.items == first.rows == 3
    write_day(manifests, "2026-11-21", lines[3:])  # the next night's partition
    second = run(config(manifests, out, tiny_model))
    again = run(config(manifests, out, tiny_model))
    df = pd.read_parquet(out)
    assert sorted(df.id) == sorted(json.loads(line)["id"] for line in lines)  # each once
    assert second.items + first.items == len(lines) and second.skipped == first.items
    assert again.items == again.rows == 0 and again.skipped == len(lines)  # a completed run adds nothing
    ledgers = sorted((out / "_runs").iterdir())
    assert len(ledgers) == 3
    ledger = json.loads((out / "_runs" / f"{second.run_id}.json").read_text())
    assert ledger["items"] == second.items and ledger["rows"] == second.rows
    assert ledger["by_status"] == {"ok": second.ok, "error": second.errors} or second.errors == 0
    assert {"ray", "torch", "transformers", "av"} <= set(ledger["versions"])
    assert ledger["config"]["model"] == str(tiny_model) and ledger["items_per_s"] > 0


def interrupted_commit(cfg, files_moved: int):
    """Stage a finished run, write its commit point, then stop after copying `files_moved` files
    without deleting them: a crash between the two requests of an S3 move."""
    out = OutputLocation.of(cfg.output, cfg.storage)
    result = commit.staged(out, cfg.run_id)
    real_finish = commit._finish
    commit._finish = lambda *a: None
    try:
        commit.commit(out, cfg, result, {"run_id": cfg.run_id})
    finally:
        commit._finish = real_finish
    staged_dir = out.staging(cfg.run_id)
    complete = json.loads(out.fs.cat(join(staged_dir, commit.COMPLETE)))
    for name, final in list(zip(complete["staged"], complete["ledger"]["files"]))[:files_moved]:
        out.fs.copy(join(staged_dir, name), out.child(final))  # copied, never deleted
    return result


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_crash_inside_the_commit_is_finished_by_the_next_run(ray_local, samples, tiny_model, tmp_path, store,
                                                               s3_endpoint, s3_client):
    from pipeline.batch.run import build_dataset
    from pipeline.planning.manifest import scan_manifest

    if store == "s3":
        s3_client.create_bucket(Bucket="commits")
        out = "s3://commits/out"
    else:
        out = tmp_path / "out"
    cfg = config(samples / "manifest.jsonl", out, tiny_model, batch_size=2, output_file_rows=1)
    cfg.storage.endpoint_url = s3_endpoint
    records = scan_manifest(cfg).records  # nothing is committed yet: every record is to do
    commit.write(build_dataset(cfg, records, records.num_rows, use_gpu=False).repartition(3), OutputLocation.of(cfg.output, cfg.storage), cfg)
    staged = interrupted_commit(cfg, files_moved=2)
    assert len(staged.files) == 3 and staged.rows == 7

    rerun = run(config(samples / "manifest.jsonl", out, tiny_model, storage=cfg.storage))
    assert rerun.items == 0 and rerun.skipped == 7  # the interrupted run's rows were committed, not redone
    if store == "s3":
        s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
        df = pads.dataset("commits/out", format="parquet", filesystem=s3).to_table().to_pandas()
    else:
        df = pd.read_parquet(out)
    assert len(df) == 7 and not df.duplicated(["id", "prompt"]).any() and set(df.run_id) == {cfg.run_id}
    fs, path = filesystem(str(out), cfg.storage)
    fs.invalidate_cache()
    assert fs.exists(join(path, "_runs", f"{cfg.run_id}.json")) and not fs.exists(join(path, "_staging", cfg.run_id))


def copy_output(src: str, dest: str, s3_client) -> None:
    """A fresh copy of an output folder (a staged run in it) on the same store."""
    import shutil

    if "://" not in src:
        shutil.copytree(src, dest)
        return
    bucket, prefix = src.removeprefix("s3://").split("/", 1)
    for obj in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        key = dest.removeprefix(f"s3://{bucket}/") + obj["Key"].removeprefix(prefix)
        s3_client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": obj["Key"]})


def read_output(out: str, cfg) -> pd.DataFrame:
    fs, path = filesystem(out, cfg.storage)
    fs.invalidate_cache()
    if "://" not in out:
        return pd.read_parquet(out)
    s3 = pafs.S3FileSystem(endpoint_override=cfg.storage.endpoint_url, scheme="http")
    return pads.dataset(path, format="parquet", filesystem=s3).to_table().to_pandas()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_kill_at_every_step_of_the_commit_leaves_every_row_once(ray_local, samples, tiny_model, tmp_path, store,
                                                                   s3_endpoint, s3_client):
    """Kill the commit before each of its writes in turn (a local file being written is cut in
    half); after each kill the next run leaves a readable output with every row exactly once."""
    import subprocess
    import sys

    from conftest import REPO

    from pipeline.batch.run import build_dataset
    from pipeline.planning.manifest import scan_manifest

    if store == "s3":
        s3_client.create_bucket(Bucket="kills")
        root = "s3://kills"
    else:
        root = str(tmp_path)
    cfg = config(samples / "manifest.jsonl", f"{root}/staged", tiny_model, batch_size=2, output_file_rows=1)
    cfg.storage.endpoint_url = s3_endpoint
    records = scan_manifest(cfg).records  # nothing is committed yet: every record is to do
    staged = OutputLocation.of(cfg.output, cfg.storage)
    commit.write(build_dataset(cfg, records, records.num_rows, use_gpu=False).repartition(3), staged, cfg)
    assert len(commit.staged(staged, cfg.run_id).files) == 3

    outcomes = []
    for step in range(1, 40):
        out = f"{root}/kill-{step}"
        copy_output(f"{root}/staged", out, s3_client)
        killed = cfg.model_copy(update={"output": out})
        (tmp_path / "cfg.json").write_text(killed.model_dump_json())
        code = subprocess.run([sys.executable, "-m", "tests.helpers.kill_commit", str(tmp_path / "cfg.json"),
                               str(step)], cwd=REPO, capture_output=True, text=True)
        if code.returncode == 0:
            break  # the commit needed fewer writes than `step`: every step has been killed once
        assert code.returncode == 137, code.stderr
        fs, path = filesystem(out, cfg.storage)
        fs.invalidate_cache()
        ledger = join(path, "_runs", f"{cfg.run_id}.json")
        if not commit._is_commit_point(fs, join(path, "_staging", cfg.run_id, commit.COMPLETE)) and not fs.exists(ledger):
            # killed before the commit point: nothing is committed; the next run computes it all
            assert commit.recover(OutputLocation.of(out, cfg.storage)) == 7 and not fs.glob(join(path, "*.parquet")), step
            outcomes.append("redone")
            continue
        rerun = run(config(samples / "manifest.jsonl", out, tiny_model, storage=cfg.storage))
        assert rerun.items == 0 and rerun.skipped == 7, step  # finished, not redone
        df = read_output(out, cfg)
        assert len(df) == 7 and not df.duplicated(["id", "prompt"]).any() and set(df.run_id) == {cfg.run_id}, step
        assert fs.exists(ledger) and not fs.exists(join(path, "_staging", cfg.run_id))
        outcomes.append("finished")
    else:
        pytest.fail("the commit never completed")
    assert "redone" in outcomes and outcomes.count("finished") >= 7, outcomes  # every move and ledger write was hit


def test_no_id_or_prompt_collides_with_an_internal_key(ray_local, samples, tiny_model, tmp_path):
    """Ids and prompts are user data: whatever their spelling (a NUL prefix that once marked rows
    without an id, another row's source text, empty, a NUL inside, a prompt that is one NUL), each
    (id, prompt) is committed exactly once, an id-less row is never taken for done because some id
    looks like its key, and a rerun does nothing."""
    import shutil

    shutil.copy(samples / "photo.jpg", tmp_path / "photo.jpg")
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out"
    source = f"{manifest}:line "  # how a row is named when it has no id (manifest file:line)
    rows = [{"id": "\u0000source:evil", "uri": "photo.jpg"},
            {"id": "", "uri": "photo.jpg"},  # invalid (empty): an error row that keeps its id
            {"id": "a\u0000b", "uri": "photo.jpg"},
            {"id": source + "5", "uri": "photo.jpg"},  # the source text of the id-less row below
            {"uri": "photo.jpg"},  # no id: known by its source
            {"id": "q"},  # invalid (no uri): an error row of id q without a prompt
            {"id": "\u0000source:" + source + "8", "uri": "photo.jpg"}]  # the old key of line 8, added later
    later = [{"uri": "photo.jpg"},  # line 8, without an id
             {"id": "q", "uri": "photo.jpg", "prompt": "\u0000"}]  # a prompt that spells "no prompt" in joins

    def write(lines):
        manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def check(df):
        with_id, without = df[df.id.notna()], df[df.id.isna()]
        assert not with_id.duplicated(["id", "prompt"]).any(), with_id[["id", "prompt", "source"]]
        assert not without.duplicated(["source"]).any(), without[["source"]]

    write(rows)
    first = run(config(manifest, out, tiny_model))
    assert first.items == len(rows)
    check(pd.read_parquet(out))
    write(rows + later)
    second = run(config(manifest, out, tiny_model))
    assert second.items == len(later)  # only the new rows: none taken for done, none done again
    df = pd.read_parquet(out)
    check(df)
    assert sorted(df[df.id.isna()].source) == [source + "5", source + "8"]
    prompt = config(manifest, out, tiny_model).default_prompt("image")
    assert sorted(zip(df.id.fillna("-"), df.prompt.fillna("-"))) == sorted(
        [("\u0000source:evil", prompt), ("", "-"), ("a\u0000b", prompt), (source + "5", prompt), ("-", "-"),
         ("\u0000source:" + source + "8", prompt), ("q", "-"), ("-", "-"), ("q", "\u0000")])
    assert run(config(manifest, out, tiny_model)).items == 0
    run(config(manifest, out, tiny_model, retry_errors=True))  # redoes the invalid rows that have an id, replacing theirs
    check(pd.read_parquet(out))
    assert len(pd.read_parquet(out)) == len(df)
    assert run(config(manifest, out, tiny_model)).items == 0


def test_an_interrupted_retry_flagged_commit_replaces_the_flagged_rows_once(tmp_path, monkeypatch):
    """The commit point carries the replacement rule: the run that finishes a crashed commit drops the
    flagged rows the retry replaced (not the error rows, which --retry-errors alone replaces), once."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schemas import output_arrow_schema

    out = tmp_path / "out"
    out.mkdir()
    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(out), model="m", retry_flagged=["repetition"])
    key = cfg.config_key()

    def row(**kw):
        base = {n: None for n in output_arrow_schema().names}
        base.update(task="caption", model="m", config_key=key, run_id="old", created_at=datetime.now(timezone.utc),
                    status="ok", prompt="P", text="t", attempt=1, quality_flags=[])
        base.update(kw)
        return base

    old = [row(id="a", quality_flags=["repetition"]), row(id="a", prompt="Q", status="error", quality_flags=None, attempt=None),
           row(id="b", quality_flags=["truncated"]), row(id="c", quality_flags=["repetition"], attempt=2)]
    pq.write_table(pa.Table.from_pylist(old, schema=output_arrow_schema()), out / "part-old-0.parquet")
    staged = tmp_path / "out" / "_staging" / cfg.run_id
    staged.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row(id="a", attempt=2, run_id=cfg.run_id)], schema=output_arrow_schema()),
                   staged / "0.parquet")

    def crash(*args):
        raise KeyboardInterrupt("killed after the commit point")

    location = OutputLocation.of(cfg.output, cfg.storage)
    monkeypatch.setattr(commit, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        commit.commit(location, cfg, commit.staged(location, cfg.run_id), {"run_id": cfg.run_id},
                      {location.child("part-old-0.parquet"): ["a", "c"]})
    monkeypatch.undo()
    for _ in range(2):  # finished by the next run; again: nothing changes
        commit.recover(location)
        rows = sorted((r["id"], r["prompt"], r["status"], r["attempt"])
                      for r in pads.dataset(str(out), format="parquet").to_table().to_pylist())
        assert rows == [("a", "P", "ok", 2), ("a", "Q", "error", None), ("b", "P", "ok", 1), ("c", "P", "ok", 2)]
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == cfg.run_id


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_file_is_written_in_one_step_or_not_at_all(tmp_path, store, s3_endpoint, s3_client):
    """storage.write_whole, the one atomic write (ledgers, commit points, leases, placed and
    rewritten Parquet): bytes or a writer; a failed check places nothing and leaves no temporary;
    an exclusive create of an existing name refuses."""
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import StorageConfig
    from pipeline.io.storage import write_whole

    if store == "s3":
        s3_client.create_bucket(Bucket="whole")
        out = OutputLocation.of("s3://whole/out", StorageConfig(endpoint_url=s3_endpoint))
    else:
        out = OutputLocation.of(str(tmp_path / "out"), StorageConfig())
        out.fs.makedirs(out.path, exist_ok=True)
    path = out.child("f.parquet")
    write_whole(out.fs, path, b"old")
    table = pa.table({"a": list(range(1000))})
    with pytest.raises(ValueError, match="not this"):
        write_whole(out.fs, path, lambda f: pq.write_table(table, f), check=lambda tmp: (_ for _ in ()).throw(ValueError("not this")))
    assert out.fs.cat_file(path) == b"old"
    seen = []
    write_whole(out.fs, path, lambda f: pq.write_table(table, f), check=lambda tmp: seen.append(pq.read_table(tmp).num_rows))
    out.fs.invalidate_cache()
    assert seen == [1000] and pq.read_table(path, filesystem=out.arrow).num_rows == 1000
    with pytest.raises(FileExistsError):
        write_whole(out.fs, path, b"second", exclusive=True)
    write_whole(out.fs, out.child("new.json"), b"{}", exclusive=True)
    out.fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in out.fs.ls(out.path, detail=False)) == ["f.parquet", "new.json"]  # no temporaries
    again = pickle.loads(pickle.dumps(out))  # as Ray tasks get it: resolved again there
    assert (again.uri, again.path, again.fs.cat_file(path)[:4]) == (out.uri, out.path, b"PAR1")


@pytest.mark.parametrize("stall_at", ["placing", "ledger"])
def test_a_commit_another_run_finished_while_this_driver_stalled_ends_quietly(tmp_path, monkeypatch, stall_at):
    """A driver stalled mid-commit (SIGSTOP, a starved node) past its lease; the next run finished the
    commit and committed its own run. The stalled one used to end with an uncaught FileNotFoundError,
    and could write its _SUCCESS over the newer run's."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schemas import output_arrow_schema

    out = tmp_path / "out"
    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(out), model="m", run_id="stalled")
    location = OutputLocation.of(cfg.output, cfg.storage)
    staged = out / "_staging" / cfg.run_id
    staged.mkdir(parents=True)
    for i in range(2):
        row = {n: None for n in output_arrow_schema().names}
        row.update(id=f"r{i}", task="caption", model="m", config_key=cfg.config_key(), run_id=cfg.run_id, status="ok",
                   prompt="P", text="t", created_at=datetime.now(timezone.utc))
        pq.write_table(pa.Table.from_pylist([row], schema=output_arrow_schema()), staged / f"{i}.parquet")

    def the_next_run_finishes_it():
        monkeypatch.undo()  # the next run's own commit code is the real one
        commit.recover(location)  # finishes the stalled run's commit, then commits a run of its own:
        (out / "_SUCCESS").write_text(json.dumps({"run_id": "next"}))

    if stall_at == "placing":  # stalled before its first copy
        real_place = commit._place
        monkeypatch.setattr(commit, "_place", lambda *a: (the_next_run_finishes_it(), real_place(*a)))
    else:  # stalled after its copies, before its ledger
        real_exists = location.fs.exists

        def exists(path, **kw):
            if path.endswith("_COMPLETE.json") and not getattr(exists, "done", False) and not (out / "_runs").exists():
                exists.done = True
                the_next_run_finishes_it()
            return real_exists(path, **kw)

        # (the check before the ledger is the second look at the commit point)
        monkeypatch.setattr(location.fs, "exists", exists)
    commit.commit(location, cfg, commit.staged(location, cfg.run_id), {"run_id": cfg.run_id})  # no error
    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in rows) == ["r0", "r1"]  # each row once
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == "next"  # the newer run's, not overwritten
    assert json.loads((out / "_runs" / "stalled.json").read_text())["run_id"] == "stalled"
    assert not (out / "_staging" / "stalled").exists()


def test_a_kill_at_every_step_of_a_retry_flagged_commit_leaves_every_row_once(tmp_path):
    """--retry-flagged's commit (new attempt-2 rows in, the flagged rows they replace dropped from a
    committed file) killed before each of its writes in turn: after the next run's recovery each
    (id, prompt) is there exactly once, the old row or its retry, never both, never neither."""
    import shutil
    import subprocess
    import sys
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import REPO

    from pipeline.schemas import output_arrow_schema

    base = tmp_path / "base"
    base.mkdir()
    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(base), model="m", retry_flagged=["repetition"],
                    run_id="retry")
    schema = output_arrow_schema()

    def row(rid, **kw):
        r = {n: None for n in schema.names}
        r.update(id=rid, task="caption", model="m", config_key=cfg.config_key(), run_id="old", status="ok",
                 prompt="P", text="t", attempt=1, quality_flags=[], created_at=datetime.now(timezone.utc))
        r.update(kw)
        return r

    committed = [row("a", quality_flags=["repetition"]), row("b"), row("c", status="error", quality_flags=None, attempt=None),
                 row("d", quality_flags=["repetition"])]
    pq.write_table(pa.Table.from_pylist(committed, schema=schema), base / "part-old-0.parquet")
    staged = base / "_staging" / cfg.run_id
    staged.mkdir(parents=True)
    retried = [row(r, attempt=2, run_id=cfg.run_id) for r in ("a", "d")]
    for i, r in enumerate(retried):
        pq.write_table(pa.Table.from_pylist([r], schema=schema), staged / f"{i}.parquet")
    outcomes = []
    for step in range(1, 60):
        out = tmp_path / f"kill-{step}"
        shutil.copytree(base, out)
        killed = cfg.model_copy(update={"output": str(out)})
        (tmp_path / "cfg.json").write_text(killed.model_dump_json())
        (tmp_path / "supersedes.json").write_text(json.dumps({str(out / "part-old-0.parquet"): ["a", "d"]}))
        code = subprocess.run([sys.executable, "-m", "tests.helpers.kill_commit", str(tmp_path / "cfg.json"), str(step),
                               str(tmp_path / "supersedes.json")], cwd=REPO, capture_output=True, text=True)
        if code.returncode == 0:
            break
        assert code.returncode == 137, code.stderr
        commit.recover(OutputLocation.of(str(out), killed.storage))  # what the next run does first
        rows = sorted((r["id"], r["prompt"], r["attempt"] or 0)
                      for r in pads.dataset(str(out), format="parquet", ignore_prefixes=["_", "."]).to_table().to_pylist())
        assert len({(i, p) for i, p, _ in rows}) == len(rows) == 4, (step, rows)  # each (id, prompt) once
        attempts = {i: a for i, _, a in rows}
        assert attempts in ({"a": 1, "b": 1, "c": 0, "d": 1}, {"a": 2, "b": 1, "c": 0, "d": 2}), (step, rows)
        outcomes.append("finished" if attempts["a"] == 2 else "redone")
    else:
        pytest.fail("the commit never completed")
    assert "redone" in outcomes and outcomes.count("finished") >= 3, outcomes
