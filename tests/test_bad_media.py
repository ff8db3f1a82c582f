"""Bad media never fails the run: each file becomes one classified error row (or a correct ok row)."""

import io
import json
from fractions import Fraction

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import StorageConfig
from pipeline.media.decoded import MediaError
from pipeline.media.decoder_process import DecoderProcess
from pipeline.media.fetch import fetch_and_decode
from pipeline.media.video import uniform_targets
from pipeline.testing.samples import encode_video, synthetic_frame
from tests.helpers.job_process import run_job_process

STORAGE = StorageConfig()


def write_mp4(path, frames=48, fps=24, faststart=False, rotation=None, pix_fmt="yuv420p", codec="libx264",
              size=(160, 120), pts=None):
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=fps, options={"preset": "ultrafast"} if codec.startswith("libx26") else {})
        s.width, s.height, s.pix_fmt = size[0], size[1], pix_fmt
        if rotation is not None:
            s.set_display_rotation(rotation)
        if pts is not None:  # millisecond timestamps of our choosing: a variable frame rate
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, *size), format="rgb24").reformat(format=pix_fmt)
            if pts is not None:
                frame.pts, frame.time_base = int(pts[i]), Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def audio_only(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def decode_error(path, **kw):
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(path), STORAGE, None, 8, **kw)
    return e.value.error_type


def test_the_box_reader_tells_an_mp4_cut_short_from_a_whole_one(tmp_path):
    from pipeline.media.containers import mp4_box_overruns

    def box(kind: bytes, payload: bytes, length: int | None = None) -> bytes:
        return (length if length is not None else 8 + len(payload)).to_bytes(4, "big") + kind + payload

    whole = write_mp4(tmp_path / "w.mp4").read_bytes()
    ftyp = box(b"ftyp", b"isom" + bytes(4))
    wide = (1).to_bytes(4, "big") + b"free" + (24).to_bytes(8, "big") + bytes(8)  # a 64-bit length
    cases = {
        "whole": (whole, False), "cut": (whole[:len(whole) - 100], True),
        "last box to the end (length 0)": (ftyp + box(b"mdat", bytes(50), length=0), False),
        "64-bit length, whole": (ftyp + wide, False), "64-bit length, cut": (ftyp + wide[:-1], True),
        "no ftyp first": (box(b"mdat", bytes(50), length=500), False),
        "a length below its header": (ftyp + box(b"moov", bytes(20), length=3), False),
    }
    for name, (data, overruns) in cases.items():
        assert mp4_box_overruns(io.BytesIO(data)) is overruns, name


