"""Figure 4, memory and scale: peak RSS of the driver and of the workers for a small and a 10x
larger manifest of tiny items (a streaming pipeline keeps the ratio near 1), and steady items per
second with 1 vs 2 CPUs (the job pinned to them, Ray and its workers included), taken from the
difference between the two manifests' wall times, so that start-up cancels out."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.e2e import run_job
from benchmarks.inputs import encode_video, write_image


def tiny_manifest(directory: Path, n: int) -> Path:
    """n tiny items: small clips and images, alternating (the files repeat; the ids do not)."""
    directory.mkdir(parents=True, exist_ok=True)
    clips = [encode_video(directory / f"clip-{i}.mp4", 320, 180, 2.0, gop_s=1.0, seed=300 + i) for i in range(4)]
    images = [write_image(directory / f"image-{i}.jpg", 160 + 40 * i, 120, seed=400 + i) for i in range(4)]
    path = directory / f"tiny-{n}.jsonl"
    path.write_text("".join(json.dumps({"id": f"item-{i}", "uri": str((clips if i % 2 else images)[i // 2 % 4])}) + "\n"
                            for i in range(n)))
    return path


def measure(model_dir: str, work: Path, small: int, large: int, log=print) -> dict:
    settings = dict(model=model_dir, num_frames=4, batch_size=8, generation={"max_new_tokens": 8})
    runs = {}
    for cpus in (2, 1):
        for name, n in (("small", small), ("large", large)):
            manifest = tiny_manifest(work / "tiny", n)
            job = run_job(work, f"scale-{name}-{cpus}cpu", dict(settings, manifest=str(manifest)), cpus=cpus)
            runs[f"{name}-{cpus}cpu"] = {k: job.get(k) for k in (
                "items", "ok", "cpus", "wall_s", "overall_items_per_s", "peak_rss_driver_mb", "peak_rss_workers_mb",
                "peak_rss_largest_worker_mb")}
            log(f"scale {n} items on {job['cpus']} CPU(s): {job['wall_s']:.1f} s, driver "
                f"{job['peak_rss_driver_mb']:.0f} MB, workers {job['peak_rss_workers_mb']:.0f} MB")
    # Steady state from the difference of the two sizes: start-up (Ray, actors, model load) cancels out.
    steady = {}
    for cpus in (2, 1):
        extra_s = runs[f"large-{cpus}cpu"]["wall_s"] - runs[f"small-{cpus}cpu"]["wall_s"]
        # (a run too small to rise above the noise falls back to the larger run's overall rate)
        steady[cpus] = (large - small) / extra_s if extra_s > 0 else runs[f"large-{cpus}cpu"]["overall_items_per_s"]
    s, big = runs["small-2cpu"], runs["large-2cpu"]
    ratio = lambda k: round(big[k] / s[k], 3)  # noqa: E731
    return {"runs": runs, "items": [small, large],
            "steady_items_per_s": {f"{c}cpu": round(v, 2) for c, v in steady.items()},
            "rss_ratio_driver": ratio("peak_rss_driver_mb"), "rss_ratio_workers": ratio("peak_rss_workers_mb"),
            "rss_ratio_1000_vs_100": round((big["peak_rss_driver_mb"] + big["peak_rss_workers_mb"])
                                           / (s["peak_rss_driver_mb"] + s["peak_rss_workers_mb"]), 3),
            "cpu_scaling_2_vs_1": round(steady[2] / steady[1], 2)}
