"""Videos: N frames sampled over a clip window with PyAV, by seeking (the whole file is never
decoded just to pick N frames).

Videos are sampled by timestamp: N targets spread uniformly over the clip window, each reached by
seeking to the keyframe before it, unless what we know of the keyframe layout says that decoding
on from the current position is shorter.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass

import numpy as np

from pipeline.media.containers import check_frames_fit, check_mp4_tables, check_not_truncated, mp4_box_overruns
from pipeline.media.decoded import DEFAULT_MAX_PIXELS, Decoded, MediaError, check_pixels, out_of_memory


def uniform_targets(start: float, end: float, fps: float, n: int) -> np.ndarray:
    """n timestamps from the window's first frame to its last, evenly spaced (the model card's
    np.linspace over frame indices, expressed in seconds so variable frame rates sample evenly)."""
    last = max(start, end - 1.0 / fps)
    return np.linspace(start, last, n)


def card_frame_indices(total_frames: int, n: int) -> np.ndarray:
    """The model cards' (and lmms-eval's) frame choice: np.linspace over the frame indices, truncated."""
    return np.linspace(0, total_frames - 1, n).astype(int)


def sample_targets(start: float, end: float, fps: float, n: int, constant_rate: bool) -> np.ndarray:
    """The times (relative to the stream's first frame) of the frames to sample in [start, end).
    At a constant frame rate frame k is shown at k / fps: the card's frame indices, exactly;
    at a variable one, timestamps evenly spaced (frames are not evenly spaced in time)."""
    if not constant_rate:
        return uniform_targets(start, end, fps, n)
    first = int(np.ceil(start * fps - 1e-6))
    total = max(1, int(np.ceil(end * fps - 1e-6)) - first)  # frames shown in [start, end)
    return (first + card_frame_indices(total, n)) / fps


@dataclass
class _Timeline:
    """What the container says of the stream's time: where it starts, how long, how fast."""
    origin: float  # seconds of the first frame (stream time)
    duration: float | None
    fps: float
    constant_rate: bool
    timed: bool = True  # frames carry timestamps (raw elementary streams do not)
    exact_duration: bool = False  # the stream's own duration, not the container's (all streams)
    declared: bool = True  # the duration comes from the file's headers (not from reading its packets)


def _frame_rate(stream) -> float:
    """average_rate, unless it is implausible (FLV reports its 1 kHz time base): then FFmpeg's guess."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < float(rate) <= 300:
            return float(rate)
    return 25.0


# FFmpeg demuxers of bare elementary streams (no container): durations they report are estimates.
_RAW_STREAM_FORMATS = {"h264", "hevc", "vvc", "mpegvideo", "m4v", "cavsvideo", "vc1", "obu", "jpeg_pipe", "mjpeg"}


def _timeline(container, stream) -> _Timeline:
    import av

    tb = stream.time_base
    fps = _frame_rate(stream)
    constant = bool(stream.base_rate and stream.average_rate and stream.base_rate == stream.average_rate)
    if stream.start_time is not None:
        origin = float(stream.start_time * tb)
    elif container.start_time is not None:
        origin = container.start_time / av.time_base
    else:
        origin = 0.0
    if container.format.name in _RAW_STREAM_FORMATS:
        return _Timeline(origin, None, fps, constant)  # their durations are guesses from the bit rate
    if stream.duration:
        return _Timeline(origin, float(stream.duration * tb), fps, constant, exact_duration=True)
    if container.duration:
        end = (container.start_time or 0) / av.time_base + container.duration / av.time_base
        return _Timeline(origin, end - origin, fps, constant)
    entries = [e.timestamp for e in stream.index_entries] if "mp4" in container.format.name else []
    if entries:  # a full sample table but zeroed header durations (some MP4 writers): the last sample ends it
        return _Timeline(origin, float(max(entries) * tb) - origin + 1.0 / fps, fps, constant)
    return _Timeline(origin, None, fps, constant)


def _scan_packets(container, stream, fps: float, origin: float) -> _Timeline:
    """No declared duration (live WebM, raw elementary streams, ...): read the packets once, without
    decoding them, for the last timestamp or, where packets carry none, the frame count."""
    tb, count, last = stream.time_base, 0, None
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        count += 1
        if packet.pts is not None:
            end = float(packet.pts * tb) + (float(packet.duration * tb) if packet.duration else 1.0 / fps)
            last = end if last is None else max(last, end)
    if last is not None:
        return _Timeline(origin, max(last - origin, 1.0 / fps), fps, False, declared=False)
    return _Timeline(0.0, max(count, 1) / fps, fps, True, timed=False, declared=False)


def _video_stream(container, uri: str):
    """The first video stream that is a video: a cover picture attached to audio is not one."""
    import av

    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        cover = " (its only picture is the cover art of an audio file)" if container.streams.video else ""
        raise MediaError("no_video_stream", f"{uri} has no video stream{cover}: audio only?")
    return videos[0]


def decode_video(f, uri: str, num_frames: int, start_s: float | None, end_s: float | None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, video_resize: dict | None = None,
                 max_memory_bytes: int | None = None, at_s: list[float] | None = None) -> Decoded:
    check_mp4_tables(f, uri, max_memory_bytes)  # before FFmpeg builds the index in memory
    with _Source(f, uri, max_pixels) as source:
        # No frame threading: each seek flushes its pipeline of frames decoded ahead, and the
        # benchmarks measured it slower here; decoders run side by side, one per worker, instead.
        ctx = source.stream.codec_context
        check_pixels(uri, ctx.width, ctx.height, max_pixels)
        if max_memory_bytes:
            check_frames_fit(uri, ctx.width * ctx.height, num_frames, video_resize, max_memory_bytes)
        check_not_truncated(f, uri, source.stream)
        timeline = _timeline(source.container, source.stream)
        if timeline.duration is None:
            timeline = _scan_packets(source.container, source.stream, timeline.fps, timeline.origin)
            source.reopen()
        start = float(start_s or 0.0)
        end = min(float(end_s), timeline.duration) if end_s is not None else timeline.duration
        if start >= end:
            raise MediaError("invalid_clip_window", f"clip window [{start}, {end_s}] s is outside the video "
                                                    f"({timeline.duration:.3f} s long); fix start_s/end_s")
        frames, times, decoded = _sample_window(source, timeline, start, end, num_frames, max_pixels,
                                                video_resize, max_memory_bytes, at_s)
        return Decoded("video", np.stack(_same_size(frames)), source.width, source.height,
                       source.stream.codec_context.name, timestamps_s=[t - timeline.origin for t in times],
                       duration_s=timeline.duration, fps=timeline.fps, decoded_frames=decoded)


def _sample_window(source, timeline: _Timeline, start: float, end: float, num_frames: int, max_pixels: int,
                   video_resize: dict | None, max_memory_bytes: int | None, at_s: list[float] | None = None):
    """Sample the window (or take the frames at `at_s`); where the decodable frames span less of it
    than the container declares (a TS segment that opens on frames referring to a keyframe it lacks, a container duration that
    counts an audio tail), sample the span the frames cover instead, once."""
    import av

    uri, fps, decoded = source.uri, timeline.fps, 0
    origin = timeline.origin
    for _ in range(2):
        if at_s is not None:
            targets = np.asarray(at_s, dtype=float) + origin
        else:
            targets = sample_targets(start, end, fps, num_frames, timeline.constant_rate) + origin
        sampler = _Sampler(source, timeline, max_pixels, video_resize)
        try:
            frames, times, cost = sampler.sample(targets)
        except av.FFmpegError as e:
            ctx = source.stream.codec_context
            check_pixels(uri, ctx.width, ctx.height, max_pixels)  # FFmpeg refused a frame over the budget
            if isinstance(e, MemoryError) or (max_memory_bytes and e.errno == errno.EAGAIN):
                raise out_of_memory(uri, max_memory_bytes) from e  # (EAGAIN: no memory for a thread's stack)
            at = f" at {sampler.cur[0] - origin:.3f} s" if sampler.cur else ""
            raise MediaError("undecodable", f"decoding {uri} failed{at} ({e}): the file is corrupt; "
                                            "re-encode or re-upload it") from e
        decoded += cost
        if not frames:  # a header that declares a video without its data: cut short, or an fMP4 init segment
            declared = f"although it declares {timeline.duration:.3f} s " if timeline.declared else ""
            raise MediaError("truncated" if timeline.declared else "undecodable",
                             f"{uri} holds no decodable video frame {declared}(a header without its media data, "
                             "e.g. an fMP4 init segment alone?); upload the complete file")
        if at_s is not None:
            return frames, times, decoded
        first, reached = sampler.first_time, sampler.end_time
        # The stream's own duration (MP4's track header) is exact; a container's covers every stream.
        slack = 2.0 / fps if timeline.exact_duration else max(2.0 / fps, 0.5, 0.05 * (end - start))
        if reached is not None and reached < origin + end - slack:
            raise MediaError("truncated", f"{uri} ends at {reached - origin:.3f} s although it declares "
                                          f"{timeline.duration:.3f} s: the file is truncated; re-upload it complete")
        late_start = start == 0 and first is not None and first > origin + 2.0 / fps
        early_end = reached is not None and targets[-1] > reached
        if len(frames) == num_frames and not late_start and not early_end:
            return frames, times, decoded
        if late_start:
            end, origin = end - (first - origin), first
        if early_end:
            end = reached - origin
        source.reopen()
    raise MediaError("truncated", f"{uri}: only {len(frames)} of {num_frames} frames could be decoded; "
                                  "the file is truncated or corrupt: re-upload it complete")


class _Source:
    """The open container and its video stream; reopened to start again from the first byte
    (containers without an index cannot seek back to their start reliably, raw streams not at all)."""

    def __init__(self, f, uri: str, max_pixels: int):
        self.f, self.uri, self.max_pixels = f, uri, max_pixels
        self.container = self.stream = None
        self.width = self.height = None  # of the first frame, upright, before any resize
        self.reopen()

    def reopen(self) -> None:
        import av

        self.close()
        self.f.seek(0)
        self.fresh = True  # nothing demuxed yet: decoding starts at the first byte
        try:
            # No protocols for nested opens: a playlist or concat list in the input (HLS, ffconcat, ...)
            # must not make FFmpeg read local files or URLs on the worker.
            self.container = av.open(self.f, mode="r", options={"protocol_whitelist": "none"})
        except (av.FFmpegError, ValueError) as e:
            if getattr(e, "errno", None) == errno.ENOMEM:  # its index or headers did not fit the decoder's memory
                raise out_of_memory(self.uri, None) from e
            if mp4_box_overruns(self.f):
                raise MediaError("truncated", f"{self.uri} is an MP4/MOV file cut short (its last box runs past "
                                              "the end of the file); re-upload it complete") from e
            raise MediaError("undecodable", f"{self.uri} is neither an image nor a video FFmpeg can open ({e})") from e
        try:
            self.stream = _video_stream(self.container, self.uri)
            if self.stream.codec_context is None:  # FFmpeg knows the container but has no decoder for the codec
                raise MediaError("unsupported_codec", f"{self.uri}: FFmpeg has no decoder for its video codec; "
                                                      "re-encode it to H.264, HEVC, VP9 or AV1")
            # FFmpeg itself refuses to allocate a frame over the budget (a stream whose size changes
            # mid-stream): the header check cannot see those frames.
            self.stream.codec_context.options = {"max_pixels": str(self.max_pixels)}
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Codecs whose FFmpeg decoders drop only frames that no other frame refers to when asked (H.264's
# nal_ref_idc == 0, HEVC's sub-layer non-reference pictures): skipping them leaves the rest exact.
_SKIPS_NON_REFERENCE = ("h264", "hevc")


class _Sampler:
    """Frames nearest to each target time (absolute stream seconds) and how many were decoded.

    Seek only where it saves work: the container's index (MP4's sample table, Matroska's cues)
    says where the keyframes are, and a seek lands on the last one before the target. When that
    keyframe is not past the current position, decoding on is cheaper. Without an index we seek
    for every target until a seek lands behind the current position, then decode on.

    A seek that yields no frame, or only frames after its target (MPEG-TS and FLV land on the
    next keyframe, or nowhere, when none precedes the target), is retried from earlier and
    earlier positions, and at last from the first byte; streams without timestamps (raw H.264,
    HEVC) are decoded forward from the start, frame k shown at k / fps.

    On the way to a target, frames no other frame refers to (most B-frames) are not decoded
    unless they are shown within two frame intervals of it: only those can be the nearest frame.
    Where the nearest frame found is further off than that (a gap in the stream), the stretch is
    decoded again in full, so the choice is always the one a full decode would make.
    """

    EPS = 1e-6  # seconds: float noise between a target and the frame time it names

    def __init__(self, source: _Source, timeline: _Timeline, max_pixels: int, video_resize: dict | None):
        self.source, self.timeline = source, timeline
        self.max_pixels, self.video_resize = max_pixels, video_resize
        stream = source.stream
        self.seconds = float(stream.time_base)  # float math: Fraction arithmetic per index entry is slow
        self.keys = sorted(e.timestamp * self.seconds for e in stream.index_entries if e.is_keyframe)
        self.seek_blind = timeline.timed and not self.keys
        self.margin = 2.0 / timeline.fps
        self.can_skip = stream.codec_context.name in _SKIPS_NON_REFERENCE
        self.skip_before = float("-inf")  # packets shown before this time may skip non-reference frames
        self.skipped = False  # some packet since the last seek was sent with skipping on
        self.decoded = 0
        self.it = self.prev = self.cur = None  # decoder iterator; the last two decoded frames as (time, frame)
        self.index = 0  # frames decoded since the first byte (the time of an untimed frame)
        self.from_start = False  # decoding from the first byte (not from a seek)
        self.first_time = None  # of the first frame decoded from the first byte
        self.end_time = None  # where the last frame ends, once the stream ran out

    def _decode_from_here(self):
        self.source.fresh = False
        ctx, skipping = self.source.stream.codec_context, None
        for packet in self.source.container.demux(self.source.stream):
            skip = packet.pts is not None and packet.pts * self.seconds < self.skip_before
            if skip != skipping:
                ctx.skip_frame, skipping = ("NONREF" if skip else "DEFAULT"), skip
            self.skipped |= skip
            yield from packet.decode()

    def _restart(self, at: float | None) -> bool:
        """Decode from a seek to `at` (None: from the first byte) up to the first frame."""
        import av

        self.from_start = at is None
        if at is None:
            if not self.source.fresh:
                self.source.reopen()
            self.index = 0
        else:
            try:
                self.source.container.seek(int((at + self.EPS) / self.seconds), stream=self.source.stream,
                                           backward=True, any_frame=False)
            except av.FFmpegError:
                return False  # e.g. FLV before its first tag: try from earlier, at last from the start
        self.it, self.prev, self.cur, self.skipped = self._decode_from_here(), None, None, False
        return self.advance()

    def seek(self, target: float) -> bool:
        """Start decoding at or before the target's frame. A seek lands on the last keyframe
        *decoded* before the target; with B-frames that keyframe can be shown after it, and then
        the target's frame is in the interval before: back up one keyframe (or further)."""
        origin = self.timeline.origin
        if self.timeline.timed and target > origin + self.margin:
            at, step = target, 1.0
            while at >= origin:
                if self._restart(at) and self.cur[0] <= target + self.EPS:
                    return True
                if self.keys:
                    i = bisect.bisect_right(self.keys, at + self.EPS) - 1
                    if i <= 0:
                        break
                    at = self.keys[i - 1]
                else:
                    at, step = target - step, step * 2
            if not self.keys:
                self.seek_blind = False  # seeks here land after their targets: decode on instead
        return self._restart(None)

    def advance(self) -> bool:
        frame = next(self.it, None)
        if frame is None:
            if self.cur is not None:
                t, last = self.cur
                shown = float(last.duration * last.time_base) if last.duration and last.time_base else 0.0
                self.end_time = t + max(shown, 1.0 / self.timeline.fps)
            return False
        self.decoded += 1
        self.index += 1
        if frame.width * frame.height > self.max_pixels:  # bigger than the header said
            check_pixels(self.source.uri, frame.width, frame.height, self.max_pixels)
        if not self.timeline.timed:
            t = (self.index - 1) / self.timeline.fps
        elif frame.time is not None:
            t = float(frame.time)
        else:
            t = self.cur[0] + 1e-6 if self.cur else self.timeline.origin
        if self.index == 1 and self.from_start:
            self.first_time = t
        self.prev, self.cur = self.cur, (t, frame)
        return True

    def nearest(self, target: float):
        while self.cur[0] < target - self.EPS and self.advance():
            pass
        prev, cur = self.prev, self.cur
        return cur if prev is None or abs(cur[0] - target) <= abs(prev[0] - target) else prev

    def sample(self, targets: np.ndarray):
        frames, times = [], []
        for target in targets:
            self.skip_before = target - self.margin if self.can_skip else float("-inf")
            if self.it is None:
                need_seek = True
            elif target <= self.cur[0] + self.EPS:
                need_seek = False  # already there (targets closer together than frames)
            elif self.keys:
                i = bisect.bisect_right(self.keys, target + self.EPS) - 1
                need_seek = i >= 0 and self.keys[i] > self.cur[0]
            else:
                need_seek = self.seek_blind
            if need_seek:
                position = self.cur[0] if self.cur else None
                if not self.seek(target):
                    break
                if not self.keys and position is not None and self.cur[0] <= position:
                    self.seek_blind = False  # seeks land behind us: decode on from here
            best = self.nearest(target)
            if self.skipped and abs(best[0] - target) > self.margin:
                self.skip_before = float("-inf")  # a skipped frame may have been nearer: decode it all
                if not self.seek(target):
                    break
                best = self.nearest(target)
            times.append(best[0])
            frames.append(self._output(best[1]))
        return frames, times, self.decoded

    def _output(self, frame) -> np.ndarray:
        rgb = _upright_rgb(frame)
        if self.source.width is None:
            self.source.height, self.source.width = rgb.shape[:2]
        if self.video_resize:  # each frame as it comes: only small frames are ever held
            rgb = resize_frames(rgb[None], **self.video_resize)[0]
        return rgb


def _same_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """A stream whose size changes mid-stream (within the budget): later frames are scaled to the
    first one's size, so the frames stack into one array as the processors expect."""
    from PIL import Image

    height, width = frames[0].shape[:2]
    return [f if f.shape[:2] == (height, width)
            else np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames]


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

