r"""Run the reliability fault scenarios against a real local Ray head and print a table.

    python jobs/fault_scenarios.py                   # every scenario (about 12-15 minutes on 2 cores)
    python jobs/fault_scenarios.py --only driver_sigkill actor_sigkill --json faults.json

Each scenario runs the real job (`python jobs/caption_videos.py`, random-weight tiny checkpoint,
generated sample media) as a driver process, injects its fault, reruns the same command until the
run completes, and checks the committed output against the manifest:

    faults          driver kills (the head's loss included) and actor kills that happened
    rows expected   (id, prompt) pairs the manifest asks for
    rows lost       expected pairs missing from the output
    duplicates      output rows beyond one per (id, prompt)
    recomputed      rows generated more than once (the model actors' traces, or rows staged by killed runs,
                    thrown away and computed again, whichever is more) / rows expected
    parent crashes  driver runs that failed by themselves, and workers Ray reports dead that the scenario did not kill
    refused         runs that found the output's lease held by another live run and stopped at once
    by itself       whether the run that met the fault completed without a rerun
                    (Ray Data retrying the lost work), or needed the rerun

Node-loss scenarios run on their own local multi-node cluster: a head with no CPUs and worker nodes
started with `ray start --address` as separate process groups, each with its own CPUs; the model
actor asks for a custom resource (`--model-resource model_node=1`) that only some nodes have. A lost
node is SIGKILLed as a whole (raylet and workers) and a replacement joins, as a cloud autoscaler's would.

Exit code 0 when no scenario lost or duplicated a row and nothing crashed unexpectedly.
Needs the test extra (psutil, moto): pip install -e ".[faults]".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MEDIA = ["street.mp4", "beach.webm", "photo.jpg", "logo.png", "palette.gif", "long_gop.mp4"]
ACTORS = ("Preprocess", "Generate")  # the job's actor classes (Ray titles them ray::MapWorker(...))
WORKER_DIED = b"A worker died or was killed while executing a task"  # the raylet's message in the driver log
REFUSED = b"is being written by run"  # the job's message when another live run holds the output's lease
LEASE_TTL_S = 6  # short, so a rerun after a killed driver waits little for its lease to expire
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    scenario: str
    faults_injected: int
    rows_expected: int
    rows_lost: int
    duplicates: int
    recomputed_fraction: float
    parent_crashes: int
    driver_runs: int
    wall_s: float
    refused_runs: int = 0
    finished_by_itself: bool | None = None  # None: no fault met a running driver

    @property
    def passed(self) -> bool:
        return self.rows_lost == 0 and self.duplicates == 0 and self.parent_crashes == 0


class RayHead:
    """`ray start --head --block` in its own session, with its own ports (other Ray instances may run)."""

    def __init__(self, num_cpus: int = 4, env: dict | None = None):
        self.num_cpus = num_cpus
        self.proc = None
        self.nodes: list[WorkerNode] = []
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token",
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", HF_HUB_OFFLINE="1",
                        RAY_DATA_DISABLE_PROGRESS_BARS="1", **S3_CREDENTIALS, **(env or {}))  # workers take the head's env

    def start(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths must fit 107 bytes
        gcs = free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={self.num_cpus}",
             "--include-dashboard=false", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        deadline = time.time() + 180
        while time.time() < deadline:  # ready when a driver can connect
            probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"],
                                   env=self.env, capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError("the Ray head did not start in 180 s")

    def sessions(self) -> set[int]:
        """The process sessions of this cluster's nodes (each node runs in its own)."""
        return {p.pid for p in [self.proc, *(n.proc for n in self.nodes)] if p is not None}

    def alive_ports(self) -> set[int]:
        """The node-manager ports of the cluster's live nodes (a killed node stays listed as alive
        until the head misses its heartbeats, so nodes are told apart by port, not counted)."""
        probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); "
                                "print(*[n['NodeManagerPort'] for n in ray.nodes() if n['Alive']])"],
                               env=self.env, capture_output=True, text=True)
        return {int(p) for p in probe.stdout.split()[-8:] if p.isdigit()} if probe.returncode == 0 else set()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nodes = []
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole head at once, as a lost node would
            self.proc.wait()
            self.proc = None
            subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class WorkerNode:
    """`ray start --address HEAD --block` in its own session: a worker node with its own CPUs and
    custom resources, on its own ports."""

    def __init__(self, head: RayHead, num_cpus: int, resources: dict | None = None):
        self.head, self.num_cpus, self.resources, self.proc = head, num_cpus, resources or {}, None

    def start(self) -> "WorkerNode":
        port = free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--address={self.head.env['RAY_ADDRESS']}",
             f"--num-cpus={self.num_cpus}", f"--resources={json.dumps(self.resources)}", "--disable-usage-stats",
             f"--node-manager-port={port}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
            env=self.head.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.head.nodes.append(self)
        deadline = time.time() + 180
        while port not in self.head.alive_ports():
            if time.time() > deadline:
                raise RuntimeError("a worker node did not join in 180 s")
            time.sleep(1)
        return self

    def kill(self) -> None:
        """SIGKILL the whole node at once: its raylet, object store and workers (a lost spot node)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


class Workspace:
    """Sample media, the tiny checkpoint and a manifest of `items` rows, in a temporary folder."""

    def __init__(self, root: Path, items: int):
        self.root = root
        samples, self.model = root / "samples", root / "tiny-model"
        subprocess.run([sys.executable, "-m", "pipeline.testing.samples", str(samples)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "pipeline.testing.tiny_model", str(self.model)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.media = samples
        self.manifest = samples / "scenario.jsonl"
        rows = [{"id": f"item-{i:03d}", "uri": MEDIA[i % len(MEDIA)]} for i in range(items)]
        self.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.expected = {r["id"] for r in rows}  # one caption row per item
        self.trace = root / "trace"  # one line per generate call, from every model actor of every run
        self.trace.mkdir(parents=True, exist_ok=True)

    def command(self, output: str, *extra: str) -> list[str]:
        return [sys.executable, str(REPO / "jobs" / "caption_videos.py"), "--manifest", str(self.manifest),
                "--output", output, "--model", str(self.model), "--num-frames", "2", "--max-new-tokens", "4",
                "--batch-size", "2", "--lease-ttl-s", str(LEASE_TTL_S), "--trace-dir", str(self.trace), *extra]

    def generated_rows(self) -> int:
        return sum(json.loads(line)["rows"] for f in self.trace.glob("*.jsonl") for line in f.read_text().splitlines())


def actor_pids(head: "RayHead", node: "WorkerNode | None" = None) -> dict[int, str]:
    """The job's live actor processes on this cluster, or on one node of it (pid -> class), found by
    the titles Ray gives them. Only processes in the cluster's sessions count: other Ray instances
    may run on the machine."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::MapWorker(") and any(a in title for a in ACTORS):
            try:
                if os.getsid(p.info["pid"]) in ({node.proc.pid} if node else head.sessions()):
                    found[p.info["pid"]] = next(a for a in ACTORS if a in title)
            except (ProcessLookupError, AttributeError):
                pass
    return found


