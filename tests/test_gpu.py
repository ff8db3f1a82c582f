"""Checks that need an NVIDIA GPU: bf16 and sdpa on CUDA for every family, and the real LLaVA-OneVision
0.5B architecture (random weights) at TP=1.

Deselected by default; run them with `bash tests/run.sh -m gpu`, or without pytest and Ray (plain
Python: decode, preprocess and engine only) with `python tests/test_gpu.py`.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for plain `python tests/test_gpu.py`

from pipeline.config import GenerationConfig, StorageConfig  # noqa: E402

try:
    import pytest
except ImportError:  # plain Python on a GPU machine without the test extras
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.gpu

    @pytest.fixture(scope="module")
    def workdir(tmp_path_factory) -> Path:
        return tmp_path_factory.mktemp("gpu")

FAMILIES = ("llava_onevision", "llava_interleave", "llava")
QUESTIONS = ["Describe it.", "What colors are there?"]


@functools.cache
def checkpoint(workdir: Path, family: str, size: str = "tiny") -> str:
    from pipeline.testing.tiny_model import build

    return str(build(workdir / f"{family}-{size}", family=family, size=size))


@functools.cache
def media(workdir: Path, num_frames: int) -> list[tuple[str, object]]:
    """(media_type, frames) of the sample video and images, decoded as the pipeline does (no Ray)."""
    from pipeline.media.fetch import fetch_and_decode
    from pipeline.testing.samples import write_samples

    samples = workdir / "samples"
    if not samples.exists():
        write_samples(samples)
    out = []
    for name in ("street.mp4", "beach.webm", "photo.jpg", "logo.png"):
        d = fetch_and_decode(str(samples / name), StorageConfig(), None, num_frames)
        out.append((d.media_type, d.frames))
    images = [frames[0] for kind, frames in out if kind == "image"]
    out.append(("image", images))  # several images in one prompt
    return out


def requests(pre, items) -> list[dict]:
    """K questions for each item the family takes."""
    from pipeline.model.families import UnsupportedMedia

    built = []
    for kind, frames in items:
        for q in QUESTIONS:
            try:
                built.append(pre.build(kind, frames, q))
            except UnsupportedMedia:
                pass
    return built


def vision_rows(engine) -> list[int]:
    """A running count of the images/frames/patches the vision tower takes."""
    seen = [0]

    def count(module, args, output):
        seen[0] += args[0].shape[0]

    engine.model.model.vision_tower.register_forward_hook(count)
    return seen


def test_every_family_in_bf16_with_sdpa_on_cuda(workdir: Path):
    import torch

    from pipeline.model.engine import Engine
    from pipeline.model.preprocess import Preprocessor

    gen = GenerationConfig(max_new_tokens=16)
    for family in FAMILIES:
        path = checkpoint(workdir, family)
        inputs = requests(Preprocessor(path), media(workdir, 8))
        engine = Engine(path, device="auto", dtype="auto", attn_implementation="sdpa")
        assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16, family
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        assert engine.model.config._attn_implementation == "sdpa"
        batched = engine.generate(inputs, gen)
        assert all(r.output_tokens >= 1 for r in batched), family
        # float32 on CUDA: the batch gives exactly the one-by-one text (bf16 rounding may differ by batch)
        exact = Engine(path, device="cuda", dtype="float32")
        assert [r.text for r in exact.generate(inputs, gen)] == [exact.generate([x], gen)[0].text for x in inputs], family


def test_real_onevision_05b_architecture_bf16_tp1(workdir: Path):
    import torch

    from pipeline.model.engine import Engine
    from pipeline.model.preprocess import Preprocessor

    path = checkpoint(workdir, "llava_onevision", "0.5b")
    engine = Engine(path, device="cuda", dtype="bfloat16", attn_implementation="sdpa")
    params = sum(p.numel() for p in engine.model.parameters())
    assert 0.85e9 < params < 0.95e9, params  # Qwen2-0.5B + SigLIP-SO400M + projector
    inputs = requests(Preprocessor(path), media(workdir, 8))
    assert max(len(x["input_ids"]) for x in inputs) > 1500  # 8 frames x 196 tokens; anyres images
    seen = vision_rows(engine)
    for x in inputs[::len(QUESTIONS)]:  # each item encoded alone, once
        engine.vision.recent = {}
        engine.vision.encoder_outputs([x])
    alone, seen[0] = seen[0], 0
    engine.vision.recent = {}
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = engine.generate(inputs, GenerationConfig(max_new_tokens=32))
    seconds = time.perf_counter() - started
    assert all(r.output_tokens >= 1 for r in results)
    assert seen[0] == alone  # K questions per item: the vision tower ran once per item
    print(f"0.5B bf16 sdpa: {len(inputs)} requests, {seconds:.2f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, vision rows {seen[0]}")


def test_tp2_across_two_gpus_gives_the_same_tokens_as_one_gpu(workdir: Path):
    """Tensor parallelism over NCCL (the CPU tests cover gloo): skipped without two GPUs."""
    import torch

    from pipeline.model.engine import Engine
    from pipeline.model.preprocess import Preprocessor
    from pipeline.model.tensor_parallel import TensorParallelEngine

    if torch.cuda.device_count() < 2:
        print("SKIP: tensor parallelism on GPUs needs two of them")
        return
    path = checkpoint(workdir, "llava_onevision")
    inputs = requests(Preprocessor(path), media(workdir, 8))
    gen = GenerationConfig(max_new_tokens=16)
    one = Engine(path, device="cuda", dtype="float32").generate(inputs, gen)
    engine = TensorParallelEngine(path, device="cuda", dtype="float32", tp=2, timeout_s=300)
    try:
        two = engine.generate(inputs, gen)
    finally:
        engine.close()
    assert [r.text for r in two] == [r.text for r in one]


if __name__ == "__main__":
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp:
        for test in (test_every_family_in_bf16_with_sdpa_on_cuda, test_real_onevision_05b_architecture_bf16_tp1,
                     test_tp2_across_two_gpus_gives_the_same_tokens_as_one_gpu):
            try:
                test(Path(tmp))
                print(f"PASS {test.__name__}")
            except Exception as e:  # noqa: BLE001 - report every check, then fail
                failed += 1
                print(f"FAIL {test.__name__}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
