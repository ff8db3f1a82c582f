"""Load on the online server: requests/s, latency and time to first token, whole and streamed answers.

    python benchmarks/serve_load.py --output benchmarks/results/serve_load.json
        [--model DIR] [--concurrency 16 64] [--requests 256] [--batch-size 8] [--url URL --token T]

Without --url it starts a local Ray + Serve on --model (default: a fresh tiny RANDOM-WEIGHT
checkpoint, so the figures measure the serving path, not a real model) with two applications: one
whose queue holds every request (0 failures expected) and "/overload", whose queue is small
(4 at once, 8 queued), hit with a burst of 64: the requests above its limit must get 429, the others
200. Each request is one chat completion with the sample photo as a data: URL; per concurrency the
JSON holds requests/s, p50/p90/p99 latency, time to first token p50/p99 (streamed: the first text
chunk; whole: the answer) and how many requests shared each generate call.
"""

import argparse
import asyncio
import base64
import json
import os
import platform
import secrets
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


OVERLOAD = {"max_ongoing_requests": 4, "max_queued_requests": 8}  # the /overload application's limits


def start_local(model: str, batch_size: int, max_new_tokens: int, token: str, work: Path) -> str:
    import ray
    from ray import serve

    from pipeline.serve import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    (work / "token").write_text(token)
    common = {"model": model, "served_model_name": "bench", "batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "batch_wait_timeout_s": 0.02, "frontend_num_cpus": 0.5, "model_num_cpus": 0.5,
              "api_token_file": str(work / "token")}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.RunTarget(build_app({**common, "max_queued_requests": 1024}), name="bench", route_prefix="/"),
                    serve.RunTarget(build_app({**common, **OVERLOAD}), name="overload", route_prefix="/overload")])
    return f"http://127.0.0.1:{port}"


def percentiles(seconds: list[float], which=("p50", "p90", "p99")) -> dict:
    ms = np.array(seconds) * 1000 if seconds else np.array([np.nan])
    return {p: round(float(np.percentile(ms, int(p[1:]))), 1) for p in which}


async def load(url: str, token: str, image_url: str, concurrency: int, requests: int, stream: bool) -> dict:
    import openai

    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=300)
    model = (await api.models.list()).data[0].id
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": "Describe this image."}]}]
    latencies, first_tokens, sizes, failures = [], [], Counter(), Counter()
    todo = iter(range(requests))

    async def one() -> None:
        t = time.perf_counter()
        if stream:
            first = None
            async for c in await api.chat.completions.create(model=model, messages=msgs, stream=True):
                if first is None and c.choices and c.choices[0].delta.content:
                    first = time.perf_counter() - t
            first_tokens.append(first if first is not None else time.perf_counter() - t)
        else:
            raw = await api.chat.completions.with_raw_response.create(model=model, messages=msgs)
            sizes[int(raw.headers["x-pipeline-batch-size"])] += 1
            first_tokens.append(time.perf_counter() - t)
        latencies.append(time.perf_counter() - t)

    async def worker():
        for _ in todo:
            try:
                await one()
            except openai.APIError as e:
                failures[type(e).__name__] += 1

    for _ in range(concurrency):  # warm-up: first calls load lazily initialised code paths
        await api.chat.completions.create(model=model, messages=msgs)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    result = {"stream": stream, "concurrency": concurrency, "requests": requests, "ok": len(latencies),
              "failures": dict(failures), "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
              "latency_ms": percentiles(latencies), "time_to_first_token_ms": percentiles(first_tokens, ("p50", "p99"))}
    if sizes:
        result["batch_sizes"] = {str(k): v for k, v in sorted(sizes.items())}
    return result


async def overload(url: str, token: str, image_url: str, burst: int) -> dict:
    """A burst of `burst` requests at once on /overload: statuses counted (429 = refused by the queue limit)."""
    import httpx2 as httpx  # the openai client's own HTTP library

    body = {"model": "bench", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Describe this image."}]}]}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=burst)) as http:
        replies = await asyncio.gather(*(http.post(f"{url}/overload/v1/chat/completions", json=body,
                                                   headers={"Authorization": f"Bearer {token}"}) for _ in range(burst)))
    codes = Counter(r.status_code for r in replies)
    return {"burst": burst, **OVERLOAD, "statuses": {str(k): v for k, v in sorted(codes.items())},
            "admitted_limit": OVERLOAD["max_ongoing_requests"] + OVERLOAD["max_queued_requests"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    p.add_argument("--model", help="checkpoint folder (default: a fresh tiny random-weight one)")
    p.add_argument("--url", help="an already running server (default: start one locally)")
    p.add_argument("--token", default=os.environ.get("PIPELINE_API_TOKEN") or secrets.token_hex(16))
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
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
        url = start_local(model, a.batch_size, a.max_new_tokens, a.token, work)
    runs = [asyncio.run(load(url, a.token, image_url, c, a.requests, stream))
            for c in a.concurrency for stream in (False, True)]
    result = {"runs": runs}
    if a.url is None:
        result["overload"] = asyncio.run(overload(url, a.token, image_url, burst=64))
    result.update(model=a.model or "tiny random-weight checkpoint", batch_size=a.batch_size,
                  max_new_tokens=a.max_new_tokens, input="photo.jpg as data: URL",
                  machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_1m": round(os.getloadavg()[0], 1)})
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    refused = result.get("overload", {}).get("statuses", {})
    ok = not any(r["failures"] for r in runs) and (a.url is not None or set(refused) <= {"200", "429"} and "429" in refused)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
