"""Messages between the pipeline and the child processes it starts (the isolated decoder, the
tensor-parallel ranks): an 8-byte little-endian length, then a pickle. Both ends are this code."""

from __future__ import annotations

import pickle

HEADER_BYTES = 8


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
