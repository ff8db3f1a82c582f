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


def test_tp2_across_two_gpus_gives_the_same_tokens_as_one_gpu(tiny_model, requests):
    """Tensor parallelism over NCCL (the CPU tests cover gloo): skipped without two GPUs."""
    import torch

    from pipeline.engine import Engine
    from pipeline.tensor_parallel import TensorParallelEngine

    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism on GPUs needs two of them")
    gen = GenerationConfig(max_new_tokens=16)
    one = Engine(str(tiny_model), device="cuda", dtype="float32").generate(requests, gen)
    engine = TensorParallelEngine(str(tiny_model), device="cuda", dtype="float32", tp=2, timeout_s=300)
    try:
        two = engine.generate(requests, gen)
    finally:
        engine.close()
    assert [r.text for r in two] == [r.text for r in one]
