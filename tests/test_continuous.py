"""Continuous batching (pipeline/model/continuous.py): rows join and leave the running batch between
decode steps, and every row's tokens are those of transformers' generate on that row alone (the rule
of tests/helpers/textmatch.py), for every family, images, image sets and video mixed, rows
joining at different steps and leaving at their own ends (max_new_tokens, EOS, a stop string, their
caller), greedy and seeded sampling, under a token budget, and at --tp 2."""

import json
import tempfile

import pytest

from pipeline.batch.stages import Preprocess, decode_media, unpack
from pipeline.config import GenerationConfig, RunConfig
from pipeline.model.continuous import Row
from pipeline.model.engine import Engine
from pipeline.planning.manifest import scan_manifest
from tests.helpers.textmatch import Reference, difference, reference_generation

FAMILIES = ["llava_onevision", "llava_interleave", "llava"]
LENGTHS = [3, 11, 6, 9, 4, 12]  # each row's own max_new_tokens: rows leave at different steps


@pytest.fixture(scope="module")
def manifest(samples, tmp_path_factory):
    rows = [
        {"id": "photo", "uri": str(samples / "photo.jpg"), "questions": ["What is in it?", "What colors?"]},
        {"id": "pair", "uris": [str(samples / "logo.png"), str(samples / "palette.gif")], "questions": ["How do they differ?"]},
        {"id": "street", "uri": str(samples / "street.mp4"), "questions": ["What moves?", "Where is it?"]},
        {"id": "logo", "uri": str(samples / "logo.png"), "questions": ["Any text?"]},
    ]
    path = tmp_path_factory.mktemp("continuous") / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_setups = {}


def setup(family, tiny_checkpoint, manifest):
    """(engine, the rows' model inputs, each row's greedy reference of max(LENGTHS) tokens)."""
    if family not in _setups:
        path = tiny_checkpoint(family)
        cfg = RunConfig(manifest=str(manifest), output="/unused", model=str(path), task="qa", num_frames=4,
                        allowed_uri_prefixes=[tempfile.gettempdir()])
        scan = scan_manifest(cfg)
        requests = [r for r in Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes)).to_pylist()
                    if r["status"] == "ok"]
        inputs = [unpack(r["model_inputs"]) for r in requests]
        engine = Engine(str(path), device="cpu")
        assert engine.continuous
        refs = [reference_generation(engine.model, engine.tokenizer, x, max(LENGTHS)) for x in inputs]
        _setups[family] = engine, inputs, refs
    return _setups[family]


def cut(ref: Reference, tokenizer, n: int, eos: set[int] = frozenset()) -> Reference:
    """The reference of a row that ends after n tokens, or at its first token in eos."""
    end = next((k + 1 for k, t in enumerate(ref.token_ids[:n]) if t in eos), min(n, len(ref.token_ids)))
    ids = ref.token_ids[:end]
    return Reference(tokenizer.decode(ids, skip_special_tokens=True), ids, ref.scores[:end])


