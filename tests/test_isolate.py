"""A batch that runs out of memory is split and retried; only a row that runs out of memory alone
becomes an error row (`out_of_memory`), and any other failure costs only its own row."""

import pyarrow.compute as pc
import pytest

from pipeline.batch.stages import Generate, Preprocess, decode_media, unpack
from pipeline.config import RunConfig
from pipeline.model.batching import length_groups
from pipeline.planning.manifest import scan_manifest


class OutOfMemoryOver:
    """The real engine, except that a batch of more than `limit` prompt tokens raises CUDA's
    OutOfMemoryError: there is no GPU here to run out of memory for real."""

    def __init__(self, engine, limit: int):
        self.engine, self.limit, self.calls = engine, limit, []

    def generate(self, inputs, gen, seeds=None):
        import torch

        self.calls.append(len(inputs))
        if sum(len(x["input_ids"]) for x in inputs) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.engine.generate(inputs, gen, seeds)


@pytest.fixture(scope="module")
def stage(samples, tiny_model):
    cfg = RunConfig(manifest=str(samples / "manifest.jsonl"), output="/unused", model=str(tiny_model), num_frames=2)
    cfg.generation.max_new_tokens = 4
    scan = scan_manifest(cfg)
    requests = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes))
    return Generate(cfg, device="cpu"), requests.filter(pc.equal(requests.column("status"), "ok"))


def test_out_of_memory_splits_the_batch_and_fails_only_the_row_too_big_alone(stage, monkeypatch):
    monkeypatch.setattr("pipeline.model.batching.MIN_BATCH_FILL", 0.0)  # one call for all lengths, then halves
    generate, requests = stage
    expected = [generate(requests.slice(i, 1)).to_pylist()[0]["text"] for i in range(requests.num_rows)]
    tokens = requests.column("prompt_tokens").to_pylist()
    biggest = tokens.index(max(tokens))
    assert tokens.count(max(tokens)) == 1
    real = generate.engine
    generate.engine = oom = OutOfMemoryOver(real, limit=max(tokens) - 1)  # every row fits alone but the biggest
    try:
        rows = generate(requests).to_pylist()
    finally:
        generate.engine = real
    assert oom.calls[:3] == [6, 3, 3] and len(rows) == len(expected) == 6
    for i, row in enumerate(rows):
        if i == biggest:
            assert (row["status"], row["error_type"], row["text"]) == ("error", "out_of_memory", None)
            assert "out of memory on this row alone" in row["error"]
        else:
            assert (row["status"], row["text"]) == ("ok", expected[i])


def test_a_row_the_model_rejects_fails_alone(stage):
    from pipeline.batch.stages import pack

    generate, requests = stage
    rows = requests.slice(0, 3).to_pylist()
    broken = unpack(rows[1]["model_inputs"])
    key = "pixel_values_videos" if "pixel_values_videos" in broken else "pixel_values"
    broken[key] = broken[key][..., :5]  # a wrong pixel shape: the vision tower raises
    rows[1]["model_inputs"] = pack(broken)
    out = generate(type(requests).from_pylist(rows, schema=requests.schema)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "ok"]
    assert out[1]["error_type"] == "model_error" and out[1]["error"].startswith("generation failed:")


def test_rows_are_grouped_by_length_so_padding_stays_under_half():
    # three videos (~1,600 tokens) and an anyres image (~7,300): two calls, not one padded to 4 x 7,300
    assert length_groups([1590, 7330, 1590, 1600], 0.5) == [[0, 2, 3], [1]]
    assert length_groups([100, 120, 150, 190], 0.5) == [[0, 1, 2, 3]]  # 560 of 760 padded tokens real
    assert length_groups([50, 1000, 60, 980, 5000], 0.5) == [[0, 2], [3, 1], [4]]
    assert length_groups([1590, 7330], 0.0) == [[0, 1]]
    assert length_groups([], 0.5) == []


def test_grouped_calls_give_the_texts_of_one_call(stage, monkeypatch):
    generate, requests = stage
    monkeypatch.setattr(generate.engine, "continuous", False)  # static scheduling: one generate call per length group
    calls = []
    real = generate.engine.generate
    monkeypatch.setattr(generate.engine, "generate", lambda inputs, *a: calls.append(len(inputs)) or real(inputs, *a))
    grouped = generate(requests).column("text").to_pylist()
    assert len(calls) >= 2 and sum(calls) == requests.num_rows  # the samples mix images and videos
    monkeypatch.setattr("pipeline.model.batching.MIN_BATCH_FILL", 0.0)
    calls.clear()
    assert generate(requests).column("text").to_pylist() == grouped and calls == [requests.num_rows]


def test_a_continuous_engine_gets_every_row_in_one_call_with_the_same_texts(stage, monkeypatch):
    generate, requests = stage
    calls = []
    real = generate.engine.generate
    monkeypatch.setattr(generate.engine, "generate", lambda inputs, *a: calls.append(len(inputs)) or real(inputs, *a))
    continuous = generate(requests).column("text").to_pylist()
    assert generate.engine.continuous and calls == [requests.num_rows]  # its scheduler groups each step's prefill
    monkeypatch.setattr(generate.engine, "continuous", False)
    assert generate(requests).column("text").to_pylist() == continuous
