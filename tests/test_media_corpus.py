"""Real media made by other projects (../shared/media-corpus, see its SOURCES.md) plus generated
cases of what real datasets hold, run through the job: each row is checked against the table
below, and each `ok` row's frames against a full decode of the file at the reported timestamps
(images: Pillow's 8-bit RGB conversion, right way up)."""

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from pipeline.config import RunConfig, StorageConfig

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("MEDIA_CORPUS", REPO.parent / "shared" / "media-corpus"))

OK = "ok"
# file -> "ok", or the error type that is right for it
CORPUS_TABLE = {
    "apng-animated-41-frames.png": OK, "avif-animated-sequence.avif": OK, "avif-grid-1x5.avif": OK,
    "avif-irot-imir.avif": OK, "bmp-rle8-palette.bmp": OK, "gif-animated-31-frames.gif": OK,
    "jpeg-baseline-exif-480x360.jpg": OK, "jpeg-cmyk-adobe.jpg": OK, "jpeg-exif-orientation-6.jpg": OK,
    "jpeg-grayscale.jpg": OK, "jpeg-iphone-hdr-gainmap.jpg": OK, "jpeg-motion-photo-ori6.jpg": OK,
    "jpeg-progressive-exif-xmp-icc.jpg": OK, "png-16bit-grayscale.png": OK, "png-16bit-rgb-icc.png": OK,
    "png-palette-trns.png": OK, "png-rgba-adam7-interlaced.png": OK, "tiff-multipage-3.tiff": OK,
    "webp-alpha.webp": OK, "webp-animated-42-frames.webp": OK, "webp-lossy-exif.webp": OK,
    "gif-decompression-bomb-header.gif": "too_large", "webp-16000x9000.webp": "too_large",
    "heic-still-photo.heic": "unsupported_codec", "jpeg-12bit-precision.jpg": "unsupported_codec",
    "jxl-minimal.jxl": "unsupported_codec", "jpeg-truncated-progressive.jpg": "truncated",
    "mjpeg-partial-frame.mjpeg": "truncated", "png-truncated.png": "truncated",
    "av1-10bit-hlg-720x1280.mkv": OK, "av1-10bit-pq-mdcv-clli-1080p60.mp4": OK, "av1-320x180-60fps-6min.mp4": OK,
    "h263-176x144.3gp": OK, "h264-aac-1080x720.flv": OK, "h264-aac-960x540-flower.mp4": OK,
    "h264-android-slowmo-vfr.mp4": OK, "h264-annexb-raw-elementary.h264": OK, "h264-fragmented-mp4-flower.mp4": OK,
    "h264-high444-1fps-editlist.mp4": OK, "h264-phone-4k60-rot-90.mp4": OK, "h264-phone-pixel7-rot-180.mp4": OK,
    "h264-sar-2x1-640x360.mp4": OK, "h264-vfr-3026x1386.mp4": OK, "hevc-8k-7680x4320.mp4": OK,
    "hevc-annexb-raw-elementary-1080p.265": OK, "hevc-bframes-854x480.mp4": OK,
    "hevc-dolbyvision-p8-iphone-rot-90.MOV": OK, "hevc-main10-hlg-1080p.mp4": OK,
    "hls-segment-h264-midstream.ts": OK, "hls-segment-pts-rollover.ts": OK, "mp4-two-video-tracks-one-empty.mp4": OK,
    "mpeg1-video-elementary-48x48.mpg": OK, "mpeg2-422-1080i-broadcast.ts": OK, "mpeg2-576i-dvb-sar64x45.ts": OK,
    "mpeg2-program-stream.ps": OK, "mpeg4part2-mp3-960x400.avi": OK, "mvhevc-spatial-stereo-1934x2160.mov": OK,
    "prores422-10bit-180x144.mov": OK, "theora-vorbis-320x240.ogg": OK, "ts-multiprogram-5-video-streams.ts": OK,
    "ts-no-initial-keyframe.ts": OK, "vp8-1080p-single-frame.webm": OK, "vp8-vorbis-960x540-flower.webm": OK,
    "vp9-alpha-mode-1280x720.webm": OK, "vp9-odd-dimensions-161x121.webm": OK,
    "vp9-profile2-10bit-426x240.webm": OK, "vvc-h266-10bit-320x180.mp4": OK,
    "cenc-cbcs-encrypted-h264.mp4": "unsupported_codec", "dnxhd-mxf-truncated.mxf": "truncated",
    "fmp4-init-segment-only.mp4": "truncated", "mjpeg-avi-header-only.avi": "undecodable",
    "wmv-msmpeg4-1x1-minimal.wmv": "undecodable", "fmp4-media-segment-no-init.mp4": "undecodable",
    "h264-invalid-nalu.mp4": "undecodable", "mkv-truncated-multitrack-subs.mkv": "truncated",
    "mp4-annexb-in-avc1-short-mdat.mp4": "truncated", "mp4-audio-only-aac.mp4": "no_video_stream",
    "mp4-malformed-free-box-size.mp4": "undecodable", "vp6f-flv-header-stub.flv": "truncated",
    "vp9-invalid-bitstream.webm": "undecodable",
}
# what each error message must tell the user to do
ADVICE = {"truncated": "upload", "too_large": "", "unsupported_codec": "", "undecodable": "",
          "no_video_stream": "audio", "not_found": "uri"}


