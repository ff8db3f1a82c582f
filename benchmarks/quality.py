"""The quality flags' cost: rows per second of format_output (the output rows and their flags) on one
CPU core, with and without the flags, on result rows like the model's (real captions, loops, noise;
64 generated tokens each, as the job's default), and the flag rules alone.

    python -m benchmarks.quality --out benchmarks/results/quality.json [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import pyarrow as pa

TEXTS = [
    "The video shows a man in a red jacket riding a bicycle down a busy city street. Cars pass him on the left, and "
    "pedestrians wait at a crosswalk as the traffic light turns green.",
    "A golden retriever runs across a grassy park, chasing a yellow tennis ball. The dog catches the ball and trots back.",
    "The man walking his dog along the river. " * 6,
    "anunsunssing\ufffd\ufffdunsunsunsuns\x14uns\ufffddeuns\ufffddeaun whil cha wavesutslight cha",
    "Describe this video in detail.",
]


def results(n: int, seed: int = 0):
    from pipeline.batch.stages import RESULT_SCHEMA

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)]
        tokens = [rng.randrange(150_000) for _ in range(64)] if i % 3 else [17, 42, 99, 7] * 16
        rows.append({"id": f"r{i}", "uri": f"/m/{i}.mp4", "status": "ok", "prompt": "Describe this video in detail.",
                     "attempt": 1, "prompt_tokens": 1600, "text": text, "output_tokens": 64,
                     "finish_reason": "length" if i % 2 else "stop", "token_ids": tokens, "media_type": "video"})
    return pa.Table.from_pylist([{k: r.get(k) for k in RESULT_SCHEMA.names} for r in rows], schema=RESULT_SCHEMA)


def measure(rows: int) -> dict:
    from pipeline.batch import stages
    from pipeline.config import RunConfig
    from pipeline.quality import flags

    cfg = RunConfig(manifest="/tmp/m.jsonl", output="/tmp/o", model="m")
    table = results(rows)
    figures = {"rows": rows, "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count()}  # a shared machine: say how busy
    stages.format_output(table.slice(0, 10), cfg)  # warm: imports, regexes
    started = time.perf_counter()
    stages.format_output(table, cfg)
    figures["format_output_rows_per_s"] = rows / (time.perf_counter() - started)
    real = flags.quality_flags
    stages_quality = __import__("pipeline.quality", fromlist=["quality_flags"])
    try:
        stages_quality.quality_flags = lambda *a, **k: []  # format_output without the rules
        started = time.perf_counter()
        stages.format_output(table, cfg)
        figures["format_output_without_flags_rows_per_s"] = rows / (time.perf_counter() - started)
    finally:
        stages_quality.quality_flags = real
    pylist = table.select(["text", "prompt", "token_ids", "finish_reason"]).to_pylist()
    started = time.perf_counter()
    for r in pylist:
        real(r["text"], prompt=r["prompt"], token_ids=r["token_ids"], finish_reason=r["finish_reason"])
    figures["flag_rules_rows_per_s"] = rows / (time.perf_counter() - started)
    figures["flags_share_of_format_output"] = 1 - figures["format_output_rows_per_s"] / figures["format_output_without_flags_rows_per_s"]
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=20_000)
    a = p.parse_args(argv)
    figures = measure(a.rows)
    with open(a.out, "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
