"""`--dry-run` checks the manifest, the model's location and write access to the output, prints
the sizing plan, and loads no model weights and starts no Ray (transformers reads the model's
shapes for the plan)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "caption_videos.py"


def dry_run(*args, env=None):
    code = (f"import sys; sys.argv = ['caption_videos.py', *{[str(a) for a in args]!r}, '--dry-run']; "
            f"sys.path.insert(0, {str(JOB.parent)!r}); import caption_videos; rc = caption_videos.main(); "
            "print('loaded:', sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules)); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_dry_run_passes_and_loads_nothing(samples, tiny_model, tmp_path):
    out = tmp_path / "out"
    p = dry_run("--manifest", samples / "manifest.jsonl", "--output", out, "--model", tiny_model)
    assert p.returncode == 0, p.stderr
    assert "dry run OK: manifest 1 file(s), 7 items" in p.stdout and "config.json found" in p.stdout
    assert "sizing: " in p.stdout and "tp 1 -> 0.0 GB weights per device" in p.stdout
    assert "'ray'" not in p.stdout.split("loaded:")[1]  # no Ray
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone


@pytest.mark.parametrize("case", ["manifest", "output", "model"])
def test_dry_run_fails_with_the_reason(case, samples, tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = {"manifest": samples / "manifest.jsonl", "output": tmp_path / "out", "model": tiny_model}
    args[case] = {"manifest": tmp_path / "nope.jsonl", "output": blocker / "out", "model": tmp_path}[case]
    p = dry_run(*[x for k, v in args.items() for x in (f"--{k}", v)])
    assert p.returncode == 2
    want = {"manifest": "manifest not found", "output": "cannot write to output", "model": "holds no config.json"}[case]
    assert want in p.stderr


def test_dry_run_on_s3(s3_endpoint, s3_client, samples, tiny_model):
    s3_client.create_bucket(Bucket="dry-run-out")
    args = ["--manifest", samples / "manifest.jsonl", "--model", tiny_model, "--s3-endpoint-url", s3_endpoint]
    ok = dry_run(*args, "--output", "s3://dry-run-out/captions/")
    assert ok.returncode == 0, ok.stderr
    assert s3_client.list_objects_v2(Bucket="dry-run-out").get("KeyCount") == 0
    missing = dry_run(*args, "--output", "s3://no-such-bucket/captions/")
    assert missing.returncode == 2 and "cannot write to output s3://no-such-bucket/captions/" in missing.stderr
