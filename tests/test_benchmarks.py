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
    assert_ratios(result, ["gpu_continuous_speedup_varied"])  # continuous vs static on the first architecture


def test_scale_planning(tmp_path):
    """The scale figure's planning at the minimal size: the new and the old planning each plan
    10 k rows with nothing and with everything committed, in processes of their own, and agree."""
    from benchmarks.scale import measure_planning

    n = 10_000
    planning = json.loads(json.dumps(measure_planning(tmp_path, [n], timeout_s=300)))
    assert planning["sizes"] == [n] and not planning["baseline_skipped"]
    for committed in (0, n):
        case = planning["plans"][f"{n}-rows-{committed}-committed"]
        for side in ("new", "old"):
            plan = case[side]
            assert (plan["items"], plan["todo"], plan["committed"], plan["invalid"]) == (n, n - committed, committed, 0)
            assert plan["peak_rss_driver_mb"] > 50 and plan["plan_s"] > 0 and plan["cpu_s"] > 0 and plan["rows_per_s"] > 0
        assert case["new"]["line"] == f"plan: items={n} committed={committed} todo={n - committed} invalid=0 manifest_files=1"
        assert set(case["new_vs_old"]) == {"peak_rss_driver", "plan_s", "cpu_s"}
    assert_ratios(planning, ["plan_rows_per_s_largest", "plan_rss_new_vs_old", "plan_s_new_vs_old"])
    assert "10 M" in planning["not_measured"] and "plan_peak_rss_driver_mb_10m" not in planning


@pytest.mark.slow
def test_every_figure(tmp_path):
    result = run_benchmarks(tmp_path)
    assert_ratios(result, ["decode_speedup_long", "decode_speedup_short", "preprocess_speedup", "e2e_speedup_tiny",
                           "e2e_speedup_small", "model_busy_fraction_small", "rss_ratio_1000_vs_100",
                           "cpu_scaling_2_vs_1", "model_flops_fraction_small", "plan_rows_per_s_largest",
                           "files_per_1m_rows", "commit_requests", "commit_wall_s", "continuous_batch_speedup_varied",
                           "continuous_batch_speedup_fixed", "continuous_abandoned_vs_idle"])
    assert result["e2e"]["tiny"]["items"] == 8 and set(result["goals"]) >= {
        "e2e_speedup_tiny", "rss_ratio_1000_vs_100", "plan_rows_per_s_largest", "files_per_1m_rows"}
    commit = result["scale"]["commit"]
    assert commit["rows"] == 10_000 and commit["files"] == 10 and commit["old_layout_files"] == 157
