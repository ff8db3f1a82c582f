"""The child processes the pipeline starts (the isolated decoder, the tensor-parallel ranks): how
they are spawned, how their messages are framed and read within a deadline, and how they are stopped.

A message is an 8-byte little-endian length, then a pickle; both ends are this code. The parent
side is `Child` (spawn, send, a buffered read that never blocks past a deadline, stop) and
`receive_any` (the next reply of several children under one deadline); the child side is
`channel` (stdin/stdout as the message pipe) and `exit_with_parent`.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HEADER_BYTES = 8
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds `pipeline/`
_READ_BYTES = 1 << 20


def send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(HEADER_BYTES, "little") + data)
    stream.flush()


def receive(stream):
    """The next message from a blocking stream; None when it is closed."""
    header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return None
    return pickle.loads(stream.read(body_length(header)))


def body_length(header: bytes) -> int:
    return int.from_bytes(header[:HEADER_BYTES], "little")


def child_env(extra: dict | None = None) -> dict:
    """This process's environment plus `extra`, with the repo root first on PYTHONPATH: the child
    imports this checkout's `pipeline` whatever its working folder (a Ray worker's is elsewhere)."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, **(extra or {}), PYTHONPATH=path)


def how_it_ended(code: int | None) -> str:
    """A child's return code in words: "signal SIGSEGV", "exit code 1", or "still running"."""
    if code is None:
        return "still running"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class Child:
    """One `python -m module` child process speaking messages on its stdin/stdout. Replies are
    read into a buffer as they arrive, so waiting on several children never blocks on one."""

    def __init__(self, module: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=child_env(env))
        self._buf = bytearray()

    def fileno(self) -> int:  # select() waits on the child's stdout
        return self.proc.stdout.fileno()

    def send(self, obj) -> None:
        """Raises BrokenPipeError (an OSError) when the child is gone."""
        send(self.proc.stdin, obj)

    def feed(self) -> bool:
        """Read what the child has written (one read, which does not block once select said so);
        False when its stdout is closed: the child is exiting or dead."""
        chunk = os.read(self.fileno(), _READ_BYTES)
        self._buf += chunk
        return bool(chunk)

    def next_message(self):
        """The next whole message already read, else None."""
        if len(self._buf) < HEADER_BYTES or len(self._buf) < HEADER_BYTES + (n := body_length(self._buf)):
            return None
        with memoryview(self._buf) as view:
            message = pickle.loads(view[HEADER_BYTES:HEADER_BYTES + n])
        del self._buf[:HEADER_BYTES + n]
        return message

    def read_message(self, deadline: float):
        """The child's next message; None when its stdout closed first; TimeoutError at the deadline."""
        return receive_any([self], deadline)[1]

    def poll(self) -> int | None:
        return self.proc.poll()

    def ended(self) -> str:
        return how_it_ended(self.proc.poll())

    def wait_exit(self, timeout_s: float) -> int | None:
        """Its return code once it exits, waiting at most timeout_s (None: still running). A child
        whose stdout just closed is dying: its own end, signal included, is the one to report."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 0.0) -> int | None:
        """Wait up to grace_s for the child to exit on its own (wait_exit), then kill it; reap it
        and close its pipes. Returns its return code."""
        if grace_s:
            self.wait_exit(grace_s)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:  # a pipe to a dead child may fail to flush
                pass
        return self.proc.returncode


def receive_any(children: list[Child], deadline: float) -> tuple[Child, object]:
    """The next whole message of any of the children, as (child, message); (child, None) when that
    child's stdout closed first. Raises TimeoutError at the deadline (time.monotonic())."""
    while True:
        for child in children:
            if (message := child.next_message()) is not None:
                return child, message
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        for child in select.select(children, [], [], remaining)[0]:
            if not child.feed():
                return child, None


def stop_all(children: list[Child]) -> None:
    """Kill every child first, then reap them (a rank left alive would wait in a collective)."""
    for child in children:
        if child.poll() is None:
            child.proc.kill()
    for child in children:
        child.stop()


# --- the child's side -----------------------------------------------------------------------------

def channel():
    """(requests, replies): the child's stdin and stdout as binary message streams. print() and
    anything a library writes go to stderr from now on: they must not corrupt the replies."""
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    return requests, replies


def exit_with_parent() -> None:
    """Exit when the parent is gone (a killed actor), even while stuck in a collective or a decoder."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
