"""Load on the online server: requests/s and latency percentiles at a fixed concurrency.

    python benchmarks/serve_load.py --output benchmarks/results/serve_load.json
        [--model DIR] [--concurrency 16] [--requests 256] [--batch-size 8] [--url URL --token T]

Without --url it starts a local Ray + Serve on --model (default: a fresh tiny RANDOM-WEIGHT
checkpoint, so the figure measures the serving path, not a real model). Each request is one
chat completion with the sample photo as a data: URL; the JSON holds the settings, throughput,
p50/p90/p99 latency and how many requests shared each generate call.
"""

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(model: str, batch_size: int, max_new_tokens: int) -> str:
    import ray
    from ray import serve

    from pipeline.serve import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "served_model_name": "bench", "batch_size": batch_size,
                         "max_new_tokens": max_new_tokens, "batch_wait_timeout_s": 0.02,
                         "frontend_num_cpus": 0.5, "max_queued_requests": 1024}), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


async def load(url: str, token: str, image_url: str, concurrency: int, requests: int) -> dict:
    import openai

    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=300)
    model = (await api.models.list()).data[0].id
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": "Describe this image."}]}]
    latencies, sizes, failures = [], Counter(), Counter()
    todo = iter(range(requests))

    async def worker():
        for _ in todo:
            t = time.perf_counter()
            try:
                raw = await api.chat.completions.with_raw_response.create(model=model, messages=msgs)
                sizes[int(raw.headers["x-pipeline-batch-size"])] += 1
                latencies.append(time.perf_counter() - t)
            except openai.APIError as e:
                failures[type(e).__name__] += 1

    for _ in range(concurrency):  # warm-up: first calls load lazily initialised code paths
        await api.chat.completions.create(model=model, messages=msgs)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"requests": requests, "ok": len(latencies), "failures": dict(failures), "concurrency": concurrency,
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
            "latency_ms": {p: round(float(np.percentile(lat, int(p[1:]))), 1) for p in ("p50", "p90", "p99")},
            "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    p.add_argument("--model", help="checkpoint folder (default: a fresh tiny random-weight one)")
    p.add_argument("--url", help="an already running server (default: start one locally)")
    p.add_argument("--token", default=os.environ.get("PIPELINE_API_TOKEN", "none"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    subprocess.run([sys.executable, "-m", "pipeline.testing.samples", str(work / "samples")], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    image_url = "data:image/jpeg;base64," + base64.b64encode((work / "samples" / "photo.jpg").read_bytes()).decode()
    url = a.url
    if url is None:
        model = a.model
        if model is None:
            model = str(work / "tiny")
            subprocess.run([sys.executable, "-m", "pipeline.testing.tiny_model", model], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = start_local(model, a.batch_size, a.max_new_tokens)
    result = asyncio.run(load(url, a.token, image_url, a.concurrency, a.requests))
    result.update(model=a.model or "tiny random-weight checkpoint", batch_size=a.batch_size,
                  max_new_tokens=a.max_new_tokens, input="photo.jpg as data: URL",
                  machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_1m": round(os.getloadavg()[0], 1)})
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
