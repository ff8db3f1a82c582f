"""One writer per output (pipeline/output/lease.py): on local disk and on S3 (moto server, which honours
If-None-Match: * like S3)."""

import json
import socket
import threading
import time

import pytest

from pipeline.batch.run import RunError, run
from pipeline.config import RunConfig, StorageConfig
from pipeline.io.storage import filesystem, join
from pipeline.output import lease
from pipeline.output.location import OutputLocation, output_overlaps_manifest


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), StorageConfig()
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"lease-{time.time_ns()}"
    request.getfixturevalue("s3_client").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/out", StorageConfig(endpoint_url=endpoint)


def test_of_runs_that_start_at_once_exactly_one_takes_the_lease(output):
    out, storage = output
    contenders = [lease.Lease(OutputLocation.of(out, storage), f"run-{i}", ttl_s=30) for i in range(6)]
    start, outcomes = threading.Barrier(len(contenders)), {}

    def take(one):
        start.wait()
        try:
            one.acquire()
            outcomes[one.run_id] = "held"
        except lease.LeaseHeld as e:
            outcomes[one.run_id] = str(e)

    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, o in outcomes.items() if o == "held"]
    assert len(winners) == 1, outcomes
    for run_id, message in outcomes.items():
        if run_id != winners[0]:  # names the holder, its host and when its lease expires
            assert f"run {winners[0]} on host {socket.gethostname()}" in message and "expires at 20" in message


def test_an_expired_lease_is_taken_over_and_its_old_holder_may_not_commit(output):
    out, storage = output
    dead = lease.Lease(OutputLocation.of(out, storage), "dead-run", ttl_s=2)
    dead.acquire()  # never renewed: its holder died
    with pytest.raises(lease.LeaseHeld):
        lease.Lease(OutputLocation.of(out, storage), "too-early", ttl_s=2).acquire()
    time.sleep(2.2)
    successor = lease.Lease(OutputLocation.of(out, storage), "successor", ttl_s=30)
    successor.acquire()
    with pytest.raises(lease.LeaseLost):
        dead.check()
    dead.release()  # a stale holder's release leaves the new holder's lease alone
    successor.check()
    with pytest.raises(lease.LeaseHeld, match="successor"):
        lease.Lease(OutputLocation.of(out, storage), "third", ttl_s=30).acquire()


def test_a_held_lease_is_renewed_while_the_run_runs_and_released_at_its_end(output):
    out, storage = output
    with lease.held(OutputLocation.of(out, storage), "long-run", ttl_s=2) as held:
        time.sleep(3)  # longer than the TTL: only renewal keeps it
        held.check()
        with pytest.raises(lease.LeaseHeld, match="long-run"):
            lease.Lease(OutputLocation.of(out, storage), "second", ttl_s=2).acquire()
    fs, folder = filesystem(join(out, lease.FOLDER), storage)
    fs.invalidate_cache()
    assert not fs.glob(join(folder, "*"))  # released: nothing left behind
    with lease.held(OutputLocation.of(out, storage), "next-run", ttl_s=2):
        pass


def test_a_run_on_an_output_another_run_holds_stops_at_once_and_deletes_nothing(tmp_path, samples, tiny_model):
    out = tmp_path / "out"
    holder = lease.Lease(OutputLocation.of(str(out), StorageConfig()), "live-run", ttl_s=60)
    holder.acquire()
    in_flight = out / "_staging" / "live-run"
    in_flight.mkdir(parents=True)
    (in_flight / "part-0.parquet").write_bytes(b"rows being written")  # no _COMPLETE.json yet
    cfg = RunConfig(manifest=str(samples / "manifest.jsonl"), output=str(out), model=str(tiny_model))
    started = time.time()
    with pytest.raises(RunError, match="being written by run live-run on host .* expires at"):
        run(cfg)
    assert time.time() - started < 10  # refused before Ray or the model start
    assert (in_flight / "part-0.parquet").read_bytes() == b"rows being written"
    holder.check()


@pytest.mark.parametrize("inside", ["out", "_out", ".out", "day/out"])
def test_an_output_inside_the_manifest_prefix_is_refused_before_anything_runs(tmp_path, samples, tiny_model, inside):
    manifests = tmp_path / "manifests"
    (manifests / "day").mkdir(parents=True)
    (manifests / "day" / "part.jsonl").write_text((samples / "manifest.jsonl").read_text())
    cfg = RunConfig(manifest=str(manifests), output=str(manifests / inside), model=str(tiny_model))
    with pytest.raises(RunError, match="inside the manifest prefix"):
        run(cfg)
    assert not (manifests / inside).exists()
    link = tmp_path / "link-to-manifests"  # the same folder under another name
    link.symlink_to(manifests)

    def overlap(output, manifest):
        return output_overlaps_manifest(OutputLocation.of(str(output), cfg.storage), str(manifest))

    assert "inside the manifest prefix" in overlap(link / "o", manifests)
    assert "inside --output" in overlap(tmp_path / "o", tmp_path / "o" / "m.jsonl")
    assert overlap(tmp_path / "out", manifests / "day" / "part.jsonl") is None


def test_the_lease_file_says_who_holds_it(tmp_path):
    with lease.held(OutputLocation.of(str(tmp_path / "out"), StorageConfig()), "named-run", ttl_s=30) as held:
        body = json.loads((tmp_path / "out" / "_lease" / f"{held.generation:08d}.json").read_text())
    assert body["run_id"] == "named-run" and body["host"] == socket.gethostname() and body["expires"] > time.time()


def test_a_lease_that_expired_unrenewed_is_taken_again_only_if_no_other_run_took_it(output):
    out, storage = output
    stalled = lease.Lease(OutputLocation.of(out, storage), "stalled-run", ttl_s=2)
    stalled.acquire()
    time.sleep(2.2)  # its renewals did not run (a driver starved of CPU)
    stalled.check()  # nobody took it over: taken again, the run may commit
    with pytest.raises(lease.LeaseHeld, match="stalled-run"):
        lease.Lease(OutputLocation.of(out, storage), "other", ttl_s=2).acquire()
