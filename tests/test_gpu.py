"""Checks that need an NVIDIA GPU: deselected by default, run with `bash tests/run.sh -m gpu`."""

import pytest

from pipeline.config import GenerationConfig, RunConfig
from pipeline.manifest import scan_manifest
from pipeline.stages import Preprocess, decode_media

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def requests(samples, tiny_model):
    cfg = RunConfig(manifest=str(samples / "manifest.jsonl"), output="/unused", model=str(tiny_model), num_frames=8)
    table = Preprocess(cfg)(decode_media(scan_manifest(cfg).records, cfg))
    from pipeline.stages import unpack

    return [unpack(r["model_inputs"]) for r in table.to_pylist() if r["status"] == "ok"]


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_engine_on_cuda_batched_equals_one_by_one(tiny_model, requests, dtype):
    import torch

    from pipeline.engine import Engine

    engine = Engine(str(tiny_model), device="auto", dtype=dtype)
    assert engine.device.type == "cuda"
    assert engine.dtype == (torch.bfloat16 if dtype == "auto" else torch.float32)
    gen = GenerationConfig(max_new_tokens=16)
    batched = engine.generate(requests, gen)
    single = [engine.generate([x], gen)[0] for x in requests]
    assert all(r.output_tokens >= 1 for r in batched)
    if dtype == "float32":
        assert [r.text for r in batched] == [r.text for r in single]
