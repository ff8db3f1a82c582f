"""Decoding real encoded files generated here with PyAV (libx264, libvpx-vp9)."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import StorageConfig
from pipeline.media.decoded import MediaError
from pipeline.media.fetch import fetch_and_decode, sniff_media_type
from pipeline.media.video import sample_targets, uniform_targets
from pipeline.testing.samples import encode_video

STORAGE = StorageConfig()


def count_frames(path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.parametrize(
    "codec,ext,seconds,fps,gop",
    [
        ("libx264", "mp4", 4, 24, 12),  # short keyframe interval
        ("libx264", "mp4", 12, 10, 50),  # long keyframe interval (5 s)
        ("libvpx-vp9", "webm", 3, 24, 24),
        ("mpeg4", "mkv", 3, 25, 25),
    ],
)
@pytest.mark.parametrize("num_frames", [1, 8, 32])
def test_sampled_timestamps_within_one_frame_of_uniform_targets(tmp_path, codec, ext, seconds, fps, gop, num_frames):
    path = encode_video(tmp_path / f"v.{ext}", codec, seconds=seconds, fps=fps, gop=gop)
    d = fetch_and_decode(str(path), STORAGE, None, num_frames)
    assert d.media_type == "video" and d.frames.shape == (num_frames, 120, 160, 3) and d.frames.dtype == np.uint8
    assert d.duration_s == pytest.approx(seconds, abs=1 / fps) and d.fps == pytest.approx(fps)
    assert (d.width, d.height) == (160, 120)
    assert d.codec == {"libx264": "h264", "libvpx-vp9": "vp9", "mpeg4": "mpeg4"}[codec]
    targets = uniform_targets(0.0, d.duration_s, d.fps, num_frames)
    assert np.all(np.abs(np.array(d.timestamps_s) - targets) <= 1 / fps + 1e-6)
    assert d.timestamps_s == sorted(d.timestamps_s)


def test_clip_window(tmp_path):
    path = encode_video(tmp_path / "v.mp4", seconds=6, fps=20, gop=20)
    d = fetch_and_decode(str(path), STORAGE, None, 5, start_s=2.0, end_s=4.0)
    assert d.timestamps_s[0] == pytest.approx(2.0, abs=0.05)
    assert d.timestamps_s[-1] == pytest.approx(4.0 - 1 / 20, abs=0.05)
    assert all(2.0 - 1e-6 <= t < 4.0 for t in d.timestamps_s)
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(path), STORAGE, None, 5, start_s=7.0, end_s=9.0)
    assert e.value.error_type == "invalid_clip_window"


def test_long_gop_video_is_not_decoded_in_full(tmp_path):
    # 60 s at 10 fps, a keyframe every 10 s: 600 frames in all.
    path = encode_video(tmp_path / "long.mp4", seconds=60, fps=10, gop=100, width=96, height=64)
    total = count_frames(path)
    assert total == 600
    d = fetch_and_decode(str(path), STORAGE, None, 6)
    # Seeking decodes only from the keyframe before each target up to the target.
    indices = [round(t * 10) for t in d.timestamps_s]
    # (+1: the frame after the target is decoded to tell which of the two is nearer)
    assert d.decoded_frames <= sum(i % 100 + 2 for i in indices), d.decoded_frames
    assert d.decoded_frames < total * 0.55
    # A short clip of the same file decodes about one keyframe interval, not the 45 s before it.
    clip = fetch_and_decode(str(path), STORAGE, None, 4, start_s=45.0, end_s=47.0)
    assert clip.decoded_frames <= 100 + 20, clip.decoded_frames
    # Dense sampling decodes each frame at most once (no re-seeking behind the current position).
    dense = fetch_and_decode(str(path), STORAGE, None, 120)
    assert dense.decoded_frames <= total


def _encode_with_b_frames(path, seconds: int, fps: int, gop: int, gap_after: int | None = None,
                          codec: str = "libx264"):
    """x264's/x265's default preset (B-frames, a B-pyramid): frames reach the decoder out of display
    order, and about half of them are never referred to. gap_after: no frames for 1.5 s after that one."""
    from fractions import Fraction

    import av

    from pipeline.testing.samples import synthetic_frame

    with av.open(str(path), "w") as c:
        options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        if codec == "libx265":
            options = {"x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:log-level=none"}
        s = c.add_stream(codec, rate=fps, options=options)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        s.codec_context.time_base = Fraction(1, fps)
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, 96, 64), format="rgb24")
            frame.pts = i + (int(1.5 * fps) if gap_after is not None and i > gap_after else 0)
            frame.time_base = Fraction(1, fps)
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def _targets(path, d, n):
    """The sampler's plan: the card's frame indices at a constant frame rate, else even timestamps."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        constant = bool(s.base_rate and s.average_rate and s.base_rate == s.average_rate)
    return sample_targets(0, d.duration_s, d.fps, n, constant)


