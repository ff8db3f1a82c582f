"""Small media files that cost a decoder far more than their size (tests and benchmarks/serve_attacks.py).

- index_bomb_mp4: an MP4 of ~5 KB whose sample table declares 60 M samples; FFmpeg builds an index
  entry for each while opening it (2.2 GB and ~20 s measured).
- one_keyframe_video: a 1080p H.264 video with one keyframe followed by thousands of identical
  skip frames (~26 bytes each): sampling frames over it decodes every frame (~1 ms each).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, payload: bytes) -> bytes:
    return _box(kind, b"\0\0\0\0" + payload)  # version 0, flags 0


def index_bomb_mp4(source: bytes, samples: int = 60_000_000) -> bytes:
    """`source` (an MP4 with one video track) with a sample table of `samples` equal samples
    in one chunk, and only 4 KB of its media data left."""

    def rewrite(buf: bytes) -> bytes:
        out, off = b"", 0
        while off + 8 <= len(buf):
            size, kind = struct.unpack(">I4s", buf[off:off + 8])
            if kind in _CONTAINERS:
                out += _box(kind, rewrite(buf[off + 8:off + size]))
            elif kind == b"stts":
                out += _full_box(kind, struct.pack(">III", 1, samples, 512))
            elif kind == b"stsz":
                out += _full_box(kind, struct.pack(">II", 100, samples))
            elif kind == b"stsc":
                out += _full_box(kind, struct.pack(">IIII", 1, 1, samples, 1))
            elif kind == b"stco":
                out += _full_box(kind, struct.pack(">II", 1, 40))
            elif kind != b"stss":  # no sync table: every sample is a keyframe
                out += buf[off:off + size]
            off += size
        return out

    out, off = b"", 0
    while off + 8 <= len(source):
        size, kind = struct.unpack(">I4s", source[off:off + 8])
        if kind == b"moov":
            out += rewrite(source[off:off + size])
        elif kind == b"mdat":
            out += _box(kind, source[off + 8:off + 8 + 4096])
        else:
            out += source[off:off + size]
        off += size
    return out


def one_keyframe_video(path: Path, frames: int = 16000) -> Path:
    """A 1920x1080 30 fps MP4: one keyframe, then `frames - 1` copies of one skip frame."""
    import av
    import numpy as np

    encoded = io.BytesIO()
    with av.open(encoded, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        s.options = {"g": "1000", "keyint_min": "1000", "sc_threshold": "0", "preset": "ultrafast", "bframes": "0"}
        frame = av.VideoFrame.from_ndarray(np.tile(np.linspace(16, 235, 1920).astype(np.uint8), (1620, 1)),
                                           format="yuv420p")
        for i in range(6):  # the later P frames of a still picture are all skip blocks
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())
    encoded.seek(0)
    with av.open(encoded) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        packets = [bytes(p) for p in src.demux(video=0) if p.size]
        key, skip = packets[0], min(packets[1:], key=len)
        for i in range(frames):
            p = av.Packet(key if i == 0 else skip)
            p.pts = p.dts = i * 512
            p.time_base, p.stream = stream.time_base, stream
            p.is_keyframe = i == 0
            dst.mux(p)
    return path
