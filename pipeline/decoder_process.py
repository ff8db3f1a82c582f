"""Decoding in a child process, so a crash or hang inside FFmpeg costs one row, not the actor.

`DecoderProcess.decode(...)` sends the request to a long-lived child (`python -m
pipeline.decoder_process`) and waits at most `timeout_s`; a child that dies (segfault, abort,
out of memory) or overruns is killed and replaced, and the row gets `decoder_crashed` or `timeout`.
Messages (pipeline/child_messages.py) go over the child's stdin/stdout.
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

from pipeline.child_messages import HEADER_BYTES, body_length, receive, send
from pipeline.media import Decoded, MediaError, fetch_and_decode

REPO_ROOT = Path(__file__).resolve().parents[1]


def serve(decode=fetch_and_decode) -> None:
    """The child's loop: one request in, one reply out, until stdin closes."""
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the reply channel
    while (kwargs := receive(requests)) is not None:
        try:
            send(replies, ("ok", decode(**kwargs)))
        except MediaError as e:
            send(replies, ("error", (e.error_type, str(e))))
        except Exception as e:  # noqa: BLE001 - any decoder failure belongs to this row
            send(replies, ("error", ("undecodable", f"decoding {kwargs.get('uri')} failed: {type(e).__name__}: {e}")))


class DecoderProcess:
    def __init__(self, timeout_s: float, module: str = "pipeline.decoder_process"):
        self.timeout_s = timeout_s
        self.module = module
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)

    def _stop(self) -> int | None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            code, self.proc = self.proc.returncode, None
            return code
        return None

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
        """fetch_and_decode(**kwargs) in the child process."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        uri = kwargs.get("uri")
        deadline = time.monotonic() + self.timeout_s
        try:
            send(self.proc.stdin, kwargs)
            header = self._read(HEADER_BYTES, deadline)
            body = header and self._read(body_length(header), deadline)
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
        if status == "error":
            raise MediaError(*payload)
        return payload

    def close(self) -> None:
        self._stop()


if __name__ == "__main__":
    serve()