def _reference_frames(path) -> dict:
    import av

    with av.open(str(path)) as c:
        return {round(float(f.time), 4): f.to_ndarray(format="rgb24") for f in c.decode(video=0)}


def _assert_nearest_frames(d, reference: dict, targets):
    times = np.array(sorted(reference))
    for t, target, frame in zip(d.timestamps_s, targets, d.frames):
        distance = np.abs(times - target)
        nearest = times[distance <= distance.min() + 1e-9]  # a target halfway may take either
        assert np.isclose(nearest, t, atol=1e-4).any(), (target, t)
        assert np.array_equal(frame, reference[round(t, 4)])


@pytest.mark.parametrize("b_frames", [False, True])
def test_each_frame_is_the_nearest_and_costs_only_its_keyframe_interval(tmp_path, b_frames):
    # 60 s at 10 fps, a keyframe every 2 s
    path = tmp_path / "v.mp4"
    if b_frames:
        _encode_with_b_frames(path, 60, 10, 20)
    else:
        encode_video(path, seconds=60, fps=10, gop=20, width=96, height=64)
    reference = _reference_frames(path)
    for n in (3, 7, 16, 33, 100):
        d = fetch_and_decode(str(path), STORAGE, None, n)
        _assert_nearest_frames(d, reference, _targets(path, d, n))
        # Each frame costs at most the frames from its keyframe to it (+ the decoder's reordering
        # delay): with 16 targets 3.993 s apart, the first half fall a hair before a keyframe's
        # frame, which must not cost the keyframe interval before it.
        assert d.decoded_frames <= sum(round(t * 10) % 20 + 4 for t in d.timestamps_s), (n, d.decoded_frames)


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_frames_nobody_refers_to_are_decoded_only_near_a_target(tmp_path, monkeypatch, codec):
    import pipeline.media.video as media

    path = _encode_with_b_frames(tmp_path / "b.mp4", 30, 10, 20, codec=codec)
    reference = _reference_frames(path)
    for n in (4, 12, 40):
        d = fetch_and_decode(str(path), STORAGE, None, n)
        _assert_nearest_frames(d, reference, _targets(path, d, n))
        with monkeypatch.context() as m:
            m.setattr(media, "_SKIPS_NON_REFERENCE", ())
            full = fetch_and_decode(str(path), STORAGE, None, n)
        assert np.array_equal(d.frames, full.frames) and d.timestamps_s == full.timestamps_s
        assert d.decoded_frames < full.decoded_frames * 0.8, (n, d.decoded_frames, full.decoded_frames)


