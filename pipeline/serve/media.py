"""The server's media: a client's URL fetched and decoded in the isolated decoder child process.

The ingress never parses media itself: each prepare thread owns one DecoderProcess (the batch
job's child, pipeline.media.decoder_process) running `python -m pipeline.serve.media`, and waits for it
at most the request's remaining time; an overrun kills the child, so the work stops with the
request. The child runs under the decoder's memory limit (`decoder_memory_gb`, as in the batch
job): a file whose index declares millions of samples fails there instead of growing the ingress.
"""

from __future__ import annotations

import base64
import binascii
import io

from pipeline.config import StorageConfig
from pipeline.media.decoded import Decoded, MediaError
from pipeline.media.fetch import decode_file


def open_url(url: str, label: str, storage: StorageConfig, max_bytes: int):
    """A seekable file for an allowed URL: a data: URL decoded in memory; others opened through
    pipeline.io.storage (ranged reads; http(s) pinned to the checked address, redirects refused)."""
    from pipeline.io.storage import open_binary

    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise MediaError("invalid_data_url", "data: URLs must be base64 (data:TYPE;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError("invalid_data_url", f"the data: URL is not valid base64 ({e})") from None
        return io.BytesIO(data)
    try:
        f = open_binary(url, storage)
    except FileNotFoundError:
        raise MediaError("not_found", f"{label} does not exist") from None
    except PermissionError as e:
        raise MediaError("access_denied", f"{label} may not be read ({e})") from None
    except OSError as e:
        raise MediaError("fetch_failed", f"{label} could not be fetched ({type(e).__name__}: {e})") from None
    if (getattr(f, "size", None) or 0) > max_bytes:
        f.close()
        raise MediaError("media_too_large", f"{label} is larger than {max_bytes} bytes")
    return f


def fetch_and_decode(uri: str, url: str, storage: StorageConfig, max_bytes: int, declared_type: str,
                     num_frames: int, max_pixels: int, max_memory_bytes: int | None = None) -> Decoded:
    """What the child runs per request (see pipeline.media.decoder_process.serve). `uri` is the URL's name
    in messages (never a data: URL itself, which would echo the client's bytes)."""
    label = uri
    with open_url(url, label, storage, max_bytes) as f:
        try:
            return decode_file(f, label, declared_type, num_frames, max_pixels=max_pixels,
                               max_memory_bytes=max_memory_bytes)
        except OSError as e:
            raise MediaError("fetch_failed", f"{label} could not be read ({type(e).__name__}: {e})") from None


if __name__ == "__main__":
    from pipeline.media.decoder_process import serve

    serve(decode=fetch_and_decode)
