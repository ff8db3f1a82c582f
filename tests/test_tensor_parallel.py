"""Tensor parallelism on CPU (gloo): --tp 2 gives the same tokens as --tp 1 (up to ties the
reference itself cannot tell apart, tests/helpers/textmatch.py); a rank that dies or
hangs takes its replica down, the replica is restarted and the run completes; out of memory on
one rank splits the batch."""

import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from jobs import caption_videos
from pipeline.batch.stages import Preprocess, decode_media, unpack
from pipeline.config import GenerationConfig, RunConfig
from pipeline.model.batching import RowError, generate_rows
from pipeline.model.engine import Engine
from pipeline.planning.manifest import scan_manifest
from tests.helpers.job_process import run_job_process
from tests.helpers.textmatch import difference, mismatches, reference_generation, references

ARGS = ["--max-new-tokens", "6", "--num-frames", "4", "--batch-size", "3"]


def answers(out: Path) -> dict:
    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    return {(r["id"], r["prompt"]): (r["status"], r["error_type"], r["text"]) for r in rows}


def assert_same_answers(got: dict, want: dict, refs: dict, tokenizer):
    """Same rows and statuses; each ok row's text matches its reference generation."""
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}
    texts = {k: v[2] for k, v in got.items() if v[0] == "ok"}
    assert mismatches({k: refs[k] for k in texts}, tokenizer, texts) == {}


@pytest.fixture(scope="module")
def tp1_answers(ray_local, samples, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    assert caption_videos.main(["--manifest", str(samples / "manifest.jsonl"), "--output", str(out),
                                "--model", str(tiny_model), *ARGS, "--tp", "1"]) == 0
    return answers(out)


@pytest.fixture(scope="module")
def refs(samples, tiny_model):
    """The reference generation of each ok row of the job's settings (ARGS), and the tokenizer."""
    cfg = caption_videos.parse_args(["--manifest", str(samples / "manifest.jsonl"), "--output", "/unused",
                                     "--model", str(tiny_model), *ARGS])
    scan = scan_manifest(cfg)
    requests = [r for r in Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes)).to_pylist() if r["status"] == "ok"]
    engine = Engine(str(tiny_model), device="cpu")
    return references(engine.model, engine.tokenizer, requests, cfg.generation.max_new_tokens), engine.tokenizer


@pytest.fixture
def fault_model(tiny_model, tmp_path):
    """A copy of the tiny checkpoint whose folder's parent holds tests.helpers.fault_rank's state."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_tp2_job_gives_the_same_tokens_as_tp1(tp1_answers, refs, samples, tiny_model, tmp_path):
    assert caption_videos.main(["--manifest", str(samples / "manifest.jsonl"), "--output", str(tmp_path),
                                "--model", str(tiny_model), *ARGS, "--tp", "2"]) == 0
    tp2 = answers(tmp_path)
    assert_same_answers(tp1_answers, tp1_answers, *refs)
    assert_same_answers(tp2, tp1_answers, *refs)
    assert sum(status == "ok" for status, *_ in tp2.values()) == 6


def test_a_rank_killed_mid_batch_restarts_the_replica_and_the_run_completes(tp1_answers, refs, samples, fault_model):
    # the job in its own process and cluster, whose ranks run tests.helpers.fault_rank
    (fault_model.parent / "fault-mode").write_text("kill-once")
    done = run_job_process(["--manifest", samples / "manifest.jsonl", "--output", fault_model.parent / "out",
                            "--model", fault_model, *ARGS, "--tp", "2"],
                           env={"PIPELINE_TEST_RANK_MODULE": "tests.helpers.fault_rank"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((fault_model.parent / "fault-log").read_text().splitlines()) == 1  # rank 1 did die
    assert len(answers(fault_model.parent / "out")) == 7
    assert_same_answers(answers(fault_model.parent / "out"), tp1_answers, *refs)


@pytest.mark.slow  # three replica starts and a 20 s hang: about a minute, several under load
def test_hang_oom_and_a_replica_that_keeps_dying(samples, fault_model, monkeypatch):
    """Without Ray: the engine of one Generate actor, through each fault in turn."""
    from pipeline.model import tensor_parallel
    from pipeline.model.tensor_parallel import TensorParallelEngine

    cfg = RunConfig(manifest=str(samples / "manifest.jsonl"), output="/unused", model=str(fault_model), num_frames=2)
    scan = scan_manifest(cfg)
    table = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes))
    inputs = [unpack(r["model_inputs"]) for r in table.to_pylist() if r["status"] == "ok"][:3]
    gen, seeds = GenerationConfig(max_new_tokens=4), [0, 1, 2]
    reference = Engine(str(fault_model), device="cpu")
    expected = [reference_generation(reference.model, reference.tokenizer, x, gen.max_new_tokens) for x in inputs]

    def matches(results) -> bool:
        return all(difference(ref, reference.tokenizer, r.text) is None for ref, r in zip(expected, results))
    mode = fault_model.parent / "fault-mode"

    mode.write_text("hang-once")
    engine = TensorParallelEngine(str(fault_model), device="cpu", tp=2, timeout_s=20, restarts=1,
                                  rank_module="tests.helpers.fault_rank")
    try:
        assert matches(engine.generate(inputs, gen, seeds))  # after the timeout
        assert engine.starts == 2

        # rank 1 alone runs out of memory on 3 rows: rank 0 is stuck in a collective, so the
        # replica is restarted; the batch is split into 1 + 2 rows, which fit
        mode.write_text("oom-over-2")
        monkeypatch.setattr(tensor_parallel, "DESYNC_GRACE_S", 1.0)
        assert matches(generate_rows(engine, inputs, gen, seeds))
        assert engine.starts == 3

        mode.write_text("kill-always")
        engine.restarts = 0
        results = generate_rows(engine, inputs, gen, seeds)
        assert all(isinstance(r, RowError) and r.error_type == "model_error" for r in results)
        assert "rank 1 died (signal SIGKILL)" in results[0].message
        assert engine.starts == 3 and engine.ranks is None  # down; the next batch starts it again
    finally:
        engine.close()
    log = (fault_model.parent / "fault-log").read_text().splitlines()
    assert [line.split()[0] for line in log] == ["hang-once", "oom-over-2", "kill-always"]
