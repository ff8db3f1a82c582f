"""Figure 4, memory and scale.

`measure`: peak RSS of the driver and of the workers for a small and a 10x larger manifest of
tiny items (a streaming pipeline keeps the ratio near 1), and steady items per second with 1 vs 2
CPUs (the job pinned to them, Ray and its workers included), taken from the difference between the
two manifests' wall times, so that start-up cancels out.

Dataset scale (issue 15), no model:

- `measure_planning`: manifests of N video rows (JSONL shards of SHARD_ROWS), with 0 and with N
  committed rows (written straight as Parquet under the run's settings), planned as a run plans
  them (pipeline.planning.plan.plan_run) and, up to BASELINE_MAX_ROWS, as the driver planned them before
  (benchmarks.baseline.driver_planning), each plan in a fresh process of its own:

      python -m benchmarks.scale plan|baseline CONFIG.json RESULT.json

  the planning wall time (Ray's start apart), rows per second, the driver's peak RSS (VmHWM),
  CPU seconds of the driver and Ray's processes, the plan's counts; new/old ratios side by side.
- `files_per_million`: output files per 1 M rows of a real tiny-model run, the file target scaled
  down with the run; the old layout's figure computed from its rule.
- `measure_commit`: a commit of 1 M rows on a moto server (its own process): wall time and S3
  requests, counted in the server's request log.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.e2e import run_job
from benchmarks.inputs import encode_video, write_image


def tiny_manifest(directory: Path, n: int) -> Path:
    """n tiny items: small clips and images, alternating (the files repeat; the ids do not)."""
    directory.mkdir(parents=True, exist_ok=True)
    clips = [encode_video(directory / f"clip-{i}.mp4", 320, 180, 2.0, gop_s=1.0, seed=300 + i) for i in range(4)]
    images = [write_image(directory / f"image-{i}.jpg", 160 + 40 * i, 120, seed=400 + i) for i in range(4)]
    path = directory / f"tiny-{n}.jsonl"
    path.write_text("".join(json.dumps({"id": f"item-{i}", "uri": str((clips if i % 2 else images)[i // 2 % 4])}) + "\n"
                            for i in range(n)))
    return path


def tiny_settings(model_dir: str) -> dict:
    return dict(model=model_dir, num_frames=4, batch_size=8, generation={"max_new_tokens": 8})


def measure(model_dir: str, work: Path, small: int, large: int, log=print) -> dict:
    settings = tiny_settings(model_dir)
    runs = {}
    for cpus in (2, 1):
        for name, n in (("small", small), ("large", large)):
            manifest = tiny_manifest(work / "tiny", n)
            job = run_job(work, f"scale-{name}-{cpus}cpu", dict(settings, manifest=str(manifest)), cpus=cpus)
            runs[f"{name}-{cpus}cpu"] = {k: job.get(k) for k in (
                "items", "ok", "cpus", "wall_s", "overall_items_per_s", "peak_rss_driver_mb", "peak_rss_workers_mb",
                "peak_rss_largest_worker_mb")}
            log(f"scale {n} items on {job['cpus']} CPU(s): {job['wall_s']:.1f} s, driver "
                f"{job['peak_rss_driver_mb']:.0f} MB, workers {job['peak_rss_workers_mb']:.0f} MB")
    # Steady state from the difference of the two sizes: start-up (Ray, actors, model load) cancels out.
    steady = {}
    for cpus in (2, 1):
        extra_s = runs[f"large-{cpus}cpu"]["wall_s"] - runs[f"small-{cpus}cpu"]["wall_s"]
        # (a run too small to rise above the noise falls back to the larger run's overall rate)
        steady[cpus] = (large - small) / extra_s if extra_s > 0 else runs[f"large-{cpus}cpu"]["overall_items_per_s"]
    s, big = runs["small-2cpu"], runs["large-2cpu"]
    ratio = lambda k: round(big[k] / s[k], 3)  # noqa: E731
    return {"runs": runs, "items": [small, large],
            "steady_items_per_s": {f"{c}cpu": round(v, 2) for c, v in steady.items()},
            "rss_ratio_driver": ratio("peak_rss_driver_mb"), "rss_ratio_workers": ratio("peak_rss_workers_mb"),
            "rss_ratio_1000_vs_100": round((big["peak_rss_driver_mb"] + big["peak_rss_workers_mb"])
                                           / (s["peak_rss_driver_mb"] + s["peak_rss_workers_mb"]), 3),
            "cpu_scaling_2_vs_1": round(steady[2] / steady[1], 2)}


# --- dataset scale (issue 15): planning, output files, commit ---

REPO = Path(__file__).resolve().parents[1]
PLAN_SETTINGS = dict(model="plan-only", allowed_uri_prefixes=["s3://media/"])  # planning loads no model, reads no media
SHARD_ROWS = 250_000  # rows per manifest file: a large manifest is a prefix of shards
# The old planning holds 2-3.3 GB per million rows on the driver: 10 M rows would need 20-33 GB.
BASELINE_MAX_ROWS = 1_000_000
MILLION = 1_000_000


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                RAY_DATA_DISABLE_PROGRESS_BARS="1")


def write_manifest(folder: Path, n: int) -> Path:
    """A prefix of JSONL shards holding n video rows with s3:// URIs (generated once, reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "_DONE").exists():
        return folder
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        with open(folder / f"part-{shard:05d}.jsonl", "w") as f:
            f.writelines(f'{{"id": "clip-{i:09d}", "uri": "s3://media/clips/{i:09d}.mp4", "media_type": "video"}}\n'
                         for i in range(start, min(n, start + SHARD_ROWS)))
    (folder / "_DONE").write_text("")  # "_": list_manifest_files skips it
    return folder


