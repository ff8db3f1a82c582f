"""Fetch + decode: URI -> RGB frames. Transport (pipeline.io.storage) stays apart from decoding
(pipeline.media.image with Pillow, pipeline.media.video with PyAV); the media type is read from the
bytes, not from the name."""

from __future__ import annotations

import base64
import binascii
import io
import os
import sys

from pipeline.config import StorageConfig
from pipeline.io.storage import open_binary, protocol_of
from pipeline.media.decoded import DEFAULT_MAX_PIXELS, Decoded, MediaError
from pipeline.media.image import decode_image
from pipeline.media.video import decode_video

# Magic numbers of the containers we expect; anything else is tried with both decoders.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# (Matroska, FLV, MPEG-PS, Ogg, MPEG-1/2 video, raw H.264/HEVC Annex B, ASF, MXF)
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"FLV", b"\x00\x00\x01\xba", b"OggS", b"\x00\x00\x01\xb3", b"\x00\x00\x00\x01",
                b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", b"\x06\x0e\x2b\x34\x02\x05\x01\x01")


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


def fetch_and_decode(uri: str, storage: StorageConfig, declared_type: str | None, num_frames: int,
                     start_s: float | None = None, end_s: float | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, video_resize: dict | None = None,
                     max_memory_bytes: int | None = None, at_s: list[float] | None = None,
                     allowed_prefixes: list[str] | None = None, data_urls: bool = False,
                     max_bytes: int | None = None, label: str | None = None) -> Decoded:
    """Open the URI (ranged reads, no full copy), detect the media type from content, decode:
    the one fetch + decode of the batch job, the online server and the report (each in the
    decoder child, pipeline.media.decoder_process). Which URIs may be fetched at all is the URL
    rules' decision (pipeline.io.urls), taken before this is called.
    `at_s`: instead of sampling, the frames shown at these times (a run's frame_timestamps_s).
    `video_resize` (see `resize_frames`) resizes video frames here, before they leave the decoder.
    `max_memory_bytes`: the decoder process's memory limit; media that declare more are refused first.
    `allowed_prefixes`: a local file is checked again once open (the driver checked its name).
    `data_urls`: a `data:` URI is decoded from memory (the server's inline media); else it is refused.
    `max_bytes`: the largest file fetched (`media_too_large` past it), held while reading when
    the store declares no size; a data: URL is bounded by its request instead.
    `label`: the media's name in messages (default: the URI; a data: URL is never echoed)."""
    name = label or ("the data: URL" if uri.startswith("data:") else uri)
    f = _WatchedFile(_open(uri, name, storage, allowed_prefixes, data_urls, max_bytes))
    with f:
        try:
            return decode_file(f, name, declared_type, num_frames, start_s, end_s, max_pixels, video_resize,
                               max_memory_bytes, at_s)
        except (MediaError, OSError) as e:
            if f.error is None:
                raise
            # the store failed mid-read (retries exhausted): not the file's fault
            raise _fetch_failed(name, f.error) from e


def _open(uri: str, name: str, storage: StorageConfig, allowed_prefixes: list[str] | None, data_urls: bool,
          max_bytes: int | None):
    """A seekable binary file for the URI, transport errors classified."""
    from pipeline.io.urls import URLRejected, open_local_checked

    if uri.startswith("data:"):
        if not data_urls:
            raise MediaError("uri_not_allowed", f"{name}: data: URLs are not accepted here; put the media in "
                                                "storage and give its uri")
        return _data_url(uri)
    try:
        if allowed_prefixes is not None and protocol_of(uri) == "file":
            f = open_local_checked(uri.removeprefix("file://"), allowed_prefixes)
        else:
            f = open_binary(uri, storage)
    except URLRejected as e:
        raise MediaError("uri_not_allowed", f"{name} is not allowed once opened: {e}; if this source is trusted, "
                                            "pass --allow-uri-prefix with its folder") from e
    except OSError as e:
        if (refused := _refused(e)) is not None:  # (fsspec reports it as FileNotFoundError: "does not exist" misleads)
            raise MediaError("uri_not_allowed", f"{name} was not fetched: {refused}. Media are read only from public "
                                                "addresses, without redirects: give the media's final public URL") from e
        raise _open_failed(name, e) from e
    return _bounded(f, name, max_bytes)


