"""Shared fixtures: the tiny checkpoint and sample media (made by the project's own commands),
a local Ray cluster, and an S3-compatible server (moto in server mode)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Credentials for the moto server. Set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("PIPELINE_MODEL_CACHE", tempfile.mkdtemp(prefix="pipeline-model-cache-"))
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf-modules-"))  # remote-code tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llava-ov")
    subprocess.run([sys.executable, "-m", "pipeline.testing.tiny_model", str(path)], check=True, cwd=REPO)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """tiny_checkpoint(family) -> the tiny checkpoint of that family (llava_onevision is tiny_model)."""
    made = {"llava_onevision": tiny_model}

    def get(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            subprocess.run([sys.executable, "-m", "pipeline.testing.tiny_model", str(path), "--family", family],
                           check=True, cwd=REPO, capture_output=True)
            made[family] = path
        return made[family]

    return get


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    """The sample folder; its manifest is samples / "manifest.jsonl"."""
    path = tmp_path_factory.mktemp("samples")
    subprocess.run([sys.executable, "-m", "pipeline.testing.samples", str(path)], check=True, cwd=REPO)
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never another run's cluster
    yield ray
    ray.shutdown()


def scrape_until(ray, wanted: set[str], timeout_s: float = 90) -> list[str]:
    """The lines of the local Ray node's Prometheus endpoint once every `wanted` metric name is
    there (workers report every few seconds); fails the test after timeout_s."""
    import time
    import urllib.request

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, names, lines = time.time() + timeout_s, set(), []
    while time.time() < deadline and not wanted <= names:
        lines = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode().splitlines()
        names = {line.split("{")[0] for line in lines if line.startswith("ray_pipeline_")}
        time.sleep(3)
    assert wanted <= names, sorted(names)
    return lines


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP endpoint (moto's server mode) on a free local port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)
