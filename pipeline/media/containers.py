"""Container guards: what an MP4/MOV's boxes declare, read from their headers before FFmpeg opens
the file (index bombs, encryption, files cut short), and what the asked-for frames will cost."""

from __future__ import annotations

from pipeline.media.decoded import MediaError

# Bytes FFmpeg's MP4 demuxer holds per declared sample (index entry, size, timing, with headroom):
# what a sample table costs in memory before a single frame is decoded.
_INDEX_BYTES_PER_SAMPLE = 64
_MP4_CONTAINERS = (b"moov", b"trak", b"mdia", b"minf", b"stbl")


def _mp4_boxes(f, start: int, end: int):
    """(type, payload start, box end) of the boxes in [start, end): headers only, no payloads read.
    The box end is what its header declares, which may lie past `end` (a file cut short); a box
    of length 0 extends to `end`. Stops at a header too short to read or a length below its header's."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        header = f.read(16)
        if len(header) < 8:
            return
        length, kind = int.from_bytes(header[:4], "big"), header[4:8]
        body = pos + 8
        if length == 1 and len(header) == 16:
            length, body = int.from_bytes(header[8:16], "big"), pos + 16
        elif length == 0:
            length = end - pos
        if length < body - pos:
            return
        yield kind, body, pos + length
        pos += length


def _mp4_tables(f, start: int, end: int, found: dict, depth: int = 0) -> None:
    """Walk the boxes under [start, end) (headers only): samples the sample tables (stsz/stz2)
    declare, summed over the tracks, and the sample entry types (avc1, encv, ...)."""
    for kind, body, box_end in _mp4_boxes(f, start, end):
        box_end = min(box_end, end)
        if kind in _MP4_CONTAINERS and depth < 6:
            _mp4_tables(f, body, box_end, found, depth + 1)
        elif kind in (b"stsz", b"stz2"):
            f.seek(body + 8)  # version/flags, then sample size (stsz) or reserved + field size (stz2)
            found["samples"] += int.from_bytes(f.read(4), "big")
        elif kind == b"stsd":
            found["entries"] += [entry for entry, _, _ in _mp4_boxes(f, body + 8, box_end)]


def _starts_with_a_box(head: bytes) -> bool:
    """The first 8 bytes read as an ISO-BMFF box header: a length (0: to the end, 1: 64-bit, else at
    least the header) and a type of four printable characters."""
    if len(head) < 8:
        return False
    length = int.from_bytes(head[:4], "big")
    return (length in (0, 1) or length >= 8) and all(0x20 <= c <= 0x7e for c in head[4:8])


def check_mp4_tables(f, uri: str, max_memory_bytes: int | None) -> None:
    """An MP4/MOV whose sample tables declare more samples than the decoder's memory can index
    (a few KB can declare billions) is rejected before FFmpeg allocates the index; an encrypted
    one (CENC: FFmpeg decodes it to garbage without the key) before anything is decoded."""
    f.seek(0)
    head = f.read(8)
    found = {"samples": 0, "entries": []}
    size = f.seek(0, 2)
    if _starts_with_a_box(head):  # any first box (ftyp, moov, but also skip, uuid, free, ...): FFmpeg takes them all
        for kind, body, end in _mp4_boxes(f, 0, size):
            if kind == b"moov":
                _mp4_tables(f, body, min(end, size), found)
    f.seek(0)
    if b"encv" in found["entries"]:
        raise MediaError("unsupported_codec", f"{uri} is encrypted (CENC/DRM): its frames cannot be decoded "
                                              "without the key; give the decrypted file")
    if found["samples"] > size:  # every sample holds at least one byte of the file
        raise MediaError("too_large", f"{uri} declares {found['samples']:,} samples in its index but holds only "
                                      f"{size:,} bytes; the index is corrupt or crafted (FFmpeg would build it in "
                                      "memory first): re-encode the file")
    needed = found["samples"] * _INDEX_BYTES_PER_SAMPLE
    if max_memory_bytes and needed > max_memory_bytes // 2:
        raise MediaError("too_large", f"{uri} declares {found['samples']:,} samples in its index, which alone would "
                                      f"take {needed / 2**30:.1f} GiB of the decoder's {max_memory_bytes / 2**30:.1f} "
                                      "GiB memory limit; the file is corrupt or crafted: re-encode it")


def check_frames_fit(uri: str, pixels: int, num_frames: int, video_resize: dict | None, max_memory_bytes: int):
    """The frames asked for, held as RGB and copied once into the reply, must fit the memory limit."""
    kept = video_resize["height"] * video_resize["width"] if video_resize else pixels
    needed = num_frames * kept * 3 * 2 + pixels * 3 * 4  # + the frames being decoded and converted
    if needed > max_memory_bytes:
        raise MediaError("too_large", f"{num_frames} frames of {uri} need about {needed / 2**30:.1f} GiB, over the "
                                      f"decoder's memory limit of {max_memory_bytes / 2**30:.1f} GiB; lower "
                                      "num_frames or max_pixels, or raise decoder_memory_gb")


def mp4_box_overruns(f) -> bool:
    """True for an ISO-BMFF file (ftyp first) whose top-level boxes run past its end."""
    size = f.seek(0, 2)
    f.seek(0)
    if f.read(8)[4:8] != b"ftyp":
        return False
    return any(box_end > size for _, _, box_end in _mp4_boxes(f, 0, size))


def check_not_truncated(f, uri: str, stream):
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
