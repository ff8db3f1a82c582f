"""Run the batch job once, in its own process, and measure it.

    python -m benchmarks.jobrun CONFIG.json RESULT.json [--cpus N]

CONFIG.json holds RunConfig fields. The process pins itself (and so Ray and every worker it
starts) to the first N CPUs, starts a fresh local Ray (not any cluster already on the machine),
runs `pipeline.batch.run.run`, and writes: the wall time split into Ray start and the run, the model
actors' generate calls (from RunConfig.trace_dir), and peak private memory (RSS less shared pages)
of the driver and of all the processes under it (Ray's raylet, workers, decoder children), every 0.2 s.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path


def private_rss(p) -> int:
    """Resident memory less the shared pages (Ray's object store is shared memory that every
    process maps; counting it in each one would measure the store's size, not the pipeline's)."""
    m = p.memory_info()
    return m.rss - getattr(m, "shared", 0)


class MemorySampler(threading.Thread):
    """Peak private RSS of this process (the driver) and of the sum over its descendants."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me, self.every_s, self.stop = psutil.Process(), every_s, threading.Event()
        self.peak_driver = self.peak_workers = self.peak_largest_worker = 0

    def run(self):
        import psutil

        while not self.stop.wait(self.every_s):
            self.peak_driver = max(self.peak_driver, private_rss(self.me))
            total = largest = 0
            for p in self.me.children(recursive=True):
                try:
                    rss = private_rss(p)
                except psutil.Error:
                    continue
                total, largest = total + rss, max(largest, rss)
            self.peak_workers = max(self.peak_workers, total)
            self.peak_largest_worker = max(self.peak_largest_worker, largest)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("result")
    p.add_argument("--cpus", type=int, help="pin to this many CPUs (default: all)")
    a = p.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.cpus])
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from pipeline.batch.run import run
    from pipeline.config import RunConfig

    cfg = RunConfig.model_validate_json(Path(a.config).read_text())
    sampler = MemorySampler()
    sampler.start()
    t0 = time.time()
    # The job's own local-cluster settings (pipeline.batch.run.connect_ray), in a short temp dir of our own.
    ray.init(address="local", num_cpus=max(4, len(os.sched_getaffinity(0))), include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    t1 = time.time()
    summary = run(cfg)
    t2 = time.time()
    sampler.stop.set()
    ray.shutdown()
    spans = []
    for trace in Path(cfg.trace_dir).glob("generate-*.jsonl") if cfg.trace_dir else []:
        spans += [json.loads(line) for line in trace.read_text().splitlines()]
    Path(a.result).write_text(json.dumps({
        "start": t0, "ray_init_s": t1 - t0, "run_s": t2 - t1, "wall_s": t2 - t0,
        "items": summary.items, "rows": summary.rows, "ok": summary.ok, "errors": summary.errors,
        "error_types": summary.error_types, "cpus": len(os.sched_getaffinity(0)),
        "generate_calls": sorted(spans, key=lambda s: s["start"]),
        "peak_rss_driver_mb": sampler.peak_driver / 2**20,
        "peak_rss_workers_mb": sampler.peak_workers / 2**20,
        "peak_rss_largest_worker_mb": sampler.peak_largest_worker / 2**20,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
