"""The job through `ray job submit --working-dir .` against a local Ray head started by the test."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, free_port

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own process group; the group is killed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    # Token authentication with a token of the test's own (a fresh home has none in ~/.ray); the
    # head, its workers, the driver and the CLI read it from RAY_AUTH_TOKEN_PATH.
    token = Path(temp_dir) / "auth-token"
    token.write_text(uuid.uuid4().hex)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once when the test ends
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=4",
         "--include-dashboard=true", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Own ports for the agents: another Ray instance on this machine holds the default ones.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while time.time() < deadline:  # ready when a trivial job runs (the job agent starts last)
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert head.poll() is None, head.stdout.read()
        time.sleep(2)
    else:
        pytest.fail(f"the Ray head did not take a job in 180 s: {probe.stdout[-2000:]} {probe.stderr[-2000:]}")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job(ray_head, samples, tiny_model, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/caption_videos.py", "--manifest", str(samples / "manifest.jsonl"),
           "--output", str(out), "--model", str(tiny_model), "--max-new-tokens", "4", "--num-frames", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log and "7 items -> 7 rows (6 ok, 1 error: not_found=1)" in log
    df = pd.read_parquet(out)
    assert len(df) == 7 and (df.status == "ok").sum() == 6


def test_ray_job_submit_reports_a_failed_run(ray_head, tmp_path, tiny_model):
    address, env = ray_head
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/caption_videos.py", "--manifest", str(tmp_path / "absent.jsonl"),
           "--output", str(tmp_path / "out"), "--model", str(tiny_model)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "manifest not found" in done.stdout + done.stderr
