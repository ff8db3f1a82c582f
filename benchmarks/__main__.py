"""Benchmarks side by side: every figure a ratio against a baseline measured in the same run on
the same generated inputs (PyAV/libx264, Pillow, random-weight checkpoints), so anyone can rerun it.

    python -m benchmarks --out benchmarks/results/quick.json --quick      # a few minutes on 2 cores
    python -m benchmarks --out results.json                                # the full sizes
    python -m benchmarks --out gpu.json --gpu --only gpu                   # on a GPU machine (no Ray/PyAV needed)
    python -m benchmarks --out scale.json --only scale                     # dataset scale: plans of 100 k-10 M rows

Writes FILE.json and a chart FILE.png beside it. Figures (keys): decode (decode_speedup_long,
decode_speedup_short), preprocess (preprocess_speedup), end to end (e2e_speedup_tiny,
e2e_speedup_small, model_busy_fraction_small), memory and scale (rss_ratio_1000_vs_100,
cpu_scaling_2_vs_1), dataset scale (plan_rows_per_s_largest, plan_peak_rss_driver_mb_10m,
plan_rss_ratio_10m_vs_1m, plan_rss_new_vs_old, plan_s_new_vs_old, files_per_1m_rows,
commit_requests), efficiency (model_flops_fraction_small), continuous vs static batching
(continuous_batch_speedup_varied, continuous_batch_speedup_fixed, continuous_abandoned_vs_idle,
static_abandoned_vs_idle; benchmarks/continuous.py) and, with --gpu, videos/s per GPU and MFU of the
0.5B and 7B architectures and continuous vs static on the first (gpu_continuous_speedup_varied). Generated inputs are kept in --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

FIGURES = ("decode", "preprocess", "e2e", "scale", "continuous", "gpu")
# Issue 7's goals: (key, comparison, value).
GOALS = [("decode_speedup_long", ">=", 5.0), ("decode_speedup_short_min", ">=", 1.0),
         ("e2e_speedup_tiny", ">=", 2.0), ("model_busy_fraction_small", ">=", 0.8),
         ("rss_ratio_1000_vs_100", "<=", 1.5),
         # issue 15 (dataset scale): flat driver memory, planning speed, output files of a useful size
         ("plan_peak_rss_driver_mb_10m", "<=", 1500), ("plan_rss_ratio_10m_vs_1m", "<=", 1.3),
         ("plan_rows_per_s_largest", ">=", 100_000), ("files_per_1m_rows", "<=", 20),
         # issue 23 (continuous batching): varied answer lengths, and a short request after abandoned streams
         ("continuous_batch_speedup_varied", ">=", 1.5), ("continuous_batch_speedup_fixed", ">=", 0.9),
         ("continuous_abandoned_vs_idle", "<=", 2.0)]
# Sizes per profile (inputs: benchmarks.inputs.PROFILES). plan: manifest rows planned; commit:
# rows committed on moto, rows per file.
SIZES = {
    "minimal": dict(repeats=1, pre_frames=4, frames=4, tokens_tiny=8, tokens_small=8, scale=(10, 60), plan=[10_000],
                    commit=(10_000, 1_000), continuous_rows=8),
    "quick": dict(repeats=2, pre_frames=16, frames=8, tokens_tiny=32, tokens_small=32, scale=(100, 1000),
                  plan=[100_000, 1_000_000], commit=(1_000_000, 100_000), continuous_rows=24),
    "full": dict(repeats=3, pre_frames=32, frames=8, tokens_tiny=64, tokens_small=64, scale=(100, 1000),
                 plan=[100_000, 1_000_000, 10_000_000], commit=(1_000_000, 100_000), continuous_rows=48),
}


def row_counts(text: str) -> list[int]:
    """'100k,1M,10000' -> [100000, 1000000, 10000]."""
    scale = {"k": 1_000, "m": 1_000_000}
    rows = [int(float(v[:-1]) * scale[v[-1]]) if v[-1:] in scale else int(v) for v in text.lower().replace("_", "").split(",")]
    if min(rows) < 1:
        raise argparse.ArgumentTypeError(f"row counts must be positive: {text}")
    return rows


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "av", "ray", "torchcodec"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "versions": versions}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON file to write (the chart goes beside it, .png)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small inputs: a few minutes on 2 cores")
    size.add_argument("--minimal", action="store_true", help="tiny inputs, for the test suite (figures are noise)")
    p.add_argument("--only", help=f"comma-separated figures to run (default: all but gpu): {','.join(FIGURES)}")
    p.add_argument("--gpu", action="store_true", help="also run the GPU figure (on the CPU when there is no GPU: a check)")
    p.add_argument("--gpu-models", default="0.5b,7b", help="architectures for the GPU figure (0.5b, 7b; tiny-384 to check)")
    p.add_argument("--gpu-videos", type=int, default=16, help="videos per model in the GPU figure")
    p.add_argument("--gpu-frames", type=int, default=32, help="frames per video in the GPU figure")
    p.add_argument("--gpu-tokens", type=int, default=64, help="new tokens per video (fixed) in the GPU figure")
    p.add_argument("--gpu-batch", type=int, default=8, help="videos per generate call in the GPU figure")
    p.add_argument("--scale-sizes", type=row_counts, help="manifest rows planned in the scale figure, comma-separated "
                   "(100k,1M,10M; default by profile: full 100k,1M,10M, quick 100k,1M, minimal 10k)")
    p.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "pipeline-benchmarks"),
                   help="folder for generated inputs (reused), checkpoints and job outputs")
    a = p.parse_args(argv)
    profile = "minimal" if a.minimal else "quick" if a.quick else "full"
    only = set(a.only.split(",")) if a.only else set(FIGURES) - {"gpu"}
    if a.gpu:
        only.add("gpu")
    if unknown := only - set(FIGURES):
        p.error(f"unknown figures: {sorted(unknown)}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) / profile
    work.mkdir(parents=True, exist_ok=True)
    sizes = SIZES[profile]
    started = time.time()
    result = {"command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
              "profile": profile, "machine_before": machine()}
    log = lambda msg: print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)  # noqa: E731

    if only & {"decode", "preprocess", "e2e", "scale", "continuous"}:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from benchmarks.inputs import PROFILES, make_inputs, mixed_manifest
        from benchmarks.models import write_checkpoint
        from pipeline.testing.tiny_model import build as build_tiny

        log(f"inputs ({profile}) in {work}")
        inputs = make_inputs(work / "inputs", profile)
        tiny = work / "tiny-model"
        if not (tiny / "config.json").exists():
            build_tiny(tiny)
        small = write_checkpoint("small", work / "small-model")
    if "decode" in only:
        from benchmarks import decode

        result["decode"] = decode.measure(inputs, repeats=sizes["repeats"], log=log)
    if "preprocess" in only:
        from benchmarks import preprocess

        result["preprocess"] = preprocess.measure(str(small), inputs, n=sizes["pre_frames"], repeats=sizes["repeats"] + 1,
                                                  log=log)
    if "e2e" in only:
        from benchmarks import e2e

        manifest = mixed_manifest(work / "mixed.jsonl", inputs, PROFILES[profile]["mixed"])
        result["e2e"] = {
            "tiny": e2e.measure("tiny", str(tiny), manifest, work, sizes["frames"], sizes["tokens_tiny"], 4, log=log),
            "small": e2e.measure("small", str(small), manifest, work, sizes["frames"], sizes["tokens_small"], 4,
                                 count_flops=True, log=log),
        }
    if "scale" in only:
        from benchmarks import scale

        result["scale"] = scale.measure(str(tiny), work, *sizes["scale"], log=log)
        result["scale"]["output_files"] = scale.files_per_million(str(tiny), work, sizes["scale"][1], log=log)
        result["scale"]["planning"] = scale.measure_planning(work, a.scale_sizes or sizes["plan"], log=log)
        result["scale"]["commit"] = scale.measure_commit(work, *sizes["commit"], log=log)
    if "continuous" in only:
        from benchmarks import continuous

        rows, small = sizes["continuous_rows"], profile == "minimal"
        result["continuous"] = {"batch": continuous.measure_batch(str(tiny), rows=rows, fixed_tokens=8 if small else 32,
                                                                  longest=16 if small else continuous.LENGTH_MAX, log=log),
                                "abandoned": continuous.measure_abandoned(str(tiny), long_tokens=40 if profile == "minimal" else 400,
                                                                          log=log)}
    if "gpu" in only:
        from benchmarks import continuous, gpu
        from benchmarks.models import write_checkpoint

        result["gpu"] = gpu.measure(a.gpu_models.split(","), frames=a.gpu_frames, new_tokens=a.gpu_tokens,
                                    videos=a.gpu_videos, batch_size=a.gpu_batch, log=log)
        # continuous vs static on the first architecture, rows of varied answer lengths (benchmarks.continuous)
        first = a.gpu_models.split(",")[0]
        checkpoint = write_checkpoint(first, Path(a.work) / f"gpu-{first}-model")
        result["gpu"]["continuous"] = continuous.measure_batch(
            str(checkpoint), rows=max(8, a.gpu_videos), batch_size=a.gpu_batch, device=None, fixed_tokens=a.gpu_tokens,
            longest=continuous.LENGTH_MAX if profile != "minimal" else 16, log=log)

    result.update(headline(result))
    result["goals"] = {key: {"goal": f"{op} {value}", "value": result[key],
                             "met": result[key] >= value if op == ">=" else result[key] <= value}
                       for key, op, value in GOALS if key in result}
    result["machine_after"] = machine()
    result["elapsed_s"] = round(time.time() - started, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        from benchmarks.chart import chart

        chart(result, out.with_suffix(".png"))
        log(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError as e:  # a bare GPU machine may lack matplotlib: the JSON is what counts
        log(f"wrote {out}; no chart ({e})")
    for key, goal in result["goals"].items():
        log(f"goal {key} {goal['goal']}: {goal['value']} ({'met' if goal['met'] else 'MISSED'})")
    return 0


def headline(result: dict) -> dict:
    """The issue's keys, lifted to the top level of the JSON."""
    h = {}
    if "decode" in result:
        h.update({k: result["decode"][k] for k in ("decode_speedup_long", "decode_speedup_short",
                                                   "decode_speedup_long_min", "decode_speedup_short_min")})
    if "preprocess" in result:
        h["preprocess_speedup"] = result["preprocess"]["preprocess_speedup"]
    if "e2e" in result:
        e = result["e2e"]
        h.update(e2e_speedup_tiny=e["tiny"]["speedup_steady"], e2e_speedup_tiny_overall=e["tiny"]["speedup_overall"],
                 e2e_speedup_small=e["small"]["speedup_steady"], e2e_speedup_small_overall=e["small"]["speedup_overall"],
                 model_busy_fraction_small=e["small"]["job"]["model_busy_fraction"],
                 model_flops_fraction_small=e["small"]["flops"]["fraction"])
    if "scale" in result:
        s = result["scale"]
        h.update({k: s[k] for k in ("rss_ratio_1000_vs_100", "cpu_scaling_2_vs_1")})
        h.update({k: s["planning"][k] for k in ("plan_rows_per_s_largest", "plan_peak_rss_driver_mb_10m",
                                               "plan_rss_ratio_10m_vs_1m", "plan_rss_new_vs_old", "plan_s_new_vs_old")
                  if k in s["planning"]},
                 files_per_1m_rows=s["output_files"]["files_per_1m_rows"], commit_requests=s["commit"]["requests"],
                 commit_wall_s=s["commit"]["wall_s"])
    if "continuous" in result:
        c = result["continuous"]
        h.update(continuous_batch_speedup_varied=c["batch"]["varied"]["speedup"],
                 continuous_batch_speedup_fixed=c["batch"]["fixed"]["speedup"],
                 continuous_abandoned_vs_idle=c["abandoned"]["continuous"]["ratio"],
                 static_abandoned_vs_idle=c["abandoned"]["static"]["ratio"])
    if "gpu" in result:
        if "continuous" in result["gpu"]:
            h["gpu_continuous_speedup_varied"] = result["gpu"]["continuous"]["varied"]["speedup"]
        for name, m in result["gpu"]["models"].items():
            h[f"gpu_{name}_videos_per_s"] = m["batched_videos_per_s"]
            h[f"gpu_{name}_speedup"] = m["speedup"]
            h[f"gpu_{name}_mfu"] = m["mfu_batched"]
    return h


if __name__ == "__main__":
    sys.exit(main())