def _encode(path, seconds, fps, gop=None, fmt=None, codec="libx264", size=(160, 120), options=None, start=0):
    import av

    width, height = size
    opts = {} if gop is None else {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        s = out.add_stream(codec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(start, start + int(seconds * fps)):
            img = np.zeros((height, width, 3), np.uint8)
            img[:, :, 0] = (i * 5) % 256
            img[(i * 3) % height:(i * 3) % height + 4, :, 1] = 255
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode(None))
    return path


def _zero_durations(src: Path, dst: Path) -> Path:
    """An MP4 whose mvhd, tkhd and mdhd durations are 0 (some writers leave them so)."""
    data = bytearray(src.read_bytes())
    for box, offset in ((b"mvhd", 16), (b"tkhd", 20), (b"mdhd", 16)):  # version-0 layouts
        pos = data.find(box)
        while pos >= 0:
            data[pos + 4 + offset:pos + 8 + offset] = b"\0\0\0\0"
            pos = data.find(box, pos + 4)
    dst.write_bytes(bytes(data))
    return dst


def _index_bomb(src: Path, dst: Path, samples: int = 100_000_000) -> Path:
    """A small MP4 whose sample table declares `samples` samples of constant size."""
    data = bytearray(src.read_bytes())
    pos = data.find(b"stsz")
    data[pos + 8:pos + 16] = struct.pack(">II", 1, samples)  # sample_size 1 (constant), sample_count
    pos = data.find(b"stts")
    data[pos + 12:pos + 20] = struct.pack(">II", samples, 1)
    dst.write_bytes(bytes(data))
    return dst


def _cover_art_audio(path: Path) -> Path:
    """An MP3 with an attached picture (ID3 APIC): FFmpeg shows the picture as a video stream."""
    import av

    cover = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(cover, "JPEG")
    with av.open(str(path), "w", format="mp3") as out:
        a = out.add_stream("libmp3lame", rate=44100)
        a.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152 * 40), np.int16), format="s16", layout="mono")
        frame.sample_rate = 44100
        out.mux(a.encode(frame))
        out.mux(a.encode(None))
    frame_body = b"\0image/jpeg\0\x03\0" + cover.getvalue()
    apic = b"APIC" + struct.pack(">I", len(frame_body)) + b"\0\0" + frame_body
    size = len(apic)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    path.write_bytes(b"ID3\x03\x00\x00" + syncsafe + apic + path.read_bytes())
    return path


def _resolution_change(path: Path, tmp: Path) -> Path:
    """Raw H.264 whose first frames are 64x64 and later ones 1920x1080 (the header says 64x64)."""
    small = _encode(tmp / "small.h264", 1, 10, 5, fmt="h264", size=(64, 64))
    big = _encode(tmp / "big.h264", 1, 10, 5, fmt="h264", size=(1920, 1080))
    path.write_bytes(small.read_bytes() + big.read_bytes())
    return path


