"""The online server under hostile media: the ingress's peak memory and an innocent request's latency.

    python benchmarks/serve_attacks.py --output benchmarks/results/serve_attacks.json [--label after]
    PYTHONPATH=/path/to/older/checkout python benchmarks/serve_attacks.py --label before ...

Starts a local Ray + Serve on a fresh tiny RANDOM-WEIGHT checkpoint (4 prepare threads, 30 s
request timeout, the server's other defaults) and runs each attack from tests.helpers.hostile_media:
- index_bomb: one ~5 KB MP4 whose sample table declares 60 M samples;
- slow_videos: four ~500 KB one-keyframe 1080p videos (16,000 frames each) at once.
During each, 0.5 s in, an innocent request (the sample photo) is sent; the JSON holds the ingress
replica's RSS before and its peak growth, the innocent request's status and seconds, the attacks'
statuses. The arguments are valid for older versions of the server too (run one with --label before).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "attack-benchmark-token"


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def media_message(url: str, kind: str = "image_url", text: str = "Describe it.") -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": text}]}]


def ingress_process(app: str):
    """The ingress replica's process: a descendant of this one (the local Ray cluster), titled by Ray."""
    import psutil

    return next(p for p in psutil.Process().children(recursive=True)
                if f"ServeReplica:{app}:ChatIngress" in " ".join(p.cmdline()))


async def under_attack(url: str, token: str, app: str, photo: bytes, attacks: list[list[dict]]) -> dict:
    """The attack requests at once, an innocent photo request 0.5 s later; the ingress process's
    peak RSS meanwhile, the innocent request's status and latency, the attacks' statuses."""
    import openai

    ingress = ingress_process(app)
    base, peak, running = ingress.memory_info().rss, [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], ingress.memory_info().rss)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=300)

    async def status_of(messages) -> tuple[int, float]:
        started = time.monotonic()
        try:
            await api.chat.completions.create(model="tiny-llava", messages=messages)
            return 200, time.monotonic() - started
        except openai.APIStatusError as e:
            return e.status_code, time.monotonic() - started

    try:
        hostile = [asyncio.ensure_future(status_of(m)) for m in attacks]
        await asyncio.sleep(0.5)
        innocent = await status_of(media_message(data_url(photo, "image/jpeg")))
        attacked = await asyncio.gather(*hostile)
    finally:
        running[0] = False
        watcher.join()
    return {"innocent_status": innocent[0], "innocent_s": round(innocent[1], 2),
            "attack_statuses": [s for s, _ in attacked], "attack_s": [round(t, 1) for _, t in attacked],
            "ingress_rss_mb": round(base / 2**20), "ingress_peak_growth_mb": round((peak[0] - base) / 2**20)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "serve_attacks.json"))
    p.add_argument("--label", default="after", help="the key of this run in the output JSON (before, after, ...)")
    a = p.parse_args()
    import ray
    from ray import serve

    from benchmarks.serve_load import free_port
    from pipeline.serve import build_app
    from tests.helpers.hostile_media import index_bomb_mp4, one_keyframe_video

    work = Path(tempfile.mkdtemp(prefix="serve-attacks-"))
    subprocess.run([sys.executable, "-m", "pipeline.testing.samples", str(work / "samples")], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "pipeline.testing.tiny_model", str(work / "tiny")], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (work / "token").write_text(TOKEN)
    bomb = index_bomb_mp4((work / "samples" / "street.mp4").read_bytes())
    slow = one_keyframe_video(work / "slow.mp4").read_bytes()
    photo = (work / "samples" / "photo.jpg").read_bytes()

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(work / "tiny"), "served_model_name": "tiny-llava", "num_frames": "8",
                         "max_new_tokens": "4", "frontend_num_cpus": "0.5", "model_num_cpus": "0.5",
                         "api_token_file": str(work / "token"), "prepare_threads": "4", "request_timeout_s": "30"}),
              name="attacked", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    video = media_message(data_url(slow, "video/mp4"), "video_url")
    result = {
        "index_bomb": asyncio.run(under_attack(url, TOKEN, "attacked", photo,
                                               [media_message(data_url(bomb, "video/mp4"), "video_url")])),
        "slow_videos": asyncio.run(under_attack(url, TOKEN, "attacked", photo, [video] * 4)),
        "files": {"index_bomb_bytes": len(bomb), "slow_video_bytes": len(slow)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": round(os.getloadavg()[0], 1)},
    }
    serve.shutdown()
    out = Path(a.output)
    everything = json.loads(out.read_text()) if out.exists() else {}
    everything[a.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(everything, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
