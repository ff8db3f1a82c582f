"""Write small sample media and a manifest that refers to them.

    python -m pipeline.testing.samples DIR

DIR gets short videos in two codecs (H.264/MP4 and VP9/WebM; one with a long keyframe interval),
a few images (JPEG with EXIF rotation, PNG with alpha, palette GIF) and DIR/manifest.jsonl, which
also holds one row whose file does not exist, to show how a failure is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def synthetic_frame(i: int, width: int, height: int) -> np.ndarray:
    """An RGB frame that changes with i: a gradient background and a square moving across it."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                      np.full_like(x, (i * 9) % 256)], axis=-1).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    left = (i * 5) % max(width - side, 1)
    top = (i * 3) % max(height - side, 1)
    frame[top:top + side, left:left + side] = (255, 255, 255)
    return frame


def encode_video(path: str | Path, codec: str = "libx264", seconds: float = 2.0, fps: int = 24,
                 width: int = 160, height: int = 120, gop: int = 12) -> Path:
    """Encode a synthetic video with a fixed keyframe interval of `gop` frames."""
    import av

    path = Path(path)
    options = {"g": str(gop), "keyint_min": str(gop)}
    if codec == "libx264":
        options.update({"sc_threshold": "0", "preset": "ultrafast"})
    elif codec.startswith("libvpx"):
        options.update({"deadline": "realtime", "cpu-used": "8", "auto-alt-ref": "0"})
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_images(directory: Path) -> dict[str, Path]:
    from PIL import Image

    base = Image.fromarray(synthetic_frame(7, 120, 80))
    paths = {}
    # JPEG stored sideways (80x120) with EXIF orientation 6 (rotate 90° clockwise to display): shows as 120x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    paths["photo"] = directory / "photo.jpg"
    base.rotate(90, expand=True).save(paths["photo"], exif=exif, quality=90)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (80, 1))))
    paths["logo"] = directory / "logo.png"
    rgba.save(paths["logo"])
    paths["palette"] = directory / "palette.gif"
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette"])
    return paths


def write_samples(directory: str | Path) -> Path:
    """Write the sample media and DIR/manifest.jsonl; returns the manifest path."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    street = encode_video(directory / "street.mp4", "libx264", seconds=4, gop=12)
    long_gop = encode_video(directory / "long_gop.mp4", "libx264", seconds=10, fps=15, gop=150)
    vp9 = encode_video(directory / "beach.webm", "libvpx-vp9", seconds=3, gop=24)
    images = write_images(directory)
    rows = [
        {"id": "street", "uri": str(street)},
        {"id": "long-gop-clip", "uri": str(long_gop), "start_s": 2.0, "end_s": 8.0},
        {"id": "beach", "uri": str(vp9), "media_type": "video",
         "questions": ["What moves in this video?", "What colors do you see?"]},
        {"id": "photo", "uri": str(images["photo"]), "prompt": "Describe this photo in one sentence."},
        {"id": "logo", "uri": str(images["logo"]),
         "questions": ["Is there any text?", "What shape is in the picture?"]},
        {"id": "palette", "uri": str(images["palette"])},
        {"id": "missing", "uri": str(directory / "does-not-exist.mp4")},
    ]
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="folder to write the samples to")
    args = parser.parse_args(argv)
    manifest = write_samples(args.dir)
    print(f"wrote sample media and {manifest}")


if __name__ == "__main__":
    main()