def test_truncated_files_are_reported_as_truncated(tmp_path):
    for faststart in (False, True):  # index at the end (cut off with it) or at the front
        data = write_mp4(tmp_path / f"v{faststart}.mp4", faststart=faststart).read_bytes()
        for fraction in (0.1, 0.5, 0.9, 0.99):
            cut = tmp_path / f"cut{faststart}{fraction}.mp4"
            cut.write_bytes(data[: int(len(data) * fraction)])
            assert decode_error(cut) == "truncated", (faststart, fraction)
    webm = encode_video(tmp_path / "v.webm", "libvpx-vp9", seconds=3, gop=24).read_bytes()
    (tmp_path / "cut.webm").write_bytes(webm[: len(webm) // 2])
    assert decode_error(tmp_path / "cut.webm") == "truncated"
    head_cut = tmp_path / "head.mp4"
    head_cut.write_bytes(data[1000:])
    assert decode_error(head_cut) in ("undecodable", "truncated")


def test_audio_only_and_resolution_budget(tmp_path):
    assert decode_error(audio_only(tmp_path / "a.m4a")) == "no_video_stream"
    video = write_mp4(tmp_path / "big.mp4", frames=2, size=(640, 480))
    assert decode_error(video, max_pixels=640 * 480 - 1) == "too_large"
    bomb = tmp_path / "bomb.png"  # 67 M pixels, a few kB on disk: rejected from the header
    Image.new("L", (8192, 8192)).save(bomb)
    assert bomb.stat().st_size < 200_000
    assert decode_error(bomb) == "too_large"


def test_rotated_ten_bit_and_variable_frame_rate_videos_decode(tmp_path):
    rotated = fetch_and_decode(str(write_mp4(tmp_path / "r.mp4", rotation=90)), STORAGE, None, 2)
    assert rotated.frames.shape[1:] == (160, 120, 3) and (rotated.width, rotated.height) == (120, 160)
    # The white square of frame 0 sits top-left; turned 90 degrees counter-clockwise it is bottom-left.
    assert rotated.frames[0, -5:, :5].mean() > 250
    for codec in ("libx264", "libx265"):
        ten_bit = fetch_and_decode(str(write_mp4(tmp_path / f"{codec}.mp4", codec=codec, pix_fmt="yuv420p10le")),
                                   STORAGE, None, 3)
        assert ten_bit.frames.dtype == np.uint8 and ten_bit.frames.shape == (3, 120, 160, 3)
    times_ms = np.cumsum([0] + [20 if i < 30 else 120 for i in range(59)])  # 50 fps, then about 8 fps
    vfr = fetch_and_decode(str(write_mp4(tmp_path / "vfr.mp4", frames=60, pts=list(times_ms))), STORAGE, None, 6)
    frame_times = times_ms / 1000
    for t, target in zip(vfr.timestamps_s, uniform_targets(0, vfr.duration_s, vfr.fps, 6)):
        nearest = frame_times[np.argmin(np.abs(frame_times - target))]
        assert t == pytest.approx(nearest, abs=1e-3)


def test_unsupported_codec_is_its_own_error(tmp_path):
    data = write_mp4(tmp_path / "v.mp4").read_bytes()
    (tmp_path / "x.mp4").write_bytes(data.replace(b"avc1", b"zzzz"))  # a codec FFmpeg has no decoder for
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(tmp_path / "x.mp4"), STORAGE, None, 4)
    assert e.value.error_type == "unsupported_codec" and "re-encode" in str(e.value)


def test_hdr_ten_bit_bt2020_decodes_with_its_own_colour_matrix(tmp_path):
    from av.video.reformatter import Colorspace

    color = np.array([200, 40, 90], np.uint8)
    params = "log-level=none:colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc:hdr10=1:max-cll=1000,400"
    with av.open(str(tmp_path / "hdr.mp4"), "w") as c:
        s = c.add_stream("libx265", rate=24, options={"x265-params": params})
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p10le"
        rgb = av.VideoFrame.from_ndarray(np.broadcast_to(color, (64, 64, 3)).copy(), format="rgb24")
        for _ in range(12):
            c.mux(s.encode(rgb.reformat(format="yuv420p10le", dst_colorspace=Colorspace.BT2020)))
        c.mux(s.encode(None))
    d = fetch_and_decode(str(tmp_path / "hdr.mp4"), STORAGE, None, 3)
    assert d.frames.dtype == np.uint8 and d.frames.shape == (3, 64, 64, 3)
    # decoded with the BT.2020 matrix the stream declares (BT.601 would shift the colour)
    assert np.abs(d.frames[:, 32, 32].astype(int) - color).max() <= 6


def test_ffmpeg_may_not_open_files_named_inside_the_input(tmp_path, monkeypatch):
    """An ffconcat list is valid input to FFmpeg: without the protocol whitelist it reads any file it names."""
    write_mp4(tmp_path / "secret.mp4")
    (tmp_path / "list.mp4").write_bytes(b"ffconcat version 1.0\nfile secret.mp4\n")
    monkeypatch.chdir(tmp_path)  # relative names resolve against the worker's folder
    with av.open(open(tmp_path / "list.mp4", "rb")) as c:  # control: plain PyAV follows the list
        assert c.format.name == "concat" and sum(1 for _ in c.decode(video=0)) == 48
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(tmp_path / "list.mp4"), STORAGE, "video", 4)
    assert e.value.error_type == "undecodable"


def test_a_segfault_and_a_hang_cost_one_row_each(samples, tmp_path):
    decoder = DecoderProcess(timeout_s=3, module="tests.helpers.fault_decoder")
    (tmp_path / "segfault.mp4").write_bytes((samples / "street.mp4").read_bytes())
    (tmp_path / "hang.mp4").write_bytes((samples / "street.mp4").read_bytes())
    request = dict(storage=STORAGE, declared_type=None, num_frames=2)
    with pytest.raises(MediaError) as crashed:
        decoder.decode(uri=str(tmp_path / "segfault.mp4"), **request)
    assert crashed.value.error_type == "decoder_crashed" and "SIGSEGV" in str(crashed.value)
    assert decoder.decode(uri=str(samples / "street.mp4"), **request).frames.shape[0] == 2  # restarted
    with pytest.raises(MediaError) as hung:
        decoder.decode(uri=str(tmp_path / "hang.mp4"), **request)
    assert hung.value.error_type == "timeout"
    assert decoder.decode(uri=str(samples / "photo.jpg"), **request).media_type == "image"
    decoder.close()