def _refused(error: BaseException) -> BaseException | None:
    """The pinned connection's refusal (a non-public address, a redirect) behind a transport error:
    fsspec and aiohttp wrap it (FileNotFoundError from it, ClientConnectorError's os_error)."""
    from pipeline.io.pinned_http import AddressRejected

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, AddressRejected):
            return error
        error = error.__cause__ or error.__context__ or getattr(error, "os_error", None)
    return None


def _open_failed(name: str, e: OSError) -> MediaError:
    if isinstance(e, FileNotFoundError):
        return MediaError("not_found", f"{name} does not exist; fix the uri or upload the file")
    if isinstance(e, PermissionError):
        return MediaError("access_denied", f"access to {name} was denied ({e}); check the credentials and bucket policy")
    if isinstance(e, IsADirectoryError):
        return MediaError("not_found", f"{name} is a folder, not a media file; give the uri of a file in it")
    return _fetch_failed(name, e)


def _data_url(uri: str) -> io.BytesIO:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("invalid_data_url", "data: URLs must be base64 (data:TYPE;base64,...)")
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError) as e:
        raise MediaError("invalid_data_url", f"the data: URL is not valid base64 ({e})") from None


def _bounded(f, name: str, max_bytes: int | None):
    """The open file, held to max_bytes. A stream of unknown length (an http(s) answer without
    Content-Length or ranges) cannot be seeked, so it is read into memory here, counting: the
    limit holds as the bytes arrive, and the decoders get a seekable file."""
    http = sys.modules.get("fsspec.implementations.http")  # not imported: f is not one of its files
    if http is None or not isinstance(f, http.HTTPStreamFile):
        if max_bytes is not None and (_size(f) or 0) > max_bytes:
            f.close()
            raise _too_large(name, max_bytes)
        return f
    with f:
        buf, limit = io.BytesIO(), max_bytes if max_bytes is not None else float("inf")
        try:
            while chunk := f.read(_STREAM_CHUNK):
                if buf.tell() + len(chunk) > limit:
                    raise _too_large(name, max_bytes)
                buf.write(chunk)
        except OSError as e:
            raise _fetch_failed(name, e) from e
    buf.seek(0)
    return buf


_STREAM_CHUNK = 1 << 20


def _size(f) -> int | None:
    """The size an open file declares: fsspec's (object stores, http Content-Length), else a local file's."""
    if (size := getattr(f, "size", None)) is not None:
        return size
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return None


def _too_large(name: str, max_bytes: int) -> MediaError:
    return MediaError("media_too_large", f"{name} is larger than {max_bytes} bytes")


def _fetch_failed(name: str, error: Exception) -> MediaError:
    if isinstance(error, PermissionError):
        return MediaError("access_denied", f"reading {name} was denied; check the credentials and bucket policy")
    if isinstance(error, FileNotFoundError):
        return MediaError("not_found", f"{name} disappeared while it was read; upload it again and rerun")
    return MediaError("fetch_failed", f"reading {name} kept failing after retries ({type(error).__name__}: {error}); "
                                      "the store may be throttling or down: try again later (a batch job: rerun "
                                      "with --retry-errors)")


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
                video_resize: dict | None = None, max_memory_bytes: int | None = None,
                at_s: list[float] | None = None) -> Decoded:
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
    return decode_video(f, uri, num_frames, start_s, end_s, max_pixels, video_resize, max_memory_bytes, at_s)


def _is_image(f) -> bool:
    """Pillow identifies the bytes as an image it can load (its MPEG plugin only identifies video)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as img:  # the context manager leaves a caller's file open; close() would not
            return img.format != "MPEG"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False
    finally:
        f.seek(0)

