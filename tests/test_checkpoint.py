"""An s3:// model is copied to a node's local disk once, not once per actor: several processes
asking for it at the same moment share one download (counted at the S3 server). CPU stages copy
no weights; a re-uploaded object is copied again."""

import logging
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

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
        from pipeline.model.checkpoint import local_checkpoint
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


def gets_per_object(caplog, bucket: str) -> Counter:
    """GET requests moto's server answered, per object key (listings and HEADs are not counted)."""
    found = Counter()
    for r in caplog.records:
        m = re.search(rf'"GET /{bucket}/(\S+?)(?:\?\S*)? HTTP', r.getMessage())
        if m:
            found[m.group(1)] += 1
    return found


def test_processor_copy_leaves_the_weights_and_a_changed_object_is_fetched_again(
        s3_endpoint, s3_client, tiny_model, tmp_path, monkeypatch, caplog):
    """CPU stages copy what a processor and tokenizer need, model actors copy the weights too, and
    a file re-uploaded under the same prefix is fetched again (the cache is keyed by its ETag)."""
    from pipeline.config import StorageConfig
    from pipeline.model import checkpoint

    caplog.set_level(logging.INFO, logger="werkzeug")
    monkeypatch.setattr(checkpoint, "CACHE_DIR", tmp_path / "node-cache")
    s3_client.create_bucket(Bucket="models-kinds")
    upload_dir(s3_client, tiny_model, "models-kinds", "llava/tiny")
    uri, storage = "s3://models-kinds/llava/tiny", StorageConfig(endpoint_url=s3_endpoint)
    files = sorted(p.name for p in tiny_model.iterdir() if p.is_file())
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights and "tokenizer_config.json" in files

    processor = checkpoint.local_checkpoint(uri, storage, weights=False)
    assert sorted(os.listdir(processor)) == [f for f in files if f not in weights]
    assert all(gets_per_object(caplog, "models-kinds")[f"llava/tiny/{w}"] == 0 for w in weights)
    from pipeline.model.preprocess import Preprocessor

    Preprocessor(processor)  # the processor and tokenizer load from the copy without weights

    full = checkpoint.local_checkpoint(uri, storage)
    assert sorted(os.listdir(full)) == files
    assert checkpoint.local_checkpoint(uri, storage) == full  # cached: no second copy
    assert checkpoint.local_checkpoint(uri, storage, weights=False) == processor
    gets = gets_per_object(caplog, "models-kinds")
    assert {f: gets[f"llava/tiny/{f}"] for f in files} == {f: 1 if f in weights else 2 for f in files}

    # The weights are uploaded again, changed, under the same key: the model copy is made again
    # from the new object; the processor files did not change, so their copy stays.
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes((tiny_model / weights[0]).read_bytes()[:-1] + b" ")
    s3_client.upload_file(str(changed), "models-kinds", f"llava/tiny/{weights[0]}")
    refreshed = checkpoint.local_checkpoint(uri, storage)
    assert refreshed != full and not os.path.exists(full)  # the old version's copy is gone from the disk
    assert (Path(refreshed) / weights[0]).read_bytes() == changed.read_bytes()
    assert checkpoint.local_checkpoint(uri, storage, weights=False) == processor
    assert gets_per_object(caplog, "models-kinds")[f"llava/tiny/{weights[0]}"] == 2
