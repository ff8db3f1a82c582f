"""`--dry-run` checks the manifest, the model's location and write access to the output, prints
the sizing plan and the run's plan (items already committed, items to do: planned on a local Ray
cluster as the run plans them), and loads no model weights (transformers reads the model's
shapes for the sizing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "caption_videos.py"


def dry_run(*args, env=None):
    return subprocess.run([sys.executable, str(JOB), *[str(a) for a in args], "--dry-run"], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


def weightless_copy(model, dest: Path) -> Path:
    """The checkpoint's folder without its weight files: a dry run that read weights would fail."""
    import shutil

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def plan_of(stdout: str) -> dict:
    (line,) = [line for line in stdout.splitlines() if line.startswith("plan: ")]
    return {k: int(v) for k, v in (pair.split("=") for pair in line.removeprefix("plan: ").split())}


def test_dry_run_passes_plans_and_loads_no_weights(samples, tiny_model, tmp_path):
    out = tmp_path / "out"
    p = dry_run("--manifest", samples / "manifest.jsonl", "--output", out, "--model", weightless_copy(tiny_model, tmp_path / "m"))
    assert p.returncode == 0, p.stderr
    assert "dry run OK: manifest 1 file(s), 7 items" in p.stdout and "config.json found" in p.stdout
    assert "sizing: " in p.stdout and "tp 1 -> 0.0 GB weights per device" in p.stdout
    assert plan_of(p.stdout) == {"items": 7, "committed": 0, "todo": 7, "invalid": 0, "manifest_files": 1}
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone


def test_dry_run_says_how_many_items_are_new_tonight(samples, tiny_model, tmp_path):
    """The nightly question: after a run, the dry run of a grown manifest counts only the new items."""
    lines = (samples / "manifest.jsonl").read_text().splitlines(keepends=True)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out"
    manifest.write_text("".join(lines[:3]))
    args = ["--manifest", manifest, "--output", out, "--model", tiny_model, "--allow-uri-prefix", samples,
            "--max-new-tokens", 2, "--num-frames", 2]
    run = subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    manifest.write_text("".join(lines) + '{"id": "broken"}\n')  # four more items and an invalid row
    p = dry_run(*args)
    assert p.returncode == 0, p.stderr
    assert plan_of(p.stdout) == {"items": 8, "committed": 3, "todo": 5, "invalid": 1, "manifest_files": 1}
    other = dry_run(*args[:-4], "--max-new-tokens", 3, "--num-frames", 2)  # other settings: nothing of theirs is committed
    assert plan_of(other.stdout)["todo"] == 8


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
