"""End to end through an S3-compatible server (moto in server mode): manifest, media and model in a
bucket, output written to a bucket and read back with pyarrow's own S3 client."""

import json

import pyarrow.dataset as pads
from pyarrow import fs as pafs
from test_job import run_job


def upload_dir(s3_client, local, bucket, prefix):
    for path in sorted(local.iterdir()):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_manifest_media_model_and_output_in_s3(ray_local, s3_endpoint, s3_client, samples, tiny_model):
    bucket = "media"
    s3_client.create_bucket(Bucket=bucket)
    upload_dir(s3_client, samples, bucket, "raw")
    upload_dir(s3_client, tiny_model, bucket, "models/tiny")
    rows = [json.loads(line) for line in (samples / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row["uri"] = f"s3://{bucket}/raw/{row['uri'].rsplit('/', 1)[-1]}"
    # A prefix holding two manifest files of different formats.
    s3_client.put_object(Bucket=bucket, Key="manifests/dt=2026-11-20/part-0.jsonl",
                         Body="".join(json.dumps(r) + "\n" for r in rows[:4]).encode())
    csv_rows = "id,uri\n" + "".join(f"{r['id']},{r['uri']}\n" for r in rows[4:])
    s3_client.put_object(Bucket=bucket, Key="manifests/dt=2026-11-21/part-0.csv", Body=csv_rows.encode())

    code = run_job("--manifest", f"s3://{bucket}/manifests/", "--output", f"s3://{bucket}/captions",
                   "--model", f"s3://{bucket}/models/tiny", "--s3-endpoint-url", s3_endpoint,
                   "--max-new-tokens", 4, "--num-frames", 3)
    assert code == 0

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    table = pads.dataset(f"{bucket}/captions", format="parquet", filesystem=s3).to_table()
    got = {r["id"]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(r["id"] for r in rows)
    assert got["missing"]["error_type"] == "not_found"
    assert all(r["status"] == "ok" for k, r in got.items() if k != "missing")
    assert got["street"]["uri"] == f"s3://{bucket}/raw/street.mp4" and got["street"]["num_frames"] == 3
    assert got["logo"]["source"].startswith(f"s3://{bucket}/manifests/dt=2026-11-21/part-0.csv:line")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="captions/")["Contents"]]
    assert "captions/_SUCCESS" in keys and not any("_staging" in k for k in keys)