@pytest.mark.parametrize("gop,gap_after", [(60, 25), (30, 29)])
def test_the_nearest_frame_is_found_across_a_gap_in_the_stream(tmp_path, gop, gap_after):
    # (60, 25): frames stop at 2.5 s (a B-frame nothing refers to) and resume at 4.1 s: for a
    # target in the gap the nearest frame is more than two frame intervals off, where a skipped
    # frame may be nearer (here it is, for some n); the stretch is decoded again in full.
    # (30, 29): the keyframe shown at 4.5 s is decoded at 2.8 s (B-frame delay plus the gap), so a
    # seek for 3.7 s lands on it, after the target: the interval before is decoded too.
    path = _encode_with_b_frames(tmp_path / "gap.mp4", 6, 10, gop, gap_after=gap_after)
    reference = _reference_frames(path)
    for n in range(2, 40):
        d = fetch_and_decode(str(path), STORAGE, None, n)
        _assert_nearest_frames(d, reference, _targets(path, d, n))


def test_frames_are_the_frames_at_their_timestamps(tmp_path):
    import av

    path = encode_video(tmp_path / "v.mp4", seconds=3, fps=24, gop=30)
    with av.open(str(path)) as c:
        reference = {round(float(f.time), 4): f.to_ndarray(format="rgb24") for f in c.decode(video=0)}
    d = fetch_and_decode(str(path), STORAGE, None, 8)
    for t, frame in zip(d.timestamps_s, d.frames):
        assert np.array_equal(frame, reference[round(t, 4)])


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "CMYK", "P", "1"])
def test_images_of_every_mode_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (40, 30), (200, 30, 60)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / "img.bin"  # the name says nothing: content decides
    path.write_bytes(_save(img, fmt))
    d = fetch_and_decode(str(path), STORAGE, None, 8)
    assert d.media_type == "image" and d.frames.shape == (1, 30, 40, 3) and (d.width, d.height) == (40, 30)


def test_transparent_pixels_are_shown_on_white(tmp_path):
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    (tmp_path / "t.png").write_bytes(_save(img, "PNG"))
    d = fetch_and_decode(str(tmp_path / "t.png"), STORAGE, None, 1)
    assert d.frames[0, 0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    (tmp_path / "r.jpg").write_bytes(_save(img, "JPEG", exif=exif))
    d = fetch_and_decode(str(tmp_path / "r.jpg"), STORAGE, None, 1)
    assert (d.width, d.height) == (20, 60)


def test_content_decides_the_media_type(tmp_path):
    video = encode_video(tmp_path / "clip.mp4", seconds=1)
    disguised = tmp_path / "clip.jpg"
    disguised.write_bytes(video.read_bytes())
    assert fetch_and_decode(str(disguised), STORAGE, None, 2).media_type == "video"
    png = tmp_path / "pic.mp4"
    png.write_bytes(_save(Image.new("RGB", (8, 8)), "PNG"))
    assert fetch_and_decode(str(png), STORAGE, None, 2).media_type == "image"
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(png), STORAGE, "video", 2)
    assert e.value.error_type == "media_type_mismatch"
    assert sniff_media_type(video.read_bytes()[:64]) == "video"


@pytest.mark.parametrize(
    "content,error_type",
    [
        (b"", "undecodable"),
        (bytes(np.random.RandomState(0).randint(0, 256, 4096, dtype=np.uint8)), "undecodable"),
        (b"<html><body>503 Service Unavailable</body></html>", "undecodable"),
    ],
)
def test_bad_files_raise_classified_errors(tmp_path, content, error_type):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(path), STORAGE, None, 4)
    assert e.value.error_type == error_type


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(tmp_path / "nope.mp4"), STORAGE, None, 4)
    assert e.value.error_type == "not_found" and "does not exist" in str(e.value)


