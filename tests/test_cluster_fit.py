"""The job against the cluster it finds (pipeline/batch/fit.py): a slow model load (or a cold
autoscaler) does not trip Ray Data's no-progress guard, and a Ray cluster too small for the actor
pools stops the job at once with the reason instead of hanging. Each Ray test runs its own local
cluster in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.batch.fit import Fit, fit_to_cluster
from pipeline.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'jobs'}", RAY_ADDRESS="", HF_HUB_OFFLINE="1",
               RAY_DATA_DISABLE_PROGRESS_BARS="1")
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def cfg(**kw) -> RunConfig:
    return RunConfig(manifest="/m.jsonl", output="/out", model="/model", **kw)


def test_fixed_cluster_too_small_is_a_problem_naming_what_it_needs():
    fit = fit_to_cluster(cfg(device="cpu"), use_gpu=False, cpus=2, autoscaling=False)
    problem = fit.problem(cfg(device="cpu"), use_gpu=False)
    assert fit.needed == 3 and "has 2 CPUs" in problem and "at least 3" in problem and "--num-cpus 3" in problem
    big = cfg(device="cpu", replicas=2, tp=2)
    assert fit_to_cluster(big, use_gpu=False, cpus=5, autoscaling=False).needed == 6  # 4 model + 1 preprocess + 1 task
    assert fit_to_cluster(big, use_gpu=True, cpus=4, autoscaling=False).problem(big, use_gpu=True) is None  # 1 CPU/replica
    # an autoscaling cluster may grow into the need: no problem, pools as asked
    grows = fit_to_cluster(cfg(device="cpu", preprocess_workers=32), use_gpu=False, cpus=0, autoscaling=True)
    assert grows.problem(cfg(device="cpu"), use_gpu=False) is None and grows.preprocess_workers == 32


def test_fixed_cluster_preprocess_pool_leaves_a_cpu_for_the_task_stages():
    """The decode + preprocess pool grows at most into the CPUs the model replicas and one task stage leave."""
    assert fit_to_cluster(cfg(device="cpu", preprocess_workers=32), use_gpu=False, cpus=8, autoscaling=False) \
        == Fit(cpus=8, needed=3, autoscaling=False, preprocess_workers=6)
    assert fit_to_cluster(cfg(device="cpu", preprocess_workers=2), use_gpu=False, cpus=64, autoscaling=False).preprocess_workers == 2


def test_kuberay_pods_and_launcher_heads_count_as_autoscaling(monkeypatch, tmp_path):
    """The autoscaler of KubeRay and of the launcher does not always report its node groups to the GCS
    (Ray Data's own check): their pods' env and the launcher head's config say the cluster may grow."""
    import pipeline.batch.fit as fit

    monkeypatch.setattr(fit, "LAUNCHER_CONFIG", str(tmp_path / "ray_bootstrap_config.yaml"))
    for name in fit.KUBERAY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("ray.data._internal.cluster_autoscaler.util.is_autoscaling_enabled", lambda: False)
    assert not fit.autoscaling_enabled()
    monkeypatch.setenv("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")
    assert fit.autoscaling_enabled()
    monkeypatch.delenv("RAY_USAGE_STATS_KUBERAY_IN_USE")
    (tmp_path / "ray_bootstrap_config.yaml").write_text("cluster_name: x\n")
    assert fit.autoscaling_enabled()


def test_timeouts_refuse_zero():
    with pytest.raises(ValueError):
        cfg(no_progress_timeout_s=0)
    assert cfg(no_progress_timeout_s=-1, actor_start_timeout_s=-1).no_progress_timeout_s == -1


TWO_CPU_SCRIPT = r"""
import json, sys, time
import ray
import caption_videos

samples, model, out = sys.argv[1:4]
ray.init(address="local", num_cpus=2, include_dashboard=False)   # what `ray start --head --num-cpus 2` gives
started = time.time()
code = caption_videos.main(["--manifest", f"{samples}/manifest.jsonl", "--output", out, "--model", model,
                            "--device", "cpu", "--num-frames", "2", "--max-new-tokens", "2"])
print(json.dumps({"code": code, "s": time.time() - started}), flush=True)
ray.shutdown()
"""


@pytest.mark.slow
def test_job_on_a_two_cpu_cluster_stops_at_once_with_the_reason(samples, tiny_model, tmp_path):
    """Before: the decode + preprocess actor and the model actor held both CPUs and the job hung
    with no message (its task stages waited forever). Now it exits 2 at once, saying what it needs."""
    proc = run_script(TWO_CPU_SCRIPT, samples, tiny_model, tmp_path / "captions", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and result["s"] < 60, result
    assert "run could not start: the Ray cluster has 2 CPUs and cannot add nodes, but this run needs at least 3" in proc.stderr
    assert not (tmp_path / "captions" / "_SUCCESS").exists()


SLOW_LOAD_SCRIPT = r"""
import json, sys, time
import ray

samples, model, out, delay, stall = sys.argv[1:6]
delay, stall = float(delay), float(stall)


def slow_model_load():
    # in every Ray worker: the model's weights take `delay` seconds to arrive (a big copy, a cold node)
    import time
    import pipeline.model.checkpoint as checkpoint

    load = checkpoint.local_checkpoint

    def slow(model, storage, weights=True):
        if weights:
            time.sleep(delay)
        return load(model, storage, weights)

    checkpoint.local_checkpoint = slow


ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"worker_process_setup_hook": slow_model_load})
import caption_videos
from pipeline.batch.run import run

result = {}
for name, start_wait in (("waits_for_actors", 300), ("ray_default_no_wait", -1)):
    cfg = caption_videos.parse_args([
        "--manifest", f"{samples}/manifest.jsonl", "--output", f"{out}/{name}", "--model", model, "--device", "cpu",
        "--num-frames", "2", "--max-new-tokens", "2", "--no-progress-timeout-s", str(stall),
        "--actor-start-timeout-s", str(start_wait)])
    started = time.time()
    try:
        summary = run(cfg)
        result[name] = {"ok": summary.ok, "rows": summary.rows}
    except Exception as e:
        result[name] = {"error": type(e).__name__, "message": str(e)[:2000]}
    result[name]["s"] = time.time() - started
    ctx = ray.data.DataContext.get_current()
    result[name]["context"] = {"execution_no_progress_timeout_s": ctx.execution_no_progress_timeout_s,
                               "wait_for_min_actors_s": ctx.wait_for_min_actors_s}
print(json.dumps(result), flush=True)
ray.shutdown()
"""


@pytest.mark.slow
def test_model_load_slower_than_the_no_progress_timeout_does_not_fail_the_run(samples, tiny_model, tmp_path):
    """A model load of 120 s under a no-progress timeout of 30 s (a 72B copy under Ray's 30 min): the
    job's DataContext makes the pools wait for their actors first, so the run completes; Ray's
    default (no wait) fails the same run with Ray Data's ExecutionTimeoutError."""
    delay, stall = 120, 30  # on a loaded 2-core machine a video item alone can take 30 s: two small images
    media = tmp_path / "media"
    media.mkdir()
    lines = []
    for name in ("photo.jpg", "logo.png"):
        (media / name).write_bytes((samples / name).read_bytes())
        lines.append(json.dumps({"id": name, "uri": str(media / name)}))
    (media / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_script(SLOW_LOAD_SCRIPT, media, tiny_model, tmp_path, delay, stall)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    waited = result["waits_for_actors"]
    assert "error" not in waited and waited["ok"] == waited["rows"] == 2 and waited["s"] > delay, waited
    assert waited["context"] == {"execution_no_progress_timeout_s": stall, "wait_for_min_actors_s": 300}
    default = result["ray_default_no_wait"]
    assert default.get("error") == "ExecutionTimeoutError" and "made no progress" in default["message"], default
    assert default["context"]["wait_for_min_actors_s"] == -1


def test_job_defaults_cover_a_cold_72b_start():
    """Defaults: two hours for the first actors (autoscaled GPU nodes + 146 GB copied and loaded),
    an hour of no progress once running (Ray's own default is 30 min, counted from the start)."""
    c = cfg()
    assert c.actor_start_timeout_s >= 3600 and c.no_progress_timeout_s >= 1800


def test_the_settings_are_ray_datas_own_fields(monkeypatch):
    """The names the job sets are the installed Ray Data's DataContext fields (a rename would make them
    silently ineffective), with Ray's defaults as the README states them; the job's values land there."""
    import dataclasses

    import ray.data

    from pipeline.batch.fit import configure_data_context

    fields = {f.name: f.default for f in dataclasses.fields(ray.data.DataContext)}
    if not os.environ.get("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S"):
        assert fields["execution_no_progress_timeout_s"] == 30 * 60
    assert fields["wait_for_min_actors_s"] == -1  # Ray's default: actors start in the background, the guard counts
    ctx = ray.data.DataContext()
    monkeypatch.setattr(ray.data.DataContext, "get_current", staticmethod(lambda: ctx))
    configure_data_context(cfg(actor_start_timeout_s=5400, no_progress_timeout_s=2400))
    assert (ctx.wait_for_min_actors_s, ctx.execution_no_progress_timeout_s) == (5400, 2400)
    configure_data_context(cfg(actor_start_timeout_s=-1, no_progress_timeout_s=-1))
    assert (ctx.wait_for_min_actors_s, ctx.execution_no_progress_timeout_s) == (-1, -1)
