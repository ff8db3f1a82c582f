"""What a decode produces, and how it fails: the types every media module and the decoder process share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


DEFAULT_MAX_PIXELS = 40_000_000  # per image or video frame; checked from the header, before decoding


def check_pixels(uri: str, width: int, height: int, max_pixels: int):
    if width * height > max_pixels:
        raise MediaError("too_large", f"{uri} is {width}x{height} = {width * height:,} pixels, over the budget of "
                                      f"{max_pixels:,}; raise max_pixels (--max-pixels) if this is intended")


def out_of_memory(uri: str, max_memory_bytes: int | None) -> MediaError:
    limit = f" ({max_memory_bytes / 2**30:.1f} GiB)" if max_memory_bytes else ""
    return MediaError("too_large", f"decoding {uri} needed more memory than the decoder's limit{limit}; the file "
                                   "is very large or crafted: lower max_pixels or num_frames, or raise decoder_memory_gb")

