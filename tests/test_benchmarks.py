"""`python -m benchmarks` in its minimal profile: the JSON holds every figure as a number and the
chart is written. (The figures of so small a run are noise; the committed --quick result is
benchmarks/results/quick.json.)"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmarks(tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(out), "--minimal", "--work", str(tmp_path / "work"),
                    *args], check=True, cwd=REPO, timeout=1200)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.read_text())


def assert_ratios(result: dict, keys: list[str]):
    for key in keys:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key


def test_decode_preprocess_and_gpu_path(tmp_path):
    result = run_benchmarks(tmp_path, "--only", "decode,preprocess", "--gpu", "--gpu-models", "tiny-384",
                            "--gpu-videos", "2", "--gpu-frames", "2", "--gpu-tokens", "4", "--gpu-batch", "2")
    assert_ratios(result, ["decode_speedup_long", "decode_speedup_short", "preprocess_speedup",
                           "gpu_tiny-384_videos_per_s", "gpu_tiny-384_speedup", "gpu_tiny-384_mfu"])
    # Seeking decodes fewer frames than the card's decode-up-to-the-last-index on the long videos.
    for name, case in result["decode"]["cases"].items():
        if name.startswith("long") and name.endswith("/8"):
            assert case["ours"]["decoded_per_sampled"] < case["card"]["decoded_per_sampled"], name
    # The decoder-side resize gives the processor's pixels exactly.
    assert all(c["pipeline"]["max_abs_diff"] == 0 for c in result["preprocess"]["cases"].values())
    assert result["gpu"]["models"]["tiny-384"]["new_tokens"] == 4


@pytest.mark.slow
def test_every_figure(tmp_path):
    result = run_benchmarks(tmp_path)
    assert_ratios(result, ["decode_speedup_long", "decode_speedup_short", "preprocess_speedup", "e2e_speedup_tiny",
                           "e2e_speedup_small", "model_busy_fraction_small", "rss_ratio_1000_vs_100",
                           "cpu_scaling_2_vs_1", "model_flops_fraction_small"])
    assert result["e2e"]["tiny"]["items"] == 8 and set(result["goals"]) >= {"e2e_speedup_tiny", "rss_ratio_1000_vs_100"}