def gen(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_joining_and_leaving_at_different_steps_match_generate_alone(family, tiny_checkpoint, manifest):
    engine, inputs, refs = setup(family, tiny_checkpoint, manifest)
    assert len(inputs) == (3 if family == "llava" else 6)  # LLaVA-1.5: one image per prompt
    scheduler = engine.scheduler(max_rows=2)
    rows = [Row(x, gen(n)) for x, n in zip(inputs, LENGTHS)]
    scheduler.submit(rows[0])
    scheduler.step()
    scheduler.step()
    for r in rows[1:]:  # the rest arrive while the first runs
        scheduler.submit(r)
    while not all(r.done.is_set() for r in rows):
        scheduler.step()
    results = [r.result for r in rows]
    assert scheduler.idle and scheduler._cache is None  # every row left, every cache row freed
    assert len({r.joined_step for r in rows}) >= (2 if family == "llava" else 4)  # rows joined at different steps
    for ref, n, r in zip(refs, LENGTHS, results):
        expected = cut(ref, engine.tokenizer, n, engine.eos_ids)
        assert difference(expected, engine.tokenizer, r.text) is None
        assert r.finish_reason == ("stop" if expected.token_ids[-1] in engine.eos_ids else "length")
        assert r.output_tokens == len(expected.token_ids)
    assert len({r.text for r in results}) == len(results)  # texts that differ: the comparison has teeth


def test_a_row_leaves_at_its_end_token_and_its_cache_rows_go_at_once(tiny_checkpoint, manifest):
    engine, inputs, refs = setup("llava_onevision", tiny_checkpoint, manifest)
    end_token = refs[1].token_ids[3]  # the 4th token of row 1 counts as an end token here
    batch_rows = []
    scheduler = engine.scheduler()
    rows = [Row(x, gen(10), on_token=lambda step, t: batch_rows.append(scheduler._mask.shape[0])) for x in inputs]
    real_eos = engine.eos_ids
    engine.eos_ids = real_eos | {end_token}
    try:
        results = scheduler.run(rows)
    finally:
        engine.eos_ids = real_eos
    for ref, r in zip(refs, results):
        expected = cut(ref, engine.tokenizer, 10, real_eos | {end_token})
        assert difference(expected, engine.tokenizer, r.text) is None
    assert results[1].finish_reason == "stop" and results[1].output_tokens <= 4
    # after row 1 left, the cache held fewer rows: its slot and cache were freed at once
    assert max(batch_rows) == len(inputs) and min(batch_rows) < len(inputs)


def test_a_stop_string_a_caller_and_a_cancellation_end_their_rows(tiny_checkpoint, manifest):
    engine, inputs, refs = setup("llava_onevision", tiny_checkpoint, manifest)
    stop_text = engine.tokenizer.decode(refs[0].token_ids[4:6], skip_special_tokens=True)
    assert stop_text.strip() and stop_text in refs[0].text
    scheduler = engine.scheduler()
    rows = [Row(inputs[0], gen(12), stop=(stop_text,)),
            Row(inputs[1], gen(12), on_token=lambda step, t: step == 2),  # its caller ends it after 3 tokens
            Row(inputs[2], gen(12)), Row(inputs[3], gen(12))]
    rows[3].on_token = lambda step, t: setattr(rows[2], "cancelled", step == 4 or rows[2].cancelled)
    results = scheduler.run(rows)
    assert results[0].finish_reason == "stop" and results[0].text == refs[0].text[:refs[0].text.find(stop_text)]
    assert (results[1].finish_reason, results[1].output_tokens) == ("stop", 3)
    assert results[2].finish_reason == "cancelled" and results[2].output_tokens <= 6
    assert results[3].finish_reason == "length"
    for ref, r in zip(refs[1:], results[1:]):  # what each row got before it ended is the reference's
        assert difference(cut(ref, engine.tokenizer, r.output_tokens), engine.tokenizer, r.text) is None


def test_the_token_budget_holds_rows_back_until_others_leave(tiny_checkpoint, manifest):
    engine, inputs, refs = setup("llava_onevision", tiny_checkpoint, manifest)
    rows = [Row(x, gen(n)) for x, n in zip(inputs, LENGTHS)]
    budget = 2 * max(r.cost for r in rows)
    scheduler = engine.scheduler()
    scheduler.token_budget = budget
    results = scheduler.run(rows)
    assert scheduler.peak_columns <= budget  # the padded cache never held more than the budget
    assert len({r.joined_step for r in rows}) >= 3  # rows waited for room
    for ref, n, r in zip(refs, LENGTHS, results):
        assert difference(cut(ref, engine.tokenizer, n, engine.eos_ids), engine.tokenizer, r.text) is None


def test_seeded_sampling_gives_each_row_the_tokens_it_gets_alone(tiny_checkpoint, manifest):
    engine, inputs, _ = setup("llava_interleave", tiny_checkpoint, manifest)
    sampling = dict(temperature=1.0, top_p=0.9, top_k=50)
    scheduler = engine.scheduler(max_rows=3)
    rows = [Row(x, gen(n, **sampling), seed=100 + i) for i, (x, n) in enumerate(zip(inputs, LENGTHS))]
    results = scheduler.run(rows)
    engine.continuous = False  # the static path: model.generate with PerRowSampler, one row at a time
    try:
        alone = [engine.generate([x], gen(n, **sampling), [100 + i])[0] for i, (x, n) in enumerate(zip(inputs, LENGTHS))]
        greedy = engine.generate(inputs, gen(12))
    finally:
        engine.continuous = True
    assert [r.text for r in results] == [a.text for a in alone]
    assert [r.text for r in results][-1] != greedy[-1].text  # sampling did sample


def test_positions_that_ignore_the_padding_are_caught(tiny_checkpoint, manifest, monkeypatch):
    """The parity checks catch a real fault: decode positions taken from the padded width, not each row's length."""
    engine, inputs, refs = setup("llava_onevision", tiny_checkpoint, manifest)
    from pipeline.model.continuous import Scheduler

    monkeypatch.setattr(Scheduler, "_positions", lambda self: self._mask.new_full((self._mask.shape[0], 1), self._mask.shape[1] - 1))
    results = engine.scheduler().run([Row(x, gen(12)) for x in inputs])
    found = [difference(cut(ref, engine.tokenizer, 12, engine.eos_ids), engine.tokenizer, r.text) for ref, r in zip(refs, results)]
    assert sum(f is not None for f in found) >= 3, found  # every row shorter than the longest goes astray


def test_engine_generate_is_continuous_and_keeps_the_static_answers(tiny_checkpoint, manifest):
    engine, inputs, refs = setup("llava_onevision", tiny_checkpoint, manifest)
    continuous = engine.generate(inputs, gen(8))
    engine.continuous = False
    try:
        static = engine.generate(inputs, gen(8))
    finally:
        engine.continuous = True
    for ref, c, s in zip(refs, continuous, static):
        expected = cut(ref, engine.tokenizer, 8, engine.eos_ids)
        assert difference(expected, engine.tokenizer, c.text) is None
        assert difference(expected, engine.tokenizer, s.text) is None
        assert (c.output_tokens, c.finish_reason) == (s.output_tokens, s.finish_reason)


def test_tp2_ranks_run_the_same_steps(tiny_checkpoint, manifest):
    """--tp 2: rank 0's tokens drive both ranks' schedules; rows join two at a time and match tp 1."""
    from pipeline.model.tensor_parallel import TensorParallelEngine

    engine, inputs, refs = setup("llava_onevision", tiny_checkpoint, manifest)
    tp = TensorParallelEngine(str(tiny_checkpoint("llava_onevision")), device="cpu", tp=2, timeout_s=300,
                              load_options={"max_rows": 2})
    try:
        greedy = tp.generate(inputs, gen(7))
        sampled = tp.generate(inputs, gen(7, temperature=1.0, top_p=0.9), list(range(len(inputs))))
    finally:
        tp.close()
    for ref, r in zip(refs, greedy):
        assert difference(cut(ref, engine.tokenizer, 7, engine.eos_ids), engine.tokenizer, r.text) is None
    one = engine.generate(inputs, gen(7, temperature=1.0, top_p=0.9), list(range(len(inputs))))
    assert [r.text for r in sampled] == [r.text for r in one]


def test_loop_fighting_settings_apply_per_row_as_generate_applies_them(tiny_checkpoint, manifest):
    """--repetition-penalty and --no-repeat-ngram-size (and --retry-flagged's fallback, which sets
    them) under continuous scheduling: each row's tokens equal generate's with the same settings."""
    engine, inputs, plain = setup("llava_onevision", tiny_checkpoint, manifest)
    settings = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    n = max(LENGTHS)
    refs = [reference_generation(engine.model, engine.tokenizer, x, n, **settings) for x in inputs]
    results = engine.scheduler(max_rows=2).run([Row(x, gen(n, **settings)) for x in inputs])
    for ref, r in zip(refs, results):
        assert difference(ref, engine.tokenizer, r.text) is None
    # the settings changed the answers (the comparison would catch them being ignored)
    assert sum(ref.token_ids != p.token_ids for ref, p in zip(refs, plain)) >= 3
