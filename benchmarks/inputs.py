"""Benchmark inputs, generated here (PyAV/libx264, Pillow) so anyone can rerun the benchmark.

Frames are a smooth random texture panning under a moving square: motion that H.264 predicts
like a camera pan, at a realistic bit rate. Encoded with x264's veryfast preset: B-frames (half of
them referred to by no other frame), CABAC and the deblocking filter, like most video published
on the web (ultrafast has none of these and decodes ~1.6x faster per frame). Planes are made
directly in YUV 4:2:0 (no RGB conversion), so encoding costs x264's time only. A long video is a few encoded keyframe
intervals (closed GOPs, each starting with an IDR frame) repeated with shifted timestamps:
every frame is still a real frame that a decoder must decode, but encoding a 5-minute 1080p
video costs only its distinct part.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _smooth_plane(rng, height: int, width: int) -> np.ndarray:
    from PIL import Image

    small = (rng.random((height // 24 + 2, width // 24 + 2)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


PRESET = "veryfast"


def encode_video(path: Path, width: int, height: int, seconds: float, fps: int = 30, gop_s: float = 2.0,
                 repeat_to_s: float | None = None, seed: int = 0) -> Path:
    """H.264 (libx264, yuv420p, a keyframe every gop_s seconds). With repeat_to_s, the encoded
    part (a whole number of keyframe intervals) is repeated until the video is that long."""
    import av

    path = Path(path)
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    frames, gop = int(round(seconds * fps)), max(1, int(round(gop_s * fps)))
    step = 2  # pixels of pan per frame
    y = _smooth_plane(rng, height, width + step * frames)
    u = _smooth_plane(rng, height // 2, (width + step * frames) // 2)
    v = _smooth_plane(rng, height // 2, (width + step * frames) // 2)
    side = height // 5
    tmp = path.with_suffix(".part" + path.suffix)
    options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "preset": PRESET}
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        packets = []
        for i in range(frames):
            luma = y[:, i * step:i * step + width].copy()
            left, top = (i * 11) % (width - side), (i * 7) % (height - side)
            luma[top:top + side, left:left + side] = 235
            planes = [luma.ravel(), u[:, i:i + width // 2].ravel(), v[:, i:i + width // 2].ravel()]
            frame = av.VideoFrame.from_ndarray(np.concatenate(planes).reshape(height * 3 // 2, width), format="yuv420p")
            packets += stream.encode(frame)
        packets += stream.encode(None)
        copies = max(1, int(np.ceil((repeat_to_s or seconds) / seconds - 1e-9)))
        # Repeat the encoded packets with shifted timestamps (each copy starts with an IDR frame).
        encoded = [(bytes(p), p.pts, p.dts, p.duration, p.is_keyframe, p.time_base) for p in packets]
        for k in range(copies):
            for data, pts, dts, duration, key, tb in encoded:
                shift = k * int(round(frames / fps / tb))
                q = av.Packet(data)
                q.stream, q.time_base, q.is_keyframe = stream, tb, key
                q.pts, q.dts, q.duration = pts + shift, dts + shift, duration
                out.mux(q)
    tmp.rename(path)
    return path


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    from PIL import Image

    path = Path(path)
    if not path.exists():
        rng = np.random.default_rng(seed)
        rgb = np.stack([_smooth_plane(rng, height, width) for _ in range(3)], axis=-1)
        Image.fromarray(rgb).save(path, quality=90)
    return path


# Sizes per profile: `minimal` for the test (seconds), `quick` for a few minutes on 2 cores, `full`.
PROFILES = {
    "minimal": dict(short=(320, 180, 2.0, 2), long=(640, 360, 4.0, 20.0), long_gops=(1.0, 2.0), mixed=8, images=2),
    "quick": dict(short=(1280, 720, 10.0, 4), long=(1920, 1080, 20.0, 180.0), long_gops=(2.0, 10.0), mixed=32, images=4),
    "full": dict(short=(1280, 720, 10.0, 8), long=(1920, 1080, 20.0, 600.0), long_gops=(2.0, 10.0), mixed=64, images=8),
}


def make_inputs(directory: Path, profile: str) -> dict:
    """Videos and images for every figure; reused when already there (same names, same content)."""
    p = PROFILES[profile]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    w, h, secs, count = p["short"]
    short = [encode_video(directory / f"short-{h}p-{PRESET}-{i}.mp4", w, h, secs, gop_s=2.0, seed=i) for i in range(count)]
    lw, lh, part, total = p["long"]
    long = {gop: encode_video(directory / f"long-{lh}p-{PRESET}-{int(total)}s-gop{gop:g}s.mp4", lw, lh, part, gop_s=gop,
                              repeat_to_s=total, seed=100) for gop in p["long_gops"]}
    sizes = [(1280, 960), (1920, 1080), (800, 1200), (2400, 600)]
    images = [write_image(directory / f"photo-{i}.jpg", *sizes[i % len(sizes)], seed=200 + i) for i in range(p["images"])]
    return {"short": short, "long": long, "long_s": total, "images": images}


def mixed_manifest(path: Path, inputs: dict, n: int) -> Path:
    """n items: half short clips, a quarter images, a quarter clip windows of the long videos
    (unique ids; the files repeat, as the same file never costs less to decode the second time)."""
    rows, longs = [], list(inputs["long"].values())
    for i in range(n):
        kind = i % 4
        if kind in (0, 2):
            rows.append({"id": f"clip-{i}", "uri": str(inputs["short"][i // 2 % len(inputs["short"])])})
        elif kind == 1:
            rows.append({"id": f"image-{i}", "uri": str(inputs["images"][i // 4 % len(inputs["images"])])})
        else:
            long = longs[i // 4 % len(longs)]
            window = min(20.0, inputs["long_s"] / 2)
            start = float(i * 7 % int(inputs["long_s"] - window))
            rows.append({"id": f"window-{i}", "uri": str(long), "start_s": start, "end_s": start + window})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

