"""The job as a user runs it (`python jobs/caption_videos.py ...`), in a process of its own that
starts its own local Ray cluster: the way to hand Ray's workers an environment variable, such as
the test-only PIPELINE_TEST_DECODER_MODULE / PIPELINE_TEST_RANK_MODULE, that a cluster already
running in the test process would not pass on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_job_process(args, env: dict[str, str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the test's cluster
    child_env.update(env, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    return subprocess.run([sys.executable, str(REPO / "jobs" / "caption_videos.py"), *map(str, args)], cwd=REPO,
                          env=child_env, capture_output=True, text=True, timeout=timeout_s)
