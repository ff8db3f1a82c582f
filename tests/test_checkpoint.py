"""An s3:// model is copied to a node's local disk once, not once per actor: several processes
asking for it at the same moment share one download (counted at the S3 server)."""

import logging
import os
import subprocess
import sys
import textwrap

from test_s3 import upload_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTORS = 4


def test_s3_model_is_copied_once_per_node_under_concurrency(s3_endpoint, s3_client, tiny_model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs each request it answers
    s3_client.create_bucket(Bucket="models-once")
    upload_dir(s3_client, tiny_model, "models-once", "llava/tiny")
    uri = "s3://models-once/llava/tiny"
    # Each process stands for one actor of the node: it waits until all are up, then asks at once.
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pipeline.checkpoint import local_checkpoint
        from pipeline.config import StorageConfig
        ready = Path(sys.argv[1])
        (ready / sys.argv[2]).touch()
        while len(list(ready.iterdir())) < {ACTORS}:
            time.sleep(0.01)
        print(local_checkpoint("{uri}", StorageConfig(endpoint_url="{s3_endpoint}")))
    """)
    (tmp_path / "ready").mkdir()
    env = dict(os.environ, PIPELINE_MODEL_CACHE=str(tmp_path / "node-cache"), PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "ready"), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(ACTORS)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    local = paths.pop()
    assert local.startswith(str(tmp_path / "node-cache"))
    assert sorted(os.listdir(local)) == sorted(p.name for p in tiny_model.iterdir() if p.is_file())
    assert [p for p in os.listdir(tmp_path / "node-cache") if ".partial" in p] == []
    weights_gets = [r.getMessage() for r in caplog.records
                    if "GET /models-once/llava/tiny/model.safetensors" in r.getMessage()]
    assert len(weights_gets) == 1, weights_gets