def _corrupt_jpeg(path: Path) -> Path:
    """A JPEG's headers with its scan data gone (the end marker right after the scan header)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 240)).save(buf, "JPEG")
    data = buf.getvalue()
    sos = data.find(b"\xff\xda")
    header = data[:sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")]
    path.write_bytes(header + b"\xff\xd9")
    return path


def _generated(tmp: Path) -> dict[str, tuple[Path, str, dict]]:
    """name -> (file, expected, manifest fields)."""
    src = _encode(tmp / "src.mp4", 2, 24, 12)
    pillow = {}
    for fmt, ext in (("TGA", "tga"), ("PPM", "ppm"), ("ICO", "ico"), ("JPEG2000", "jp2"), ("QOI", "qoi"),
                     ("SGI", "sgi"), ("PCX", "pcx"), ("DDS", "dds"), ("XBM", "xbm")):
        p = tmp / f"pillow.{ext}"
        mode = "1" if fmt == "XBM" else "RGB"
        try:
            Image.new("RGB", (24, 16), (30, 140, 220)).convert(mode).save(p, fmt)
        except (KeyError, OSError):
            continue
        pillow[f"pillow-{fmt.lower()}"] = (p, OK, {})
    grey16 = tmp / "grey16.png"
    Image.fromarray(np.full((8, 8), 0x4000, np.uint16)).save(grey16)
    tiny = {}
    for h in (1, 2, 3):
        p = tmp / f"tiny-{h}.png"
        Image.new("RGB", (5, h), (250, 20, 20)).save(p)
        tiny[f"image-{h}px-high"] = (p, OK, {})
    folder = tmp / "a-folder"
    folder.mkdir()
    return {
        "ts-h264-one-keyframe": (_encode(tmp / "hls.ts", 2, 24, 48), OK, {}),
        "ts-h264-30s-default-gop": (_encode(tmp / "long.ts", 30, 24), OK, {}),
        "flv-gop12": (_encode(tmp / "g12.flv", 4, 24, 12), OK, {}),
        "flv-gop24": (_encode(tmp / "g24.flv", 4, 24, 24), OK, {}),
        "raw-annexb-h264": (_encode(tmp / "raw.h264", 2, 24, 24, fmt="h264"), OK, {}),
        "live-webm": (_encode(tmp / "live.webm", 3, 24, 24, codec="libvpx-vp9", options={"live": "1"}), OK, {}),
        "mp4-zero-durations": (_zero_durations(src, tmp / "zero-dur.mp4"), OK, {}),
        "mp3-cover-art": (_cover_art_audio(tmp / "song.mp3"), "no_video_stream", {}),
        "mp4-index-bomb": (_index_bomb(src, tmp / "bomb.mp4"), "too_large", {}),
        "resolution-change": (_resolution_change(tmp / "grow.h264", tmp), "too_large", {}),
        "png-16bit-grey": (grey16, OK, {}),
        "jpeg-no-scan-data": (_corrupt_jpeg(tmp / "corrupt.jpg"), "truncated", {}),
        "folder-as-uri": (folder, "not_found", {}),
        **pillow, **tiny,
    }


def _reference_image(path: Path) -> np.ndarray:
    """Pillow's 8-bit RGB conversion, right way up (16-bit samples scaled, transparency on white)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            return np.repeat((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=2)
        if "A" in img.getbands() or "transparency" in img.info:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"))
        return np.asarray(img.convert("RGB"))


def _reference_video(path: Path, timestamps: list[float]) -> list[np.ndarray]:
    """A full decode of the file's video stream: the frames shown at the given times (raw streams:
    frame k at k / fps)."""
    import av

    from pipeline.media.video import _frame_rate, _upright_rgb, _video_stream

    wanted = {round(t, 4) for t in timestamps}
    found = {}
    with av.open(str(path)) as c:
        s = _video_stream(c, str(path))
        origin = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        for k, frame in enumerate(c.decode(s)):
            t = round((float(frame.time) - origin) if frame.time is not None else k / _frame_rate(s), 4)
            if t in wanted and t not in found:
                found[t] = _upright_rgb(frame)
    return [found[round(t, 4)] for t in timestamps]


