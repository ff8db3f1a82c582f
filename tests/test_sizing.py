"""Sizing from the real LLaVA-OneVision shapes (built on the meta device, no weights): tp,
replicas and token budgets; the README's table is this code's output; a tp that cannot split the
model is refused before any cluster time is spent."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.planning.sizing import GB, known_config, plan, readme_table, shape_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes():
    return {size: shape_of(known_config(size), size) for size in ("0.5b", "7b", "72b")}


def test_parameter_counts_match_the_published_checkpoints(shapes):
    # the model cards: 894M, 8.03B, 73.2B parameters
    assert [round(shapes[s].params / 1e9, 2) for s in ("0.5b", "7b", "72b")] == [0.89, 8.03, 73.18]
    assert shapes["7b"].weights_bytes(1, 2) / GB == pytest.approx(16.06, abs=0.01)  # bf16
    assert shapes["72b"].weights_bytes(1, 2) / GB == pytest.approx(146.4, abs=0.1)
    # whole on every rank: the vision tower (SigLIP-SO400M, 0.40 B), the projector (0.08 B at 72B), norms
    assert 0.47e9 < shapes["72b"].replicated_params < 0.48e9


def test_kv_cache_and_tokens_per_frame(shapes):
    # 2 (K, V) x layers x kv heads x head dim x 2 bytes
    assert shapes["7b"].kv_bytes_per_token(1, 2) == 2 * 28 * 4 * 128 * 2
    assert shapes["72b"].kv_bytes_per_token(4, 2) == 2 * 80 * 2 * 128 * 2
    assert shapes["0.5b"].kv_bytes_per_token(1, 2) == 2 * 24 * 2 * 64 * 2
    assert shapes["7b"].tokens_per_frame == 196 and 7300 < shapes["7b"].tokens_per_image_max < 7400
    assert [shapes[s].tp_options() for s in ("0.5b", "7b", "72b")] == [[1, 2], [1, 2, 4], [1, 2, 4, 8]]


@pytest.mark.parametrize("size, gpu_gb, tp, replicas", [
    ("72b", 80, 4, 2), ("72b", 141, 2, 4), ("72b", 40, 8, 1), ("72b", 24, 8, 1),
    ("7b", 24, 1, 8), ("7b", 80, 1, 8), ("0.5b", 24, 1, 8),
])
def test_plan_picks_the_smallest_tp_that_fits(shapes, size, gpu_gb, tp, replicas):
    p = plan(shapes[size], gpu_gb, gpus=8)
    assert (p.tp, p.replicas, p.fits) == (tp, replicas, True)
    # weights + the budget's KV cache and activations fill the usable 90%
    per_token = shapes[size].kv_bytes_per_token(tp, 2) + shapes[size].activation_bytes_per_token(tp, 2)
    assert p.weights_gb * GB + p.token_budget * per_token == pytest.approx(0.9 * gpu_gb * GB, rel=1e-4)


def test_what_does_not_fit_is_said(shapes):
    assert not plan(shapes["72b"], 80, gpus=2).fits  # tp 2 is the most two GPUs allow: 73 GB each
    assert not plan(shapes["72b"], 80, gpus=8, tp=2).fits
    assert "does NOT fit" in plan(shapes["72b"], 16, gpus=8).line()


def test_readme_table_is_this_codes_output():
    assert readme_table() in (REPO / "README.md").read_text()


def test_a_tp_that_does_not_split_the_model_is_refused(samples, tiny_model, tmp_path):
    """The tiny checkpoint has 4 attention heads and 2 KV heads: --tp 4 cannot split them. The dry
    run says so, and the 72B on 80 GB GPUs at --tp 2 is told to use --tp 4."""
    job = [sys.executable, str(REPO / "jobs" / "caption_videos.py"), "--manifest", str(samples / "manifest.jsonl"),
           "--output", str(tmp_path / "out"), "--dry-run"]
    p = subprocess.run([*job, "--model", str(tiny_model), "--tp", "4"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--tp 4 does not split" in p.stderr and "use one of [1, 2]" in p.stderr
    p = subprocess.run([*job, "--model", "llava-hf/llava-onevision-qwen2-72b-ov-hf", "--tp", "2", "--gpu-memory-gb", "80"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.search(r"tp 2 -> 73\.\d GB weights per device", p.stdout) and "use --tp 4" in p.stdout
