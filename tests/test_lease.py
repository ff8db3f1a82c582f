"""One writer per output (pipeline/output/lease.py): on local disk and on S3 (moto server, which honours
If-None-Match: * like S3)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.batch.run import RunError, run
from pipeline.config import RunConfig, StorageConfig
from pipeline.io.storage import filesystem, join
from pipeline.output import lease
from pipeline.output.location import OutputLocation, output_overlaps_manifest

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("body", [b"", b'{"run_id": "x", "tok', b"{}", b"[1, 2]", b"null",
                                  b'{"run_id": "x", "host": "h", "pid": 1, "token": "t", "expires": "soon", "expires_utc": "x"}',
                                  b'{"run_id": "x", "host": "h", "pid": "one", "token": "t", "expires": 1e12, "expires_utc": "x"}'])
def test_a_lease_file_that_is_no_lease_holds_nothing_and_is_taken_over(tmp_path, body, caplog):
    """A corrupt file under _lease/ (cut short, empty, missing keys, wrong types) used to crash every
    later run on the output with JSONDecodeError/KeyError/TypeError."""
    folder = tmp_path / "out" / "_lease"
    folder.mkdir(parents=True)
    (folder / "00000000.json").write_bytes(body)
    with lease.held(OutputLocation.of(str(tmp_path / "out"), StorageConfig()), "after-corruption", ttl_s=30) as held:
        assert held.generation == 1
        held.check()
    assert not (folder / "00000000.json").exists()  # an older generation: removed once taken over
    assert "is not a lease" in caplog.text


def _holder_in_a_child(out: str, ttl_s: float, then: str) -> subprocess.Popen:
    """A process on this host that takes the lease, says so, and then sleeps (`then`)."""
    code = ("import sys, time; from pipeline.config import StorageConfig; from pipeline.output.lease import Lease; "
            "from pipeline.output.location import OutputLocation; "
            f"l = Lease(OutputLocation.of({out!r}, StorageConfig()), 'crashed-run', ttl_s={ttl_s}); l.acquire(); "
            f"print('held', flush=True); {then}")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_crashed_runs_lease_on_this_host_is_taken_over_at_once(tmp_path):
    """SIGKILL a run and rerun at once on the same machine: its lease names a pid that is gone, so
    the rerun does not wait out the TTL (it used to exit 2 for up to --lease-ttl-s)."""
    out = str(tmp_path / "out")
    child = _holder_in_a_child(out, 600, "time.sleep(600)")
    with pytest.raises(lease.LeaseHeld, match="crashed-run"):  # alive: held
        lease.Lease(OutputLocation.of(out, StorageConfig()), "too-early", ttl_s=30).acquire()
    child.send_signal(signal.SIGKILL)
    child.wait()
    rerun = lease.Lease(OutputLocation.of(out, StorageConfig()), "rerun", ttl_s=30)
    rerun.acquire()  # at once, 600 s before the dead holder's lease would expire
    assert rerun.generation == 1


def test_a_lease_whose_pid_now_names_another_process_is_taken_over(tmp_path):
    """The dead holder's pid was reused by a process that started later: still dead."""
    out = tmp_path / "out"
    first = lease.Lease(OutputLocation.of(str(out), StorageConfig()), "first", ttl_s=600)
    first.acquire()
    path = out / "_lease" / "00000000.json"
    body = json.loads(path.read_text())
    assert body["pid"] == os.getpid() and body["pid_start"]
    path.write_text(json.dumps(dict(body, token="another-process", pid_start=body["pid_start"] - 1)))
    second = lease.Lease(OutputLocation.of(str(out), StorageConfig()), "second", ttl_s=30)
    second.acquire()
    assert second.generation == 1
    with pytest.raises(lease.LeaseLost):
        first.check()


@pytest.mark.parametrize("change", [{"host": "another-host"}, {"boot_id": "another-boot"}, {"pid_ns": 1},
                                    {"boot_id": None}])
def test_a_lease_of_another_host_or_namespace_waits_for_expiry_even_if_the_pid_is_gone_here(tmp_path, change):
    out = tmp_path / "out"
    child = _holder_in_a_child(str(out), 600, "")
    child.wait()  # the holder exited without releasing: gone here
    path = out / "_lease" / "00000000.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    with pytest.raises(lease.LeaseHeld, match="crashed-run"):
        lease.Lease(OutputLocation.of(str(out), StorageConfig()), "rerun", ttl_s=30).acquire()