def test_a_symlink_swapped_after_the_drivers_check_is_refused_when_the_worker_opens_it(tmp_path, samples):
    import shutil

    from pipeline.io.urls import check_media_uri

    allowed, outside = tmp_path / "media", tmp_path / "secret"
    (allowed / "day").mkdir(parents=True)
    outside.mkdir()
    for folder in (allowed, allowed / "day", outside):
        shutil.copy(samples / "photo.jpg", folder / "photo.jpg")
    link, prefixes = allowed / "link.jpg", [str(allowed)]
    link.symlink_to(allowed / "photo.jpg")
    for uri in (str(link), str(allowed / "day" / "photo.jpg")):
        check_media_uri(uri, prefixes)  # the driver's check, on the manifest scan
        assert fetch_and_decode(uri, StorageConfig(), None, 1, allowed_prefixes=prefixes).media_type == "image"
    link.unlink()
    link.symlink_to(outside / "photo.jpg")  # swapped between the driver's check and the worker's open
    shutil.rmtree(allowed / "day")
    (allowed / "day").symlink_to(outside)  # a folder on the path swapped for a link out
    for uri in (str(link), f"file://{allowed}/day/photo.jpg"):
        with pytest.raises(MediaError) as e:
            fetch_and_decode(uri, StorageConfig(), None, 1, allowed_prefixes=prefixes)
        assert e.value.error_type == "uri_not_allowed" and "not allowed once opened" in str(e.value)


# ---- the one fetch_and_decode: the server's options (data: URLs, a byte limit, a label) -----------

def data_url(path, mime: str) -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_data_url_decodes_as_its_file_does_where_allowed(samples):
    for name, mime, kind in (("photo.jpg", "image/jpeg", "image"), ("street.mp4", "video/mp4", "video")):
        inline = fetch_and_decode(data_url(samples / name, mime), STORAGE, kind, 4, data_urls=True)
        stored = fetch_and_decode(str(samples / name), STORAGE, kind, 4)
        assert inline.media_type == kind and inline.timestamps_s == stored.timestamps_s
        assert np.array_equal(inline.frames, stored.frames)


def test_data_urls_are_refused_unless_allowed_and_never_echoed(samples):
    from pipeline.io.urls import URLRejected, check_media_uri

    url = data_url(samples / "photo.jpg", "image/jpeg")
    with pytest.raises(URLRejected):  # the job's URL rules refuse it on the driver (unchanged)...
        check_media_uri(url, [str(samples)])
    with pytest.raises(MediaError) as e:  # ...and its fetch, should one get through
        fetch_and_decode(url, STORAGE, "image", 1, allowed_prefixes=[str(samples)])
    assert e.value.error_type == "uri_not_allowed" and url[40:80] not in str(e.value)
    for bad, detail in ((url.replace(";base64", ""), "must be base64"), (url[:-5] + "!!!!=", "not valid base64")):
        with pytest.raises(MediaError) as e:
            fetch_and_decode(bad, STORAGE, "image", 1, data_urls=True, label="image_url #1")
        assert e.value.error_type == "invalid_data_url" and detail in str(e.value)
    header, payload = url.split(",", 1)
    truncated = f"{header},{payload[:len(payload) // 2 // 4 * 4]}"  # valid base64, half a JPEG
    with pytest.raises(MediaError) as e:
        fetch_and_decode(truncated, STORAGE, "image", 1, data_urls=True, label="image_url #1")
    assert "image_url #1" in str(e.value) and truncated[40:80] not in str(e.value)


def test_the_label_names_the_media_in_messages(tmp_path):
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(tmp_path / "nope.jpg"), STORAGE, "image", 1, label="image_url #2")
    assert e.value.error_type == "not_found" and str(e.value).startswith("image_url #2 does not exist")
    assert str(tmp_path) not in str(e.value)


def test_the_byte_limit_holds_for_a_file_of_known_size(samples):
    size = (samples / "photo.jpg").stat().st_size
    with pytest.raises(MediaError) as e:
        fetch_and_decode(str(samples / "photo.jpg"), STORAGE, "image", 1, max_bytes=size - 1)
    assert e.value.error_type == "media_too_large" and f"larger than {size - 1} bytes" in str(e.value)
    assert fetch_and_decode(str(samples / "photo.jpg"), STORAGE, "image", 1, max_bytes=size).media_type == "image"
