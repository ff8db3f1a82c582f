"""One writer per output: a run holds the output's lease from before its recovery to its commit.

    OUTPUT/_lease/GENERATION.json    {run_id, host, pid, token, expires, ...} of the holder

The holder is the highest generation. A run takes the lease by creating the next generation's
file exclusively (S3: a PUT with `If-None-Match: *`, refused when the key exists; local and NFS:
the file is written under a temporary name, then hard-linked to its final name, which fails when
that name exists), so of two runs that try at once exactly one wins. Generation 0 is taken when
there is none; generation N+1 only when N has expired (its holder died: it stopped renewing).
The holder renews its file every ttl/3 and checks, before it commits, that it still holds the
lease (one that expired unrenewed, say while its driver was starved of CPU, is taken again by the
same exclusive create of the next generation, unless another run took it first); it deletes its
file at the end. Expiry times come from the holder's clock: the hosts that
run jobs on one output need clocks that agree to well within the TTL (NTP does).

A holder that provably died is not waited for: when the lease names this host (same hostname, boot
and PID namespace) and its pid is gone, or is now another process (one that started at another
time), it is taken over at once, so a crashed run's rerun on the same machine starts at once. Other
hosts' leases wait for expiry. A lease file that is not a lease (cut short, empty, missing keys,
wrong types: written by something else) holds nothing and is taken over, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pydantic import BaseModel, ValidationError

from pipeline.io.storage import create_whole, join, put_whole
from pipeline.output.location import OutputLocation

log = logging.getLogger("pipeline")
FOLDER = "_lease"


class LeaseError(Exception):
    """The run may not write to the output now; the message says why."""


class LeaseHeld(LeaseError):
    """Another live run holds the output's lease; the message names it and when it expires."""


class LeaseLost(LeaseError):
    """This run's lease expired or was taken over: it must not commit."""


