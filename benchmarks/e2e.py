"""Figures 3 and 5, end to end: items per second of the batch job vs the model card's sequential
loop on the same mixed items, start-up apart from steady state; the model stage's busy fraction
and its achieved FLOP/s against this machine's matmul FLOP/s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.baseline import sequential_loop

REPO = Path(__file__).resolve().parents[1]


def run_job(work: Path, name: str, fields: dict, cpus: int | None = None) -> dict:
    """The job in its own process (benchmarks.jobrun), with its measurements and steady-state figures."""
    from pipeline.config import RunConfig

    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    (d / "trace").mkdir(parents=True)
    cfg = RunConfig(output=str(d / "out"), trace_dir=str(d / "trace"), device="cpu", **fields)
    (d / "config.json").write_text(cfg.model_dump_json())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(d / "job.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.jobrun", str(d / "config.json"), str(d / "result.json")]
                              + (["--cpus", str(cpus)] if cpus else []), cwd=REPO, env=env, stdout=log, stderr=log)
    if proc.returncode:
        raise RuntimeError(f"the job {name} failed (exit {proc.returncode}); see {d / 'job.log'}")
    job = json.loads((d / "result.json").read_text())
    job.update(steady_state(job), output=str(d / "out"))
    return job


def steady_state(job: dict) -> dict:
    """Throughput over the second half of the model calls, when what queued up while the model
    loaded has been worked off; start-up = the wall time that this steady rate does not explain."""
    calls = job["generate_calls"]
    busy = sum(c["end"] - c["start"] for c in calls)
    out = {"model_calls": len(calls), "model_busy_s": round(busy, 3),
           "model_busy_fraction_of_wall": round(busy / job["wall_s"], 3),
           "first_output_s": round(calls[0]["end"] - job["start"], 2) if calls else None}
    if len(calls) >= 2:
        half = calls[(len(calls) - 1) // 2:]  # the window starts at the end of this half's first call
        window = half[-1]["end"] - half[0]["end"]
        rate = sum(c["rows"] for c in half[1:]) / window
        out.update(steady_items_per_s=round(rate, 3),
                   model_busy_fraction=round(sum(c["end"] - c["start"] for c in half[1:]) / window, 3),
                   startup_s=round(max(0.0, job["wall_s"] - job["rows"] / rate), 2))
    out["overall_items_per_s"] = round(job["items"] / job["wall_s"], 3)
    return out


def measure(label: str, model_dir: str, manifest: Path, work: Path, num_frames: int, max_new_tokens: int,
            batch_size: int, count_flops: bool = False, log=print) -> dict:
    # The card's loop runs on the first half of the items before the job and on the second half
    # after it (the kinds repeat every 4 items, so the halves match): on a machine shared with
    # other work, both ways then see the same spells of load.
    shapes = {} if count_flops else None
    half = sum(1 for line in open(manifest) if line.strip()) // 2
    load = [os.getloadavg()[0]]
    first = sequential_loop(model_dir, str(manifest), num_frames, max_new_tokens, shapes, slice(0, half))
    load.append(os.getloadavg()[0])
    job = run_job(work, f"e2e-{label}", dict(manifest=str(manifest), model=model_dir, num_frames=num_frames,
                                             batch_size=batch_size, generation={"max_new_tokens": max_new_tokens}))
    load.append(os.getloadavg()[0])
    second = sequential_loop(model_dir, str(manifest), num_frames, max_new_tokens, shapes, slice(half, None))
    load.append(os.getloadavg()[0])
    seq = {k: first[k] + second[k] for k in ("items", "loop_s", "model_s")}
    seq["startup_s"] = (first["startup_s"] + second["startup_s"]) / 2
    seq["wall_s"] = seq["startup_s"] + seq["loop_s"]
    seq_steady, seq_overall = seq["items"] / seq["loop_s"], seq["items"] / seq["wall_s"]
    if job["ok"] != job["items"]:
        raise RuntimeError(f"e2e {label}: {job['errors']} error rows ({job['error_types']}); see {work}")
    result = {
        "items": job["items"], "load_avg_1m_before_loop_job_loop_after": [round(x, 1) for x in load],
        "num_frames": num_frames, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "sequential": {"startup_s": round(seq["startup_s"], 2), "loop_s": round(seq["loop_s"], 2),
                       "steady_items_per_s": round(seq_steady, 3), "overall_items_per_s": round(seq_overall, 3),
                       "model_busy_fraction": round(seq["model_s"] / seq["loop_s"], 3)},
        "job": {k: job[k] for k in ("ray_init_s", "run_s", "wall_s", "startup_s", "first_output_s", "steady_items_per_s",
                                    "overall_items_per_s", "model_calls", "model_busy_s", "model_busy_fraction",
                                    "model_busy_fraction_of_wall") if k in job},
    }
    result["speedup_steady"] = round(job["steady_items_per_s"] / seq_steady, 2)
    result["speedup_overall"] = round(job["overall_items_per_s"] / seq_overall, 2)
    log(f"e2e {label}: job {job['steady_items_per_s']} items/s steady ({job['overall_items_per_s']} overall, start-up "
        f"{job.get('startup_s')} s), card loop {seq_steady:.3f} items/s ({seq_overall:.3f} overall, start-up "
        f"{seq['startup_s']:.1f} s): x{result['speedup_steady']} steady, x{result['speedup_overall']} overall; "
        f"model busy {job.get('model_busy_fraction')}")
    if count_flops:
        result["flops"] = model_flops(model_dir, shapes, job, log)
    return result


def model_flops(model_dir: str, shapes: dict, job: dict, log=print) -> dict:
    """The job's model FLOPs (per output row) / the model's busy time, against matmul FLOP/s."""
    import pyarrow.dataset as pads
    import torch
    from transformers import AutoModelForImageTextToText

    from benchmarks.flops import generate_flops, matmul_flops_per_s, prefill_flops

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    prefill = {key: prefill_flops(model, inputs) for key, inputs in shapes.items()}
    rows = pads.dataset(job["output"], format="parquet").to_table(
        columns=["media_type", "prompt_tokens", "output_tokens"]).to_pylist()
    total = sum(generate_flops(prefill[(r["media_type"], r["prompt_tokens"])], model.config.text_config,
                               r["prompt_tokens"], r["output_tokens"]) for r in rows)
    achieved = total / job["model_busy_s"]
    peak = matmul_flops_per_s()
    log(f"flops: model stage {achieved / 1e9:.2f} GFLOP/s, matmul {peak / 1e9:.2f} GFLOP/s "
        f"({torch.get_num_threads()} threads): {achieved / peak:.3f}")
    return {"model_flops": total, "achieved_flops_per_s": achieved, "machine_matmul_flops_per_s": peak,
            "matmul_threads": torch.get_num_threads(), "fraction": round(achieved / peak, 3)}
