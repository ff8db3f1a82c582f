"""Decoding in a child process, so a crash or hang inside FFmpeg costs one row, not the actor.

`DecoderProcess.decode(...)` sends the request to a long-lived child (`python -m
pipeline.media.decoder_process`) and waits at most `timeout_s`; a child that dies (segfault, abort,
out of memory) or overruns is killed and replaced, and the row gets `decoder_crashed` or `timeout`.
The child runs under a memory limit (RLIMIT_DATA: heap and anonymous mappings, `max_memory_bytes`;
not RLIMIT_AS, which the address space torch reserves at import would eat): an allocation past it
fails inside the child, the row gets `too_large` and the child is replaced, instead of the machine's
OOM killer taking the worker. Messages (pipeline/io/child_process.py) go over the child's stdin/stdout.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.io.child_process import HEADER_BYTES, body_length, receive, send
from pipeline.media.decoded import Decoded, MediaError, out_of_memory
from pipeline.media.fetch import fetch_and_decode

REPO_ROOT = Path(__file__).resolve().parents[2]  # on the child's path: `pipeline` (and tests' modules) without installing
DEFAULT_MODULE = "pipeline.media.decoder_process"
# Test-only: a module run (python -m) as the decoder child instead, e.g. tests.helpers.fault_decoder,
# which injects crashes and hangs. Read here only; not a user option.
TEST_MODULE_ENV = "PIPELINE_TEST_DECODER_MODULE"
MEMORY_ENV = "PIPELINE_DECODER_MAX_MEMORY_BYTES"  # the parent's limit, read by the child at start
# A child's start-up (Python, PyAV, Pillow) on a loaded node can take far longer than a row's
# decode_timeout_s; it is waited for on its own, so only the decode itself counts against a row.
STARTUP_TIMEOUT_S = 600


def _limit_memory() -> None:
    limit = int(os.environ.get(MEMORY_ENV) or 0)
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def serve(decode=fetch_and_decode) -> None:
    """The child's loop: one request in, one reply out, until stdin closes."""
    _limit_memory()
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the reply channel
    import av  # noqa: F401 - the decoders' imports belong to start-up, not to the first row's time
    import PIL.Image  # noqa: F401

    send(replies, ("ready", None))
    while (kwargs := receive(requests)) is not None:
        try:
            send(replies, ("ok", decode(**kwargs)))
        except MediaError as e:
            send(replies, ("error", (e.error_type, str(e))))
        except MemoryError:  # numpy, pickle or FFmpeg (ENOMEM) past the limit
            error = out_of_memory(kwargs.get("uri"), kwargs.get("max_memory_bytes"))
            send(replies, ("out_of_memory", (error.error_type, str(error))))
            return  # a process that ran out may be left half-broken: the parent starts a fresh one
        except Exception as e:  # noqa: BLE001 - any decoder failure belongs to this row
            send(replies, ("error", ("undecodable", f"decoding {kwargs.get('uri')} failed: {type(e).__name__}: {e}")))


class DecoderProcess:
    def __init__(self, timeout_s: float, module: str | None = None, max_memory_bytes: int | None = None):
        """module: the child's module (python -m); default the batch decoder, or $PIPELINE_TEST_DECODER_MODULE."""
        self.timeout_s = timeout_s
        self.module = module or os.environ.get(TEST_MODULE_ENV) or DEFAULT_MODULE
        self.max_memory_bytes = int(max_memory_bytes) if max_memory_bytes else None  # None: no limit
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        if self.max_memory_bytes:
            # One malloc arena per thread reserves 64 MB each: keep the limit about the media's data.
            env.update({MEMORY_ENV: str(self.max_memory_bytes), "MALLOC_ARENA_MAX": "2"})
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        try:
            ready = self._receive(time.monotonic() + STARTUP_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if not ready or pickle.loads(ready)[0] != "ready":
            code = self._stop()
            raise MediaError("decoder_crashed", f"the decoder process did not start (exit code {code}); "
                                                "check the node's Python environment (PyAV, Pillow)")

    def _stop(self) -> int | None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            code, self.proc = self.proc.returncode, None
            return code
        return None

    def _receive(self, deadline: float) -> bytes | None:
        """One message's body from the child, None on EOF; raises TimeoutError at the deadline."""
        header = self._read(HEADER_BYTES, deadline)
        return header and self._read(body_length(header), deadline)

    def _read(self, n: int, deadline: float) -> bytes | None:
        """n bytes from the child, None on EOF; raises TimeoutError at the deadline."""
        fd, chunks, left = self.proc.stdout.fileno(), [], n
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def decode(self, **kwargs) -> Decoded:
        """fetch_and_decode(**kwargs) in the child process (told the child's memory limit)."""
        if self.max_memory_bytes:
            kwargs.setdefault("max_memory_bytes", self.max_memory_bytes)
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        uri = kwargs.get("uri")
        deadline = time.monotonic() + self.timeout_s
        try:
            send(self.proc.stdin, kwargs)
            body = self._receive(deadline)
        except TimeoutError:
            self._stop()
            raise MediaError("timeout", f"decoding {uri} took over {self.timeout_s:g} s and was stopped; "
                                        "check the file, or raise decode_timeout_s for very large media") from None
        except BrokenPipeError:
            body = None
        if body is None:  # the child died
            code = self._stop()
            how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
            raise MediaError("decoder_crashed", f"the decoder process died ({how}) on {uri}; the file probably "
                                                "triggers a decoder bug: re-encode it or report it")
        status, payload = pickle.loads(body)
        if status == "out_of_memory":  # the child exits after this reply
            self._stop()
        if status != "ok":
            raise MediaError(*payload)
        return payload

    def close(self) -> None:
        self._stop()


if __name__ == "__main__":
    serve()
