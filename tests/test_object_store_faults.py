"""Object-store faults through a real fault-injecting proxy in front of the moto S3 server:
transient ones (503 SlowDown, connection resets, latency) are retried and the run is complete;
permanent ones (AccessDenied, NoSuchKey, a store that never recovers) become row errors quickly."""

import json
import time

import pyarrow.dataset as pads
from pyarrow import fs as pafs

from pipeline.batch.run import run
from pipeline.config import RunConfig, StorageConfig
from tests.helpers.s3_fault_proxy import FaultProxy

FILES = ["street.mp4", "beach.webm", "photo.jpg", "logo.png", "palette.gif", "long_gop.mp4"]


def test_transient_faults_are_retried_and_permanent_ones_become_row_errors(ray_local, s3_endpoint, s3_client,
                                                                           samples, tiny_model):
    bucket = "faults"
    s3_client.create_bucket(Bucket=bucket)
    for name in FILES:
        s3_client.upload_file(str(samples / name), bucket, f"raw/{name}")
    rows = [{"id": name.split(".")[0], "uri": f"s3://{bucket}/raw/{name}"} for name in FILES]
    rows.append({"id": "gone", "uri": f"s3://{bucket}/raw/gone.mp4"})
    s3_client.put_object(Bucket=bucket, Key="m.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())

    with FaultProxy(s3_endpoint) as proxy:
        proxy.add("/faults/m.jsonl", "503", times=2)  # the driver's manifest read
        slow = proxy.add("/faults/raw/street.mp4", "503", times=3, method="GET")
        proxy.add("/faults/raw/beach.webm", "reset", times=2, method="GET")
        proxy.add("/faults/raw/photo.jpg", "delay", times=2, delay_s=1.0)
        denied = proxy.add("/faults/raw/logo.png", "403", times=None)
        down = proxy.add("/faults/raw/palette.gif", "503", times=None, method="GET")  # never recovers
        writes = proxy.add("/faults/out/_staging/", "503", times=2, method="PUT")  # Ray Data's writes
        commit = proxy.add("/faults/out/part-", "reset", times=1, method="PUT")  # the commit's copies
        cfg = RunConfig(manifest=f"s3://{bucket}/m.jsonl", output=f"s3://{bucket}/out", model=str(tiny_model),
                        num_frames=2, storage=StorageConfig(endpoint_url=proxy.url))
        cfg.generation.max_new_tokens = 2
        started = time.monotonic()
        summary = run(cfg)
        wall = time.monotonic() - started

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    table = pads.dataset(f"{bucket}/out", format="parquet", filesystem=s3).to_table().to_pylist()
    got = {r["id"]: (r["status"], r["error_type"]) for r in table}
    assert len(table) == len(got) == len(rows) == summary.rows  # every row once
    assert got == {"street": ("ok", None), "beach": ("ok", None), "photo": ("ok", None), "long_gop": ("ok", None),
                   "logo": ("error", "access_denied"), "gone": ("error", "not_found"),
                   "palette": ("error", "fetch_failed")}
    assert slow.hits == 4 and writes.hits > 2 and commit.hits > 1  # the faults happened, and were retried
    assert denied.hits <= 2  # a permanent error is not retried over and over
    # a store that stays down costs bounded retries (botocore's max_attempts per read), never a hang: the
    # request count bounds it on any machine, where a wall-time bound fails on a loaded one (197 s seen)
    assert down.hits <= 10, (down.hits, wall)
    errors = {r["id"]: r["error"] for r in table if r["status"] == "error"}
    assert "--retry-errors" in errors["palette"] and "credentials" in errors["logo"]
