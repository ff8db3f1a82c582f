"""The README's first command end to end, as on a fresh machine: an empty home folder (no Ray
token, no caches), only pip's cache passed through so nothing is downloaded again."""

import os
import subprocess
from pathlib import Path

import pandas as pd
from conftest import REPO, free_port


def test_quickstart_runs_on_a_fresh_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), DASHBOARD_PORT=str(free_port()),
               PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")))
    done = subprocess.run(["bash", "jobs/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert not (home / ".ray").exists(), "the quickstart must not rely on (or leave) a token in ~/.ray"
    df = pd.read_parquet(REPO / ".quickstart" / "output" / "captions")
    # the sample data: videos and images, one missing file on purpose
    assert len(df) == 7 and (df.status == "ok").sum() == 6, df[["id", "status", "error_type"]]
    assert df[df.status == "error"].error_type.tolist() == ["not_found"]
    printed = done.stdout[done.stdout.index("Output: "):]
    for row_id in df.id:
        assert row_id in printed
    assert "RANDOM" in done.stdout and "NOISE" in done.stdout
    assert "\n\n\n" not in done.stdout, "stray blank lines"
    assert "downloads torch" not in out