class Holder(BaseModel):
    """What a lease file says of its holder (pydantic: a file that says something else is no lease)."""

    run_id: str
    host: str
    pid: int
    token: str
    expires: float
    expires_utc: str
    boot_id: str | None = None  # written since holders on this host can be proven dead
    pid_ns: int | None = None
    pid_start: int | None = None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_ns() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot: /proc/PID/stat field 22), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def provably_dead(holder: Holder) -> bool:
    """The holder ran on this host, in this boot and PID namespace, and its process is gone or is
    another process now (pid reused). False whenever that cannot be known (another host, no /proc)."""
    if (holder.host != socket.gethostname() or holder.boot_id is None or holder.boot_id != _boot_id()
            or holder.pid_ns is None or holder.pid_ns != _pid_ns()):
        return False
    return _start_time(holder.pid) != holder.pid_start


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Lease:
    out: OutputLocation
    run_id: str
    ttl_s: float
    generation: int = -1
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    expires: float = 0.0

    @property
    def output(self) -> str:
        return self.out.uri

    @property
    def _fs(self):
        return self.out.fs, self.out.child(FOLDER)

    def _path(self, generation: int) -> str:
        return join(self._fs[1], f"{generation:08d}.json")

    def _body(self) -> bytes:
        self.expires = time.time() + self.ttl_s
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token, "generation": self.generation, "ttl_s": self.ttl_s,
                           "expires": self.expires, "expires_utc": _when(self.expires), "boot_id": _boot_id(),
                           "pid_ns": _pid_ns(), "pid_start": _start_time(os.getpid())}).encode()

    def _generations(self) -> list[int]:
        fs, folder = self._fs
        fs.invalidate_cache()
        if not fs.exists(folder):
            return []
        names = (p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, generation: int) -> Holder | None | bool:
        """The holder of a generation; None when its file is gone; False when the file is no lease."""
        fs, _ = self._fs
        try:
            return Holder.model_validate_json(fs.cat_file(self._path(generation)))
        except FileNotFoundError:
            return None
        except ValidationError as e:
            log.warning("lease file %s is not a lease (%s); it holds nothing", self._path(generation),
                        e.errors()[0]["msg"] if e.errors() else e)
            return False

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the live holder (LeaseError if the store refuses)."""
        try:
            self._acquire()
        except OSError as e:
            raise LeaseError(f"cannot take the lease on {self.output} ({type(e).__name__}: {e}): check the output "
                             "path, the credentials and write access") from e

    def _acquire(self) -> None:
        fs, folder = self._fs
        fs.makedirs(folder, exist_ok=True)
        for _ in range(5):  # the holder may release or a contender win between list and create
            generations = self._generations()
            top = generations[-1] if generations else None
            holder = self._read(top) if top is not None else None
            if top is not None and holder is None:
                continue  # released meanwhile
            if holder and holder.token == self.token:
                break  # ours: a create retried after its response was lost found its own file
            if holder and holder.expires > time.time() and not provably_dead(holder):
                raise LeaseHeld(
                    f"output {self.output} is being written by run {holder.run_id} on host {holder.host} "
                    f"(pid {holder.pid}); its lease expires at {holder.expires_utc} unless renewed. "
                    "Only one run may write to an output: wait for that run to finish, or if it died, "
                    "rerun after its lease has expired")
            self.generation = 0 if top is None else top + 1
            try:
                create_whole(fs, self._path(self.generation), self._body())
            except FileExistsError:
                continue  # another run took this generation first: look at it again
            if holder:
                how = "expired" if holder.expires <= time.time() else "dead (its process is gone)"
                log.info("took over the %s lease of run %s (host %s, pid %d) on %s", how, holder.run_id,
                         holder.host, holder.pid, self.output)
            break
        else:
            raise LeaseHeld(f"could not take the lease on {self.output}: other runs keep taking it; retry later")
        for old in (g for g in generations if g < self.generation):  # expired generations: nobody holds them
            with contextlib.suppress(FileNotFoundError):
                fs.rm(self._path(old))
        log.info("holding the lease on %s until %s (renewed every %.0f s)", self.output, _when(self.expires),
                 self.ttl_s / 3)

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (before anything irreversible)."""
        mine = self._read(self.generation)
        newer = [g for g in self._generations() if g > self.generation]
        if not mine or mine.token != self.token or newer:
            raise LeaseLost(f"run {self.run_id} lost its lease on {self.output} to another run")
        if time.time() >= self.expires:
            self._retake()

    def _retake(self) -> None:
        """Expired without renewal (a stalled driver, an unreachable store): take the next generation
        exclusively, as any other run would. If another run took it first, the lease is lost."""
        fs, _ = self._fs
        expired, self.generation = self.generation, self.generation + 1
        try:
            create_whole(fs, self._path(self.generation), self._body())
        except FileExistsError:
            raise LeaseLost(f"run {self.run_id}'s lease on {self.output} expired without being renewed and "
                            "another run took it over") from None
        with contextlib.suppress(FileNotFoundError):
            fs.rm(self._path(expired))
        log.warning("the lease on %s expired without being renewed; no other run took it: taken again", self.output)

    def renew(self) -> None:
        self.check()
        fs, _ = self._fs
        put_whole(fs, self._path(self.generation), self._body())

    def release(self) -> None:
        with contextlib.suppress(LeaseLost, FileNotFoundError):
            self.check()
            self._fs[0].rm(self._path(self.generation))
            log.info("released the lease on %s", self.output)


@contextlib.contextmanager
def held(out: OutputLocation, run_id: str, ttl_s: float):
    """Hold the output's lease for the block, renewed in the background; released at the end.
    Raises LeaseHeld at once when another live run holds it."""
    lease = Lease(out, run_id, ttl_s)
    lease.acquire()
    stop = threading.Event()

    def renew_until_stopped() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lease.renew()
            except LeaseLost as e:
                log.error("%s; this run will not commit", e)
                return
            except Exception as e:  # noqa: BLE001 - a storage error: retried at the next tick, checked at commit
                log.warning("could not renew the lease on %s (%s: %s); retrying", out.uri, type(e).__name__, e)

    renewer = threading.Thread(target=renew_until_stopped, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        lease.release()