@pytest.mark.slow
def test_every_corpus_file_and_generated_case_through_the_job(ray_local, tiny_model, tmp_path):
    from pipeline.batch.run import run
    from pipeline.media.fetch import fetch_and_decode

    if not CORPUS.is_dir():
        pytest.skip(f"the media corpus is not at {CORPUS} (set MEDIA_CORPUS)")
    files = {p.name: (p, CORPUS_TABLE.get(p.name), {}) for p in sorted(CORPUS.iterdir()) if p.name != "SOURCES.md"}
    unknown = [name for name, (_, expected, _) in files.items() if expected is None]
    assert not unknown, f"corpus files missing from the table: {unknown}"
    gen = tmp_path / "gen"
    gen.mkdir()
    files.update(_generated(gen))
    rows = [{"id": name, "uri": str(path), **extra} for name, (path, _, extra) in files.items()]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(manifest=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), model=str(tiny_model),
                    num_frames=4, max_pixels=40_000_000, allowed_uri_prefixes=[str(CORPUS), str(gen)],
                    batch_size=8, preprocess_workers=1)
    cfg.generation.max_new_tokens = 1
    run(cfg)
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    got = {name: (OK if df.loc[name, "status"] == "ok" else df.loc[name, "error_type"]) for name in files}
    expected = {name: e for name, (_, e, _) in files.items()}
    # the resolution-change case needs a budget the first frames fit and the later ones do not
    got["resolution-change"] = _error_type(files["resolution-change"][0], max_pixels=64 * 64)
    assert {k: v for k, v in got.items() if v != expected[k]} == {}, "rows whose outcome is wrong"
    for name, (path, e, _) in files.items():
        row = df.loc[name]
        if e != OK:
            if name != "resolution-change":
                assert ADVICE[e] in row["error"], (name, row["error"])
            continue
        d = fetch_and_decode(str(path), StorageConfig(), None, 4)  # what the decoder produced, before resizing
        if d.media_type == "image":
            assert np.array_equal(d.frames[0], _reference_image(path)), name
            continue
        assert d.timestamps_s == pytest.approx(list(row["frame_timestamps_s"]), abs=1e-9), name
        for frame, reference in zip(d.frames, _reference_video(path, d.timestamps_s)):
            assert np.array_equal(frame, reference), name


def _error_type(path: Path, **kw) -> str:
    from pipeline.media.decoded import MediaError
    from pipeline.media.fetch import fetch_and_decode

    try:
        fetch_and_decode(str(path), StorageConfig(), None, 4, **kw)
        return OK
    except MediaError as e:
        return e.error_type


@pytest.mark.parametrize("height", [1, 2, 3])
def test_images_a_few_pixels_high_reach_the_model_channels_last(tiny_model, height):
    from pipeline.model.preprocess import Preprocessor

    red = np.zeros((height, 7, 3), np.uint8)
    red[..., 0] = 255
    pixels = Preprocessor(str(tiny_model)).build("image", [red], "What color?")["pixel_values"]
    channels = pixels.reshape(-1, *pixels.shape[-3:])[0]  # (3, H, W) of the first tile
    assert channels.shape[0] == 3
    assert channels[0].mean() > channels[1].mean() + 1 and channels[0].mean() > channels[2].mean() + 1


def test_generated_cases_decode_right_or_get_the_right_error(tmp_path):
    """The generated cases alone, without the job (fast): as the decoder child sees them, with its memory limit."""
    cases = _generated(tmp_path)
    outcomes = {name: _error_type(path, max_memory_bytes=8 * 2**30) for name, (path, _, _) in cases.items()}
    expected = {name: e for name, (_, e, _) in cases.items()}
    expected["resolution-change"] = OK  # within the default budget: later frames are scaled to the first's size
    assert outcomes == expected
    assert _error_type(tmp_path / "grow.h264", max_pixels=64 * 64) == "too_large"  # the 1080p frames, past the header