class Run:
    """One scenario's state: its workspace, output, log, and every driver run so far."""

    def __init__(self, name: str, ws: Workspace, head: RayHead, work: Path):
        self.name, self.ws, self.head = name, ws, head
        self.output = str(work / name / "out")
        self.log = work / name / "driver.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.exits: list[int | None] = []  # None: killed by the scenario
        self.worker_deaths = 0  # workers Ray saw die in runs that were not killed
        self.discarded = 0  # rows staged by killed runs
        self.killed_actors = 0
        self.refused = 0  # runs that found the lease held and stopped at once
        self.by_itself: bool | None = None

    def drive(self, cmd: list[str] | None = None, env: dict | None = None, kill_when=None, on_tick=None,
              timeout_s: float = 600) -> int | None:
        """Run the job once; SIGKILL it when `kill_when()` turns true. Exit code, or None if killed."""
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(cmd or self.ws.command(self.output), env=env or self.head.env, cwd=REPO,
                                    start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        seen: dict[int, str] = {}
        earlier = set(actor_pids(self.head))  # a killed run's actors may still be exiting
        started, deadline, code = time.time(), time.time() + timeout_s, "running"
        while proc.poll() is None:
            seen.update((pid, kind) for pid, kind in actor_pids(self.head).items() if pid not in earlier)
            if on_tick:
                on_tick(self, time.time() - started)
            if (kill_when and kill_when(seen)) or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
                break
            time.sleep(0.2)
        code = proc.returncode if code == "running" else None
        if code is None:  # what the killed run staged is thrown away by the next run and computed again
            self.discarded += staged_rows(Path(self.output, "_staging"))
            time.sleep(LEASE_TTL_S + 1)  # its lease stays until it expires: the rerun would be refused
        else:  # Ray reports each worker that died under a task in the driver's log
            with open(self.log, "rb") as log:
                log.seek(log_start)
                text = log.read()
            self.worker_deaths += text.count(WORKER_DIED)
            if code != 0 and REFUSED in text:
                self.refused += 1
                code = "refused"
        self.exits.append(code)
        return code

    def until_completed(self, cmd: list[str] | None = None) -> None:
        """Rerun the same command until a run exits 0 (at most 4 more runs)."""
        for _ in range(4):
            if 0 in self.exits:
                return
            self.drive(cmd)

    def result(self, started: float) -> Result:
        import pyarrow.dataset as pads

        table = pads.dataset(self.output, format="parquet").to_table(columns=["id", "prompt"]).to_pylist()
        keys = [(r["id"], r["prompt"]) for r in table]
        lost = len(self.ws.expected - {i for i, _ in keys})
        # a driver that exited non-zero by itself, or an actor that died without our kill
        crashes = sum(1 for c in self.exits if c not in (0, None, "refused")) \
            + max(0, self.worker_deaths - self.killed_actors)
        n = len(self.ws.expected)
        injected = sum(1 for c in self.exits if c is None) + self.killed_actors
        ok = sum(1 for r in pads.dataset(self.output, format="parquet").to_table(columns=["status"]).to_pylist()
                 if r["status"] == "ok")
        recomputed = max(self.discarded, self.ws.generated_rows() - ok)
        return Result(self.name, injected, n, lost, len(keys) - len(set(keys)), round(recomputed / n, 3), crashes,
                      len(self.exits), round(time.time() - started, 1), self.refused, self.by_itself)


def staged_rows(staging: Path) -> int:
    """Rows in the staged Parquet files of runs that have not committed (their footers; a file cut
    short by the kill counts as nothing)."""
    import pyarrow.parquet as pq

    rows = 0
    for part in staging.glob("*/*.parquet"):
        try:
            rows += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # noqa: BLE001 - a partial file
            pass
    return rows


def after_start(delay_s: float):
    """A kill condition: true `delay_s` after the job's actors first appear."""
    first = {}

    def kill_when(seen) -> bool:
        if seen:
            first.setdefault("t", time.time())
        return "t" in first and time.time() - first["t"] > delay_s

    return kill_when


# --- the faults: each drives the job, injecting its fault; the scenario then reruns to completion ---


def driver_sigkill(kills: int, seed: int):
    """SIGKILL the driver `kills` times at random points of its progress (after 0 to all but one of
    its staged files are written), rerunning each time; the last rerun completes."""
    rng = random.Random(seed)

    def inject(run: Run):
        staging = Path(run.output, "_staging")
        for _ in range(kills):
            # the job writes one staged file per model batch (--batch-size 2): kill before the last one
            at = rng.randint(0, len(run.ws.expected) // 2 - 1)

            def kill_when(seen, at=at) -> bool:
                return bool(seen) and len(list(staging.glob("*/*.parquet"))) >= at

            if run.drive(kill_when=kill_when) == 0:
                return  # it finished before the kill point (fewer rows left than `at`)

    return inject


def driver_sigkill_in_commit(run: Run):
    """Output on S3, whose commit moves are copies then deletes, slowed by the proxy; SIGKILL the
    driver once its commit marker is written, while the moves are under way; rerun."""
    with s3_store(run) as (s3, proxy, cmd, bucket):
        slow = proxy.add(f"/{bucket}/out/part-", "delay", times=None, delay_s=0.5, method="PUT")

        def in_commit(seen) -> bool:
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
            return any(k.endswith("/_COMPLETE.json") for k in keys) and any("/part-" in k for k in keys)

        run.drive(cmd, kill_when=in_commit)
        proxy.rules.remove(slow)
        run.until_completed(cmd)


def actor_sigkill(run: Run):
    """SIGKILL one Generate and one Preprocess actor mid-run: the same run must still complete."""
    killed: set[str] = set()

    def on_tick(run: Run, elapsed: float):
        for pid, kind in actor_pids(run.head).items():
            if kind not in killed and elapsed > 4:
                os.kill(pid, signal.SIGKILL)
                killed.add(kind)
                run.killed_actors += 1

    run.drive(on_tick=on_tick)
    if len(killed) < 2:
        print(f"  actor_sigkill: the run ended before both actors were killed (killed: {sorted(killed)})")


def head_restart(run: Run):
    """Stop the whole Ray head mid-run (the driver loses its cluster), start a new one, rerun."""
    stopped, after_head_start = [], after_start(4.0)

    def kill_when(seen) -> bool:
        if not stopped and after_head_start(seen):
            run.head.stop()
            stopped.append(time.time())
        # a driver whose cluster is gone should exit; give it 60 s before killing it
        return bool(stopped) and time.time() - stopped[0] > 60

    code = run.drive(kill_when=kill_when)
    if stopped:
        run.exits[-1] = None  # its failure was the injected fault
        run.head.start()
    elif code != 0:
        raise RuntimeError("head_restart: the run failed before the head was stopped")


def bad_media(run: Run):
    """A file that segfaults the decoder and one that hangs it (the isolated decoder must contain both).
    On a head of its own whose workers run the fault-injecting decoder (a test-only environment variable)."""
    ws = run.ws
    for name in ("segfault.mp4", "hang.mp4"):
        shutil.copy(ws.media / "street.mp4", ws.media / name)
    with open(ws.manifest, "a") as f:
        f.write(json.dumps({"id": "segfault", "uri": "segfault.mp4"}) + "\n")
        f.write(json.dumps({"id": "hang", "uri": "hang.mp4"}) + "\n")
    ws.expected |= {"segfault", "hang"}
    with own_head(run, RayHead(env={"PIPELINE_TEST_DECODER_MODULE": "tests.helpers.fault_decoder"})):
        cmd = ws.command(run.output, "--decode-timeout-s", "5")
        run.drive(cmd)
        run.until_completed(cmd)
    rows = pads_rows(run.output)
    assert rows.get("segfault") == "decoder_crashed" and rows.get("hang") == "timeout", rows


def pads_rows(output: str) -> dict:
    import pyarrow.dataset as pads

    return {r["id"]: r["error_type"] for r in pads.dataset(output, format="parquet").to_table().to_pylist()}


@contextlib.contextmanager
def s3_store(run: Run):
    """The scenario's manifest and media in a moto S3 server behind a fault proxy: yields (boto3
    client, proxy, job command on S3, bucket), then copies the output to run.output to be checked."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from tests.helpers.s3_fault_proxy import FaultProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    os.environ.update(S3_CREDENTIALS)
    bucket = run.name.replace("_", "-")  # moto's backend is shared by every server in this process
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket=bucket)
        for name in MEDIA:
            s3.upload_file(str(run.ws.media / name), bucket, name)  # beside the manifest, as it names them
        s3.put_object(Bucket=bucket, Key="m.jsonl", Body=run.ws.manifest.read_bytes())
        with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
            cmd = run.ws.command(f"s3://{bucket}/out", "--s3-endpoint-url", proxy.url)
            cmd[cmd.index("--manifest") + 1] = f"s3://{bucket}/m.jsonl"
            yield s3, proxy, cmd, bucket
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", []):
            target = Path(run.output, obj["Key"].removeprefix("out/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
    finally:
        server.stop()


def s3_faults(run: Run):
    """Manifest, media and output on S3 behind a proxy that throttles, resets and delays: one run."""
    with s3_store(run) as (_, proxy, cmd, bucket):
        for name in MEDIA:
            proxy.add(f"/{bucket}/{name}", "503", times=2, method="GET")
        proxy.add(f"/{bucket}/", "reset", times=3, method="GET")
        proxy.add(f"/{bucket}/out/", "503", times=3, method="PUT")
        proxy.add(f"/{bucket}/", "delay", times=20, delay_s=0.3)
        run.drive(cmd)
        run.until_completed(cmd)


def overlapping_runs(run: Run):
    """Two drivers started at once on one output, and a third once the first one's actors are up
    (a manual rerun during the nightly job): one completes, the others stop at once."""
    cmd, procs = run.ws.command(run.output), []

    def start(tag: str):
        log = open(run.log.with_name(f"driver-{tag}.log"), "wb")
        procs.append((subprocess.Popen(cmd, env=run.head.env, cwd=REPO, start_new_session=True, stdout=log,
                                       stderr=subprocess.STDOUT), log))

    start("a")
    start("b")
    deadline = time.time() + 300
    while not actor_pids(run.head) and time.time() < deadline and any(p.poll() is None for p, _ in procs):
        time.sleep(0.2)
    start("c")  # mid-run
    for proc, log in procs:
        code = proc.wait(timeout=600)
        log.close()
        refused = code != 0 and REFUSED in Path(log.name).read_bytes()
        run.refused += refused
        run.exits.append("refused" if refused else code)


@contextlib.contextmanager
def own_head(run: Run, head: RayHead):
    """The run drives on this cluster of its own, started here and stopped after."""
    saved = run.head
    try:
        head.start()
        run.head = head
        yield head
    finally:
        run.head = saved
        head.stop()


@contextlib.contextmanager
def multi_node_cluster(run: Run, model_cpus: int = 1, cpu_cpus: int = 3):
    """A head with no CPUs, a model node (its CPUs and the `model_node` resource the model actor asks
    for) and a CPU node, each its own `ray start` process group. The run drives on this cluster."""
    with own_head(run, RayHead(num_cpus=0)) as head:
        model = WorkerNode(head, model_cpus, {"model_node": 1}).start()
        cpu = WorkerNode(head, cpu_cpus).start()
        yield head, model, cpu


def node_lost(which: str):
    """SIGKILL a whole worker node mid-run, once the model has answered a batch: the node holding the
    model actor (`model`), or the one holding only CPU stages (`cpu`); a replacement node with the
    same resources joins 2 s later. Rerun if the run that lost the node did not complete by itself."""

    def inject(run: Run):
        with multi_node_cluster(run) as (head, model_node, cpu_node):
            cmd = run.ws.command(run.output, "--model-resource", "model_node=1")
            victim, state = (model_node if which == "model" else cpu_node), {}

            def on_tick(run: Run, elapsed: float):
                if "killed" not in state:
                    on_victim = actor_pids(head, victim)
                    wanted = "Generate" in on_victim.values() if which == "model" else bool(on_victim)
                    if wanted and run.ws.generated_rows() >= 2:
                        run.killed_actors += len(on_victim)
                        victim.kill()
                        head.nodes.remove(victim)
                        state["killed"] = time.time()
                elif "replaced" not in state and time.time() - state["killed"] > 2:
                    state["replaced"] = True
                    WorkerNode(head, victim.num_cpus, victim.resources).start()

            code = run.drive(cmd, on_tick=on_tick, timeout_s=420)
            if "killed" not in state:
                print(f"  node_lost_{which}: the run ended before the node was killed")
            else:
                run.by_itself = code == 0
                if code != 0 and run.exits[-1] is not None:
                    run.exits[-1] = None  # its failure was the injected fault
            run.until_completed(cmd)

    return inject


S3_SCENARIOS = ("driver_sigkill_in_commit", "s3_faults")
NODE_SCENARIOS = ("node_lost_model", "node_lost_cpu")
OWN_STORE_OR_CLUSTER = (*S3_SCENARIOS, *NODE_SCENARIOS, "bad_media")  # they rerun inside, while it is up
SCENARIOS = ["driver_sigkill", "driver_sigkill_in_commit", "actor_sigkill", "head_restart", "bad_media", "s3_faults",
             "overlapping_runs", *NODE_SCENARIOS]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=24, help="Manifest rows per scenario.")
    p.add_argument("--kills", type=int, default=3, help="Driver kills in the driver_sigkill scenario.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random kill points.")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=SCENARIOS, help="Scenarios to run.")
    p.add_argument("--json", help="Also write the table as JSON to this file.")
    a = p.parse_args(argv)
    faults = {"driver_sigkill": driver_sigkill(a.kills, a.seed), "driver_sigkill_in_commit": driver_sigkill_in_commit,
              "actor_sigkill": actor_sigkill, "head_restart": head_restart, "bad_media": bad_media,
              "s3_faults": s3_faults, "overlapping_runs": overlapping_runs,
              "node_lost_model": node_lost("model"), "node_lost_cpu": node_lost("cpu")}
    work = Path(tempfile.mkdtemp(prefix="fault-scenarios-"))
    head = RayHead()
    results = []
    try:
        head.start()
        for name in a.only:
            print(f"scenario {name} ...", flush=True)
            started = time.time()
            run = Run(name, Workspace(work / f"{name}-data", a.items), head, work)
            faults[name](run)
            if name not in OWN_STORE_OR_CLUSTER:
                run.until_completed()
            results.append(run.result(started))
    finally:
        head.stop()
    header = f"{'scenario':<26}{'faults':>7}{'rows expected':>14}{'rows lost':>10}{'duplicates':>11}{'recomputed':>11}" \
             f"{'parent crashes':>15}{'driver runs':>12}{'refused':>8}{'by itself':>10}{'wall s':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        by_itself = {True: "yes", False: "rerun", None: "-"}[r.finished_by_itself]
        print(f"{r.scenario:<26}{r.faults_injected:>7}{r.rows_expected:>14}{r.rows_lost:>10}{r.duplicates:>11}{r.recomputed_fraction:>11.3f}"
              f"{r.parent_crashes:>15}{r.driver_runs:>12}{r.refused_runs:>8}{by_itself:>10}{r.wall_s:>8.1f}")
    print(f"\nlogs: {work}")
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
