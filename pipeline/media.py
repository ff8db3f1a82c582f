"""Fetch + decode: URI -> RGB frames. Transport (fsspec) stays apart from decoding (PyAV, Pillow).

Videos are sampled by timestamp: N targets spread uniformly over the clip window, each reached by
seeking to the keyframe before it, unless what we know of the keyframe layout says that decoding
on from the current position is shorter. The whole file is never decoded just to pick N frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import StorageConfig
from pipeline.storage import open_binary, protocol_of


class MediaError(Exception):
    """A per-item failure with a stable `error_type` (written to the item's output rows)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass
class Decoded:
    media_type: str
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB; T == 1 for an image
    width: int
    height: int
    codec: str
    timestamps_s: list[float] = field(default_factory=list)
    duration_s: float | None = None
    fps: float | None = None
    decoded_frames: int = 0  # frames the decoder produced to get these (cost, not output)


# Magic numbers of the containers we expect; anything else is tried with both decoders.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"FLV", b"\x00\x00\x01\xba", b"OggS")


def sniff_media_type(head: bytes) -> str | None:
    """video, image, or None when the first bytes match no known signature."""
    if head[:4] == b"RIFF":
        return "image" if head[8:12] == b"WEBP" else "video" if head[8:12] == b"AVI " else None
    if head[4:8] == b"ftyp":
        return "image" if head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1") else "video"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    if head.startswith(_VIDEO_MAGIC) or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):
        return "video"
    return None


DEFAULT_MAX_PIXELS = 40_000_000  # per image or video frame; checked from the header, before decoding


def fetch_and_decode(uri: str, storage: StorageConfig, declared_type: str | None, num_frames: int,
                     start_s: float | None = None, end_s: float | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, video_resize: dict | None = None,
                     allowed_prefixes: list[str] | None = None) -> Decoded:
    """Open the URI (ranged reads, no full copy), detect the media type from content, decode.
    `video_resize` (see `resize_frames`) resizes video frames here, before they leave the decoder.
    `allowed_prefixes`: a local file is checked again once open (the driver checked its name)."""
    from pipeline.urls import URLRejected, open_local_checked

    try:
        if allowed_prefixes is not None and protocol_of(uri) == "file":
            f = _WatchedFile(open_local_checked(uri.removeprefix("file://"), allowed_prefixes))
        else:
            f = _WatchedFile(open_binary(uri, storage))
    except URLRejected as e:
        raise MediaError("uri_not_allowed", f"{uri} is not allowed once opened: {e}; if this source is trusted, "
                                            "pass --allow-uri-prefix with its folder") from e
    except FileNotFoundError as e:
        raise MediaError("not_found", f"{uri} does not exist; fix the uri or upload the file") from e
    except PermissionError as e:
        raise MediaError("access_denied", f"access to {uri} was denied; check the credentials and bucket policy") from e
    except OSError as e:
        raise _fetch_failed(uri, e) from e
    with f:
        try:
            return decode_file(f, uri, declared_type, num_frames, start_s, end_s, max_pixels, video_resize)
        except (MediaError, OSError) as e:
            if f.error is None:
                raise
            # the store failed mid-read (retries exhausted): not the file's fault
            raise _fetch_failed(uri, f.error) from e


def _fetch_failed(uri: str, error: Exception) -> MediaError:
    if isinstance(error, PermissionError):
        return MediaError("access_denied", f"reading {uri} was denied; check the credentials and bucket policy")
    if isinstance(error, FileNotFoundError):
        return MediaError("not_found", f"{uri} disappeared while it was read; upload it again and rerun")
    return MediaError("fetch_failed", f"reading {uri} kept failing after retries ({type(error).__name__}: {error}); "
                                      "the store may be throttling or down: rerun later with --retry-errors")


class _WatchedFile:
    """A file object that remembers a transport error raised by a read: decoders (Pillow, FFmpeg)
    report such an error as bad data, which would blame the file for a failing store."""

    def __init__(self, f):
        self._f, self.error = f, None

    def read(self, *args):
        try:
            return self._f.read(*args)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def decode_file(f, uri: str, declared_type: str | None, num_frames: int, start_s: float | None = None,
                end_s: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                video_resize: dict | None = None) -> Decoded:
    """Detect the media type of an open, seekable file from its bytes and decode it
    (the online server passes in-memory bytes here, so both paths decode alike)."""
    head = f.read(512)
    if not head:
        raise MediaError("undecodable", f"{uri} is empty (0 bytes)")
    f.seek(0)
    detected = sniff_media_type(head)
    if declared_type and detected and declared_type != detected:
        raise MediaError("media_type_mismatch",
                         f"{uri} was declared {declared_type} but holds {detected} data; fix the media type or the uri")
    kind = detected or declared_type
    if kind == "image" or (kind is None and _is_image(f)):
        return decode_image(f, uri, max_pixels)
    return decode_video(f, uri, num_frames, start_s, end_s, max_pixels, video_resize)


def _is_image(f) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        Image.open(f).close()
        return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False
    finally:
        f.seek(0)


def _check_pixels(uri: str, width: int, height: int, max_pixels: int):
    if width * height > max_pixels:
        raise MediaError("too_large", f"{uri} is {width}x{height} = {width * height:,} pixels, over the budget of "
                                      f"{max_pixels:,}; raise max_pixels if this is intended")


def decode_image(f, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(f) as img:  # reads the header only
            _check_pixels(uri, *img.size, max_pixels)
            fmt = (img.format or "image").lower()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")  # flatten transparency onto white, as a viewer would show it
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError("undecodable", f"{uri} is not a readable image ({e})") from e
    height, width = rgb.shape[:2]
    return Decoded("image", rgb[None], width, height, fmt, decoded_frames=1)


def uniform_targets(start: float, end: float, fps: float, n: int) -> np.ndarray:
    """n timestamps from the window's first frame to its last, evenly spaced (the model card's
    np.linspace over frame indices, expressed in seconds so variable frame rates sample evenly)."""
    last = max(start, end - 1.0 / fps)
    return np.linspace(start, last, n)


def decode_video(f, uri: str, num_frames: int, start_s: float | None, end_s: float | None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, video_resize: dict | None = None) -> Decoded:
    import av

    try:
        # No protocols for nested opens: a playlist or concat list in the input (HLS, ffconcat, ...)
        # must not make FFmpeg read local files or URLs on the worker.
        container = av.open(f, mode="r", options={"protocol_whitelist": "none"})
    except (av.FFmpegError, ValueError) as e:
        if _mp4_box_overruns(f):
            raise MediaError("truncated", f"{uri} is an MP4/MOV file cut short (its last box runs past the end "
                                          "of the file); re-upload it complete") from e
        raise MediaError("undecodable", f"{uri} is neither an image nor a video FFmpeg can open ({e})") from e
    with container:
        if not container.streams.video:
            raise MediaError("no_video_stream", f"{uri} has no video stream (audio only?)")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # FFmpeg knows the container but has no decoder for the codec
            raise MediaError("unsupported_codec", f"{uri}: FFmpeg has no decoder for its video codec; "
                                                  "re-encode it to H.264, HEVC, VP9 or AV1")
        # No frame threading: each seek flushes its pipeline of frames decoded ahead, and the
        # benchmarks measured it slower here; decoders run side by side, one per worker, instead.
        _check_pixels(uri, stream.codec_context.width, stream.codec_context.height, max_pixels)
        _check_not_truncated(f, uri, stream)
        tb = stream.time_base
        origin = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        if stream.duration:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / av.time_base - origin
        else:
            duration = None
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        start = float(start_s or 0.0)
        end = float(end_s) if end_s is not None else duration
        if duration is not None:
            end = min(end, duration) if end is not None else duration
        if end is None:
            raise MediaError("undecodable", f"{uri} declares no duration; give end_s in the manifest")
        if start >= end:
            raise MediaError("invalid_clip_window",
                             f"clip window [{start}, {end_s}] s is outside the video ({duration:.3f} s long); fix start_s/end_s")
        targets = uniform_targets(start, end, fps, num_frames)
        if stream.base_rate and stream.average_rate and stream.base_rate == stream.average_rate:
            # Constant frame rate: frame k is shown at k / fps, so the nearest frame to a target is
            # known before decoding. Snapping the target onto it lets a target a hair before a
            # keyframe's frame seek straight to that keyframe instead of decoding the whole GOP before.
            targets = np.floor(targets * fps + 0.5) / fps
        try:
            frames, times, decoded = _sample(container, stream, targets + origin, 1.0 / fps)
        except av.FFmpegError as e:
            raise MediaError("undecodable", f"decoding {uri} failed ({e})") from e
        if len(frames) < num_frames or times[-1] < targets[-1] + origin - 2.0 / fps:
            reached = f"{times[-1] - origin:.3f}" if times else "0"
            raise MediaError("truncated", f"{uri} ends at {reached} s although it declares {duration} s: "
                                          "the file is truncated; re-upload it complete")
        video = np.stack(frames)
        height, width = video.shape[1:3]
        if video_resize:
            video = resize_frames(video, **video_resize)
        return Decoded("video", video, width, height, stream.codec_context.name,
                       timestamps_s=[t - origin for t in times], duration_s=duration, fps=fps,
                       decoded_frames=decoded)


# Codecs whose FFmpeg decoders drop only frames that no other frame refers to when asked (H.264's
# nal_ref_idc == 0, HEVC's sub-layer non-reference pictures): skipping them leaves the rest exact.
_SKIPS_NON_REFERENCE = ("h264", "hevc")


def _sample(container, stream, targets: np.ndarray, frame_interval: float):
    """Frames nearest to each target time (absolute stream seconds) and how many were decoded.

    Seek only where it saves work: the container's index (MP4's sample table, Matroska's cues)
    says where the keyframes are, and a seek lands on the last one before the target. When that
    keyframe is not past the current position, decoding on is cheaper. Without an index we seek
    for every target until a seek lands behind the current position, then decode on.

    On the way to a target, frames no other frame refers to (most B-frames) are not decoded
    unless they are shown within two frame intervals of it: only those can be the nearest frame.
    Where the nearest frame found is further off than that (a gap in the stream), the stretch is
    decoded again in full, so the choice is always the one a full decode would make.
    """
    import bisect

    tb = stream.time_base
    eps = 1e-6  # seconds: float noise between a snapped target and the frame time it names
    seconds = float(tb)  # float math: Fraction arithmetic per index entry is slow on long videos
    keys = sorted(e.timestamp * seconds for e in stream.index_entries if e.is_keyframe)
    seek_blind = not keys
    margin = 2 * frame_interval
    can_skip = stream.codec_context.name in _SKIPS_NON_REFERENCE
    skip_before = float("-inf")  # packets shown before this time may skip non-reference frames
    skipped = False  # some packet since the last seek was sent with skipping on
    frames, times, decoded = [], [], 0
    it = prev = cur = None  # decoder iterator; the last two decoded frames as (time, frame)

    def decode_from_here():
        nonlocal skipped
        ctx, skipping = stream.codec_context, None
        for packet in container.demux(stream):
            skip = packet.pts is not None and packet.pts * seconds < skip_before
            if skip != skipping:
                ctx.skip_frame, skipping = ("NONREF" if skip else "DEFAULT"), skip
            skipped |= skip
            yield from packet.decode()

    def seek(target: float) -> bool:
        """Start decoding at or before the target's frame. A seek lands on the last keyframe
        *decoded* before the target; with B-frames that keyframe can be shown after it, and then
        the target's frame is in the interval before: back up one keyframe (or further)."""
        nonlocal it, prev, cur, skipped
        at, landed, step = target, None, 1.0
        while True:
            container.seek(max(int((at + eps) / tb), 0), stream=stream, backward=True, any_frame=False)
            it, prev, cur, skipped = decode_from_here(), None, None, False
            if not advance():
                return False
            if cur[0] <= target + eps or cur[0] == landed:
                return True  # at or before the target, or no earlier place to start from
            landed = cur[0]
            if keys:
                i = bisect.bisect_right(keys, at + eps) - 1
                if i <= 0:
                    return True
                at = keys[i - 1]
            else:
                at, step = target - step, step * 2

    def advance() -> bool:
        nonlocal prev, cur, decoded
        frame = next(it, None)
        if frame is None:
            return False
        decoded += 1
        t = float(frame.time) if frame.time is not None else (cur[0] + 1e-6 if cur else 0.0)
        prev, cur = cur, (t, frame)
        return True

    def nearest(target: float):
        while cur[0] < target - eps and advance():
            pass
        return cur if prev is None or abs(cur[0] - target) <= abs(prev[0] - target) else prev

    for target in targets:
        skip_before = target - margin if can_skip else float("-inf")
        if it is None:
            need_seek = True
        elif target <= cur[0] + eps:
            need_seek = False  # already there (targets closer together than frames)
        elif keys:
            i = bisect.bisect_right(keys, target + eps) - 1
            need_seek = i >= 0 and keys[i] > cur[0]
        else:
            need_seek = seek_blind
        if need_seek:
            position = cur[0] if cur else None
            if not seek(target):
                break
            if not keys and position is not None and cur[0] <= position:
                seek_blind = False  # seeks land behind us: decode on from here
        best = nearest(target)
        if skipped and abs(best[0] - target) > margin:
            skip_before = float("-inf")  # a skipped frame may have been nearer: decode it all
            if not seek(target):
                break
            best = nearest(target)
        times.append(best[0])
        frames.append(_upright_rgb(best[1]))
    return frames, times, decoded


def resize_frames(frames: np.ndarray, height: int, width: int, interpolation: str, antialias: bool) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8 with torchvision's resize: the operation the
    HF video processors apply, with their parameters, so the model inputs are bit-identical and the
    processor's own resize becomes a no-op; only the small frames leave the decoder process."""
    import torch
    import torchvision.transforms.v2.functional as tvF

    if frames.shape[1:3] == (height, width):
        return frames
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2)
    out = tvF.resize(tensor, [height, width], interpolation=tvF.InterpolationMode(interpolation), antialias=antialias)
    return np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy())