def test_past_its_memory_limit_the_decoder_answers_too_large_and_is_replaced(samples, tmp_path):
    decoder = DecoderProcess(timeout_s=60, module="tests.helpers.fault_decoder", max_memory_bytes=2 * 2**30)
    (tmp_path / "hog.mp4").write_bytes((samples / "street.mp4").read_bytes())
    request = dict(storage=STORAGE, declared_type=None, num_frames=2)
    with pytest.raises(MediaError) as hog:
        decoder.decode(uri=str(tmp_path / "hog.mp4"), **request)
    assert hog.value.error_type == "too_large" and "memory" in str(hog.value)
    assert decoder.decode(uri=str(samples / "street.mp4"), **request).frames.shape[0] == 2  # a fresh child
    # a request for more frames than the limit holds is refused before decoding
    with pytest.raises(MediaError) as many:
        decoder.decode(uri=str(samples / "street.mp4"), **dict(request, num_frames=256, max_pixels=40_000_000),
                       max_memory_bytes=2**20)
    assert many.value.error_type == "too_large" and "num_frames" in str(many.value)
    decoder.close()


def test_a_manifest_of_bad_media_runs_to_the_end(samples, tiny_model, tmp_path):
    """The job in its own process and cluster, whose decoders run tests.helpers.fault_decoder."""
    good = (samples / "street.mp4").read_bytes()
    files = {
        "ok-video": samples / "street.mp4",
        "ok-image": samples / "photo.jpg",
        "zero": tmp_path / "zero.mp4",
        "random": tmp_path / "random.mp4",
        "html": tmp_path / "error-page.mp4",
        "truncated": tmp_path / "truncated.mp4",
        "audio": audio_only(tmp_path / "audio.m4a"),
        "segfault": tmp_path / "segfault.mp4",
        "hang": tmp_path / "hang.mp4",
        "wrong-ext": tmp_path / "picture.mp4",
        "cmyk": tmp_path / "cmyk.jpg",
        "missing": tmp_path / "missing.mp4",
    }
    files["zero"].write_bytes(b"")
    files["random"].write_bytes(bytes(np.random.RandomState(1).randint(0, 256, 5000, dtype=np.uint8)))
    files["html"].write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["segfault"].write_bytes(good)
    files["hang"].write_bytes(good)
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 30)).save(buf, "PNG")
    files["wrong-ext"].write_bytes(buf.getvalue())
    Image.new("CMYK", (30, 20), (0, 50, 100, 0)).save(files["cmyk"])
    rows = [{"id": k, "uri": str(v)} for k, v in files.items()] + [{"id": "ok-video", "uri": str(files["ok-image"])}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_job_process(["--manifest", tmp_path / "m.jsonl", "--output", tmp_path / "out", "--model", tiny_model,
                            # a budget the good files meet on a loaded machine too; only the hanging file uses it up
                            "--num-frames", 2, "--decode-timeout-s", 20, "--max-new-tokens", 2,
                            "--allow-uri-prefix", tmp_path, "--allow-uri-prefix", samples],
                           env={"PIPELINE_TEST_DECODER_MODULE": "tests.helpers.fault_decoder"})
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["rows"] == len(df) == len(rows)
    got = dict(zip(df.id + "/" + df.status, df.error_type.fillna("")))
    assert got == {
        "ok-video/ok": "", "ok-image/ok": "", "wrong-ext/ok": "", "cmyk/ok": "",
        "zero/error": "undecodable", "random/error": "undecodable", "html/error": "undecodable",
        "truncated/error": "truncated", "audio/error": "no_video_stream", "segfault/error": "decoder_crashed",
        "hang/error": "timeout", "missing/error": "not_found", "ok-video/error": "duplicate_id",
    }, list(zip(df.id, df.status, df.error_type, df.error))  # every row's message, to tell what went wrong


@pytest.mark.parametrize("lead", [b"", b"skip", b"uuid", b"free"])
def test_an_index_bomb_is_too_large_before_ffmpeg_builds_its_index(tmp_path, lead):
    """A 4.9 KB MP4 whose sample tables declare 60 M samples cost the batch decoder (8 GB limit)
    2.18 GB and 6.2 s and was labelled `undecodable`; a leading `skip` or `uuid` box bypassed the
    header check. Each sample holds at least a byte: 60 M samples in a few KB is a crafted index."""
    import struct

    from tests.helpers.hostile_media import index_bomb_mp4

    bomb = index_bomb_mp4(write_mp4(tmp_path / "src.mp4", frames=24).read_bytes())
    if lead:
        payload = (b"\x00" * 16) if lead == b"uuid" else b"padding"
        bomb = struct.pack(">I4s", 8 + len(payload), lead) + payload + bomb
    assert len(bomb) < 20_000
    (tmp_path / "bomb.mp4").write_bytes(bomb)
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(tmp_path / "bomb.mp4"), STORAGE, None, 8, max_memory_bytes=8 * 2**30)
    assert e.value.error_type == "too_large" and "60,000,000 samples" in str(e.value), e.value
