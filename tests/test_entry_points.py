"""Every entry point's --help exits 0 and names its options (a user's second command is --help)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each entry point, with options its help must name (beyond -h/--help).
ENTRY_POINTS = {
    "jobs/caption_videos.py": ["--manifest", "--output", "--model", "--task", "--num-frames", "--address", "--dry-run"],
    "jobs/report.py": ["--output", "--allow-uri-prefix", "--frames-from-ledger"],
    "jobs/fault_scenarios.py": ["--only"],
    "-m benchmarks": ["--quick", "--only"],
    "-m benchmarks.validators": ["--rows", "--out"],
    "-m pipeline.planning.sizing": ["--model", "--gpus"],
    "-m pipeline.sizing": ["--model", "--gpus"],  # the spelling before pipeline/ had folders
    "-m pipeline.testing.samples": [],
    "-m pipeline.testing.tiny_model": ["--family", "--seed"],
}


def test_every_job_script_is_listed():
    assert {f"jobs/{p.name}" for p in (REPO / "jobs").glob("*.py")} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_help_exits_0_and_names_the_options(entry):
    cmd = [sys.executable, *entry.split(), "--help"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    missing = [o for o in ENTRY_POINTS[entry] if o not in done.stdout]
    assert not missing, f"{entry} --help does not name {missing}"


def test_the_serve_builders_documented_arguments_are_accepted():
    """`serve run pipeline.serve:build_app KEY=VALUE ...`: every argument the README names is a
    ServeConfig field, and the README's example command parses."""
    import re

    from pipeline.config import GenerationConfig, StorageConfig
    from pipeline.serve import ServeConfig, parse_args

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Serving"):]
    section = section[:section.index("\n## ", 1)]
    fields = set(ServeConfig.model_fields) | set(GenerationConfig.model_fields) | {
        f"storage.{k}" for k in StorageConfig.model_fields}
    named = set(re.findall(r"`([a-z_.]+)`", section[section.index("Arguments are"):section.index("Routes:")]))
    protection = section[section.index("Protection"):]
    named |= set(re.findall(r"`([a-z_.]+)`", protection[:protection.index("\n\n")])) - {"allow_unauthenticated: true"}
    assert named and not named - fields, f"README names serve arguments that do not exist: {sorted(named - fields)}"
    example = re.search(r"serve run pipeline\.serve:build_app (.*?)\n(.*?)\n", section)
    args = dict(a.split("=", 1) for a in (example.group(1).rstrip(" \\") + " " + example.group(2)).split())
    assert parse_args(args).model == "DIR_OR_HUB_ID"