def _upright_rgb(frame) -> np.ndarray:
    """RGB pixels as displayed: the display matrix's rotation (counter-clockwise degrees) applied."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _mp4_box_overruns(f) -> bool:
    """True for an ISO-BMFF file (ftyp first) whose top-level boxes run past its end."""
    f.seek(0)
    size, pos = f.seek(0, 2), 0
    while pos + 8 <= size:
        f.seek(pos)
        header = f.read(16)
        length, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if pos == 0 and kind != b"ftyp":
            return False
        if length == 1 and len(header) == 16:
            length = int.from_bytes(header[8:16], "big")
        elif length == 0:  # box extends to the end of the file
            return False
        if length < 8:
            return False
        pos += length
    return pos > size


def _check_not_truncated(f, uri: str, stream):
    """MP4/MOV indexes give each sample's byte range: one past the end of the file means data is missing."""
    entries = [e for e in stream.index_entries if e.pos >= 0]
    if not entries:
        return
    needed = max(e.pos + e.size for e in entries)
    position = f.tell()  # PyAV reads through this file object: leave it where it was
    size = f.seek(0, 2)
    f.seek(position)
    if needed > size:
        raise MediaError("truncated", f"{uri} is truncated: its index needs {needed:,} bytes but the file has "
                                      f"{size:,}; re-upload it complete")
