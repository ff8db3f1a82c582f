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
import time

from pipeline.io.child_process import Child, channel, exit_with_parent, how_it_ended, receive, send
from pipeline.media.decoded import Decoded, MediaError, out_of_memory
from pipeline.media.fetch import fetch_and_decode

DEFAULT_MODULE = "pipeline.media.decoder_process"
# Test-only: a module run (python -m) as the decoder child instead, e.g. tests.helpers.fault_decoder,
# which injects crashes and hangs. Read here only; not a user option.
TEST_MODULE_ENV = "PIPELINE_TEST_DECODER_MODULE"
MEMORY_ENV = "PIPELINE_DECODER_MAX_MEMORY_BYTES"  # the parent's limit, read by the child at start
# A child's start-up (Python, PyAV, Pillow) on a loaded node can take far longer than a row's
# decode_timeout_s; it is waited for on its own, so only the decode itself counts against a row.
STARTUP_TIMEOUT_S = 600
# A child whose reply pipe closed is dying: how long its own end (the signal to report) is waited for.
EXIT_GRACE_S = 5.0


def _limit_memory() -> None:
    limit = int(os.environ.get(MEMORY_ENV) or 0)
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def serve(decode=fetch_and_decode) -> None:
    """The child's loop: one request in, one reply out, until stdin closes (or the parent is gone)."""
    _limit_memory()
    requests, replies = channel()
    exit_with_parent()
    import av  # noqa: F401 - the decoders' imports belong to start-up, not to the first row's time
    import PIL.Image  # noqa: F401

    send(replies, ("ready", None))
    while (kwargs := receive(requests)) is not None:
        name = _name(kwargs)
        try:
            send(replies, ("ok", decode(**kwargs)))
        except MediaError as e:
            send(replies, ("error", (e.error_type, str(e))))
        except MemoryError:  # numpy, pickle or FFmpeg (ENOMEM) past the limit
            error = out_of_memory(name, kwargs.get("max_memory_bytes"))
            send(replies, ("out_of_memory", (error.error_type, str(error))))
            return  # a process that ran out may be left half-broken: the parent starts a fresh one
        except Exception as e:  # noqa: BLE001 - any decoder failure belongs to this row
            send(replies, ("error", ("undecodable", f"decoding {name} failed: {type(e).__name__}: {e}")))


def _name(kwargs: dict) -> str | None:
    """What a request's media is called in messages: its label (the server never echoes a data: URL), else its uri."""
    return kwargs.get("label") or kwargs.get("uri")


class DecoderProcess:
    def __init__(self, timeout_s: float, module: str | None = None, max_memory_bytes: int | None = None):
        """module: the child's module (python -m); default the batch decoder, or $PIPELINE_TEST_DECODER_MODULE."""
        self.timeout_s = timeout_s
        self.module = module or os.environ.get(TEST_MODULE_ENV) or DEFAULT_MODULE
        self.max_memory_bytes = int(max_memory_bytes) if max_memory_bytes else None  # None: no limit
        self.child: Child | None = None

    def _start(self) -> None:
        env = {}
        if self.max_memory_bytes:
            # One malloc arena per thread reserves 64 MB each: keep the limit about the media's data.
            env.update({MEMORY_ENV: str(self.max_memory_bytes), "MALLOC_ARENA_MAX": "2"})
        self.child = Child(self.module, env)
        try:
            ready = self.child.read_message(time.monotonic() + STARTUP_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if not ready or ready[0] != "ready":
            code = self._stop()
            raise MediaError("decoder_crashed", f"the decoder process did not start ({how_it_ended(code)}); "
                                                "check the node's Python environment (PyAV, Pillow)")

    def _stop(self, grace_s: float = 0.0) -> int | None:
        child, self.child = self.child, None
        return child.stop(grace_s) if child is not None else None

    def decode(self, **kwargs) -> Decoded:
        """fetch_and_decode(**kwargs) in the child process (told the child's memory limit)."""
        if self.max_memory_bytes:
            kwargs.setdefault("max_memory_bytes", self.max_memory_bytes)
        if self.child is None or self.child.poll() is not None:
            self._start()
        name = _name(kwargs)
        try:
            self.child.send(kwargs)
            reply = self.child.read_message(time.monotonic() + self.timeout_s)
        except TimeoutError:
            self._stop()
            raise MediaError("timeout", f"decoding {name} took over {self.timeout_s:g} s and was stopped; "
                                        "check the file, or raise decode_timeout_s for very large media") from None
        except BrokenPipeError:
            reply = None
        if reply is None:  # the child died
            how = how_it_ended(self._stop(EXIT_GRACE_S))
            raise MediaError("decoder_crashed", f"the decoder process died ({how}) on {name}; the file probably "
                                                "triggers a decoder bug: re-encode it or report it")
        status, payload = reply
        if status == "out_of_memory":  # the child exits after this reply
            self._stop()
        if status != "ok":
            raise MediaError(*payload)
        return payload

    def close(self) -> None:
        self._stop()


if __name__ == "__main__":
    serve()