def committed_table(cfg, manifest: str, start: int, stop: int, run_id: str = "committed"):
    """Rows start..stop of write_manifest's manifest as committed ok rows under cfg's settings,
    in the output schema (what a run of that manifest would have committed, without the model)."""
    from datetime import datetime, timezone

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.schemas import output_arrow_schema

    schema = output_arrow_schema()
    idx = np.arange(start, stop)
    num = pc.utf8_lpad(pa.array(idx).cast(pa.string()), 9, "0")
    shard = pc.utf8_lpad(pa.array(idx // SHARD_ROWS).cast(pa.string()), 5, "0")
    source = pc.binary_join_element_wise(f"{manifest}/part-", shard, ".jsonl:line ",
                                         pa.array(idx % SHARD_ROWS + 1).cast(pa.string()), "")
    const = lambda v: pa.repeat(pa.scalar(v), len(idx))  # noqa: E731
    cols = {"id": pc.binary_join_element_wise("clip-", num, ""),
            "uri": pc.binary_join_element_wise("s3://media/clips/", num, ".mp4", ""),
            "media_type": const("video"), "task": const("caption"), "prompt": const(cfg.default_prompt("video")),
            "text": const("a caption"), "status": const("ok"), "source": source, "model": const(cfg.model),
            "config_key": const(cfg.config_key()), "run_id": const(run_id),
            "created_at": pa.repeat(pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC")), len(idx))}
    return pa.table({name: cols.get(name, pa.nulls(len(idx), schema.field(name).type)) for name in schema.names},
                    schema=schema)


def write_committed(output: Path, manifest: Path, n: int, cfg) -> None:
    """An output holding a committed ok row for each of the manifest's n rows under cfg's settings,
    in files of cfg.output_file_rows (generated once per settings, reused)."""
    import pyarrow.parquet as pq

    marker = output / "_SUCCESS"
    if marker.exists() and json.loads(marker.read_text()).get("config_key") == cfg.config_key():
        return
    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("*.parquet"):
        old.unlink()
    for f, start in enumerate(range(0, n, cfg.output_file_rows)):
        pq.write_table(committed_table(cfg, str(manifest), start, min(n, start + cfg.output_file_rows)),
                       output / f"part-committed-{f:05d}.parquet", row_group_size=cfg.output_row_group_rows)
    marker.write_text(json.dumps({"config_key": cfg.config_key(), "rows": n}))


def measure_planning(work: Path, sizes: list[int], log=print, timeout_s: float = 7200) -> dict:
    """Each size planned with 0 and with as many committed rows, by the new planning and (up to
    BASELINE_MAX_ROWS) by the old one, each plan in a fresh process. A plan whose counts are
    wrong ends the benchmark."""
    from pipeline.config import RunConfig

    plans, skipped = {}, {}
    for n in sorted(sizes):
        manifest = write_manifest(work / f"scale-manifest-{n}", n)
        for committed in (0, n):
            case = f"{n}-rows-{committed}-committed"
            output = work / (f"scale-committed-{n}" if committed else "scale-nothing-committed")
            fields = dict(PLAN_SETTINGS, manifest=str(manifest), output=str(output))
            if committed:
                write_committed(output, manifest, n, RunConfig(**fields))
            plans[case] = {}
            for mode in ("plan", "baseline"):
                if mode == "baseline" and n > BASELINE_MAX_ROWS:
                    skipped[case] = (f"the old driver-side planning holds 2-3.3 GB per million rows on the driver "
                                     f"(20-33 GB at 10 M): run up to {BASELINE_MAX_ROWS} rows only")
                    continue
                r = plan_in_process(mode, work / f"scale-{mode}-{case}.json", fields, timeout_s)
                if (r["items"], r["todo"], r["invalid"]) != (n, n - committed, 0):
                    raise RuntimeError(f"{mode} of {case} planned wrongly: items={r['items']} todo={r['todo']} "
                                       f"invalid={r['invalid']} (expected items={n} todo={n - committed} invalid=0)")
                plans[case]["new" if mode == "plan" else "old"] = r
                log(f"scale {mode} {case}: {r['plan_s']:.1f} s ({r['rows_per_s']} rows/s), driver peak "
                    f"{r['peak_rss_driver_mb']} MB, {r['cpu_s']} CPU s; todo {r['todo']}")
            if "old" in plans[case]:
                new, old = plans[case]["new"], plans[case]["old"]
                plans[case]["new_vs_old"] = {"peak_rss_driver": round(new["peak_rss_driver_mb"] / old["peak_rss_driver_mb"], 3),
                                             "plan_s": round(new["plan_s"] / old["plan_s"], 3),
                                             "cpu_s": round(new["cpu_s"] / old["cpu_s"], 3) if old["cpu_s"] else None}
    sizes = sorted(sizes)
    peak = {n: max(plans[f"{n}-rows-{c}-committed"]["new"]["peak_rss_driver_mb"] for c in (0, n)) for n in sizes}
    largest = sizes[-1]
    out = {"sizes": sizes, "shard_rows": SHARD_ROWS, "plans": plans, "baseline_skipped": skipped,
           "peak_rss_driver_mb": {str(n): peak[n] for n in sizes},
           # the slower of the two plans (0 and N committed) at the largest size
           "plan_rows_per_s_largest": min(plans[f"{largest}-rows-{c}-committed"]["new"]["rows_per_s"] for c in (0, largest))}
    if 10 * MILLION in peak:
        out["plan_peak_rss_driver_mb_10m"] = peak[10 * MILLION]
    if 10 * MILLION in peak and MILLION in peak:
        out["plan_rss_ratio_10m_vs_1m"] = round(peak[10 * MILLION] / peak[MILLION], 3)
    else:
        out["not_measured"] = "the goals at 10 M rows (peak RSS, its ratio to 1 M) need sizes 1M and 10M (full profile)"
    both = [n for n in sizes if n <= BASELINE_MAX_ROWS]
    if both:  # the largest size both plannings ran, with as many committed rows (the nightly case)
        ratios = plans[f"{both[-1]}-rows-{both[-1]}-committed"]["new_vs_old"]
        out.update(plan_rss_new_vs_old=ratios["peak_rss_driver"], plan_s_new_vs_old=ratios["plan_s"],
                   new_vs_old_at_rows=both[-1])
    return out


def plan_in_process(mode: str, result: Path, fields: dict, timeout_s: float = 7200) -> dict:
    """One plan (mode: plan = pipeline.planning.plan.plan_run, baseline = the old driver-side planning) in
    a fresh `python -m benchmarks.scale` process; its result."""
    config = result.with_suffix(".config.json")
    config.write_text(json.dumps(fields))
    result.unlink(missing_ok=True)
    with open(result.with_suffix(".log"), "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", mode, str(config), str(result)], cwd=REPO,
                              env=_env(), stdout=log, stderr=log, timeout=timeout_s)
    if proc.returncode:
        raise RuntimeError(f"the {mode} of {config} failed (exit {proc.returncode}); see {result.with_suffix('.log')}")
    return json.loads(result.read_text())


def cpu_seconds() -> float:
    """User + system CPU time of this process and every process under it (Ray's GCS, raylet and
    workers), and of those that ended and were waited for."""
    import psutil

    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def _start_ray() -> None:
    import tempfile

    import ray

    # the job's own local-cluster settings (pipeline.batch.run.connect_ray), in a short temp dir of our own
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux keeps that across fork and
    exec, so a child started by a large parent (this benchmark, with torch loaded) reports the
    parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _plan_main(mode: str, config: str, result: str) -> int:
    import ray

    from pipeline.config import RunConfig

    cfg = RunConfig(**json.loads(Path(config).read_text()))
    t0 = time.time()
    _start_ray()
    t1, cpu1 = time.time(), cpu_seconds()
    if mode == "plan":
        from pipeline.output.location import OutputLocation
        from pipeline.planning.manifest import manifest_file_sizes
        from pipeline.planning.plan import plan_run

        p = plan_run(cfg, OutputLocation.of(cfg.output, cfg.storage), manifest_file_sizes(cfg.manifest, cfg))
        counts = {"items": p.items, "todo": p.todo, "committed": p.committed, "invalid": p.invalid,
                  "manifest_files": len(p.files), "partitions": p.partitions, "line": p.line()}
    else:
        from benchmarks.baseline import driver_planning

        counts = driver_planning(cfg)
    t2, cpu2 = time.time(), cpu_seconds()
    ray.shutdown()
    Path(result).write_text(json.dumps(dict(
        counts, mode=mode, ray_init_s=round(t1 - t0, 2), plan_s=round(t2 - t1, 2),
        rows_per_s=round(counts["items"] / (t2 - t1)),
        peak_rss_driver_mb=round(peak_rss_mb()),
        # on a loaded machine the wall time says little: CPU seconds of the driver and Ray's processes
        cpu_s=round(cpu2 - cpu1, 1), rows_per_cpu_s=round(counts["items"] / max(cpu2 - cpu1, 1e-9)),
        load_avg_1m=round(os.getloadavg()[0], 2)), indent=1))
    return 0


def old_layout_files(rows: int) -> int:
    """Files the old layout wrote for a run of `rows` items: one per input block of min(64, ceil(rows/64)) rows."""
    return math.ceil(rows / max(1, min(64, math.ceil(rows / 64))))


def files_per_million(model_dir: str, work: Path, n: int, log=print) -> dict:
    """A real tiny-model run of n items with the file target scaled down by n / 1 M: a 1 M-row run
    in miniature, whose committed files, scaled back, are the files per 1 M rows."""
    from pipeline.config import RunConfig

    target = RunConfig.model_fields["output_file_rows"].default
    rows_per_file = max(1, n * target // MILLION)
    job = run_job(work, "scale-files", dict(tiny_settings(model_dir), manifest=str(tiny_manifest(work / "tiny", n)),
                                            output_file_rows=rows_per_file))
    if job["ok"] != n or job["rows"] != n:
        raise RuntimeError(f"scale files: the run of {n} tiny items gave {job['rows']} rows, {job['ok']} ok")
    files = len(list(Path(job["output"]).glob("*.parquet")))
    per_million = round(files * (MILLION / job["rows"]) * (rows_per_file / target), 1)
    log(f"scale files: {n} items -> {files} files at {rows_per_file} rows per file: {per_million} per 1 M rows "
        f"(old layout: {old_layout_files(MILLION)})")
    return {"items": n, "rows": job["rows"], "files": files, "output_file_rows": rows_per_file,
            "output_file_rows_at_1m": target, "files_per_1m_rows": per_million,
            "old_layout_files_per_1m_rows": old_layout_files(MILLION),
            "old_layout": "computed, not measured: one file per input block of min(64, ceil(n/64)) rows"}


REQUEST_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) [^"]* HTTP/1\.[01]"')
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some status lines


def s3_requests(server_log: Path) -> dict:
    """Requests the moto server logged so far, by method."""
    counts: dict = {}
    for method in REQUEST_LINE.findall(ANSI_COLOR.sub("", server_log.read_text(errors="replace"))):
        counts[method] = counts.get(method, 0) + 1
    return counts


def measure_commit(work: Path, rows: int = MILLION, rows_per_file: int = 100_000, log=print) -> dict:
    """Commit a staged run of `rows` rows in files of rows_per_file to an S3 output on a moto server
    started as its own process (its request log counts the requests), through commit.staged and
    commit.commit in a fresh process: the commit's wall time and S3 requests."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_log = work / "scale-moto.log"
    env = dict(_env(), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    with open(server_log, "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=f, stderr=f, env=env)
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        config, result = work / "scale-commit.config.json", work / "scale-commit.json"
        config.write_text(json.dumps({"endpoint": f"http://127.0.0.1:{port}", "rows": rows, "rows_per_file": rows_per_file,
                                      "server_log": str(server_log)}))
        result.unlink(missing_ok=True)
        with open(result.with_suffix(".log"), "w") as f:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "commit", str(config), str(result)],
                                  cwd=REPO, env=env, stdout=f, stderr=f, timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"the commit benchmark failed (exit {proc.returncode}); see {result.with_suffix('.log')}")
        out = json.loads(result.read_text())
    finally:
        server.terminate()
        server.wait()
    old_files = old_layout_files(rows)
    out.update(requests_per_file=round(out["requests"] / out["files"], 2),
               old_layout_files=old_files, old_layout_requests=round(out["requests"] / out["files"] * old_files),
               old_layout="computed, not measured: this commit's requests per file times the old layout's files")
    log(f"scale commit of {rows} rows in {out['files']} files on moto: {out['wall_s']} s, {out['requests']} S3 requests "
        f"({out['requests_by_method']}); old layout ({old_files} files): about {out['old_layout_requests']}")
    return out


def _commit_main(config: str, result: str) -> int:
    """Stage `rows` rows on the moto server, then time and count commit.staged and commit.commit."""
    import boto3
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    from pipeline.config import RunConfig, StorageConfig
    from pipeline.output import commit
    from pipeline.output.location import OutputLocation

    c = json.loads(Path(config).read_text())
    server_log = Path(c["server_log"])
    boto3.client("s3", endpoint_url=c["endpoint"]).create_bucket(Bucket="commit")
    cfg = RunConfig(**PLAN_SETTINGS, manifest="s3://commit/manifest", output="s3://commit/out", run_id="bench",
                    storage=StorageConfig(endpoint_url=c["endpoint"]), output_file_rows=c["rows_per_file"])
    s3 = pafs.S3FileSystem(endpoint_override=c["endpoint"], scheme="http")
    for f, start in enumerate(range(0, c["rows"], c["rows_per_file"])):  # the files a run stages
        pq.write_table(committed_table(cfg, cfg.manifest, start, min(c["rows"], start + c["rows_per_file"]), cfg.run_id),
                       f"commit/out/_staging/bench/{f:06d}.parquet", filesystem=s3, row_group_size=cfg.output_row_group_rows)
    _start_ray()
    marks = [s3_requests(server_log)]
    t0 = time.time()
    out = OutputLocation.of(cfg.output, cfg.storage)
    written = commit.staged(out, cfg.run_id)
    t1 = time.time()
    marks.append(s3_requests(server_log))
    commit.commit(out, cfg, written, {"run_id": cfg.run_id})
    t2 = time.time()
    time.sleep(1)  # the server's last log lines
    marks.append(s3_requests(server_log))
    diff = lambda a, b: {k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) - a.get(k, 0)}  # noqa: E731
    committed = [p for p in s3.get_file_info(pafs.FileSelector("commit/out")) if p.base_name.endswith(".parquet")]
    committed_rows = sum(pq.ParquetFile(s3.open_input_file(p.path)).metadata.num_rows for p in committed)
    if written.rows != c["rows"] or committed_rows != c["rows"] or len(committed) != len(written.files):
        raise RuntimeError(f"the commit is wrong: staged {written.rows} rows, committed {committed_rows} rows in "
                           f"{len(committed)} files (expected {c['rows']} rows in {len(written.files)} files)")
    by_method = diff(marks[1], marks[2])
    Path(result).write_text(json.dumps({
        "rows": c["rows"], "files": len(written.files), "rows_per_file": c["rows_per_file"], "wall_s": round(t2 - t1, 2),
        "requests": sum(by_method.values()), "requests_by_method": by_method,
        "staged_wall_s": round(t1 - t0, 2), "staged_requests": sum(diff(marks[0], marks[1]).values())}, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] in (["plan"], ["baseline"]) and len(sys.argv) == 4:
        sys.exit(_plan_main(*sys.argv[1:4]))
    if sys.argv[1:2] == ["commit"] and len(sys.argv) == 4:
        sys.exit(_commit_main(*sys.argv[2:4]))
    sys.exit(f"usage: python -m benchmarks.scale plan|baseline|commit CONFIG.json RESULT.json (got {sys.argv[1:]})")
