"""Images: Pillow, the pixels as a viewer shows them, cut-short and crafted files told apart."""

from __future__ import annotations

import numpy as np

from pipeline.media.decoded import DEFAULT_MAX_PIXELS, Decoded, MediaError, check_pixels


def decode_image(f, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget decides
            with Image.open(f) as img:  # reads the header only
                check_pixels(uri, *img.size, max_pixels)
                fmt = (img.format or "image").lower()
                img.load()  # here a file cut short raises, not later
                if fmt in ("jpeg", "mpo"):
                    _check_jpeg_scan(f, uri, img)
                img = ImageOps.exif_transpose(img)
                rgb = _rgb8(img)
    except Image.DecompressionBombError as e:
        raise MediaError("too_large", f"{uri} declares an image too large to decode safely ({e}); "
                                      "the file is corrupt or crafted") from e
    except UnidentifiedImageError as e:
        raise _unreadable_image(f, uri) from e
    except (OSError, ValueError, SyntaxError) as e:
        if "truncated" in str(e):
            raise MediaError("truncated", f"{uri} is an image cut short ({e}); re-upload it complete") from e
        raise MediaError("undecodable", f"{uri} is not a readable image ({e})") from e
    height, width = rgb.shape[:2]
    return Decoded("image", rgb[None], width, height, fmt, decoded_frames=1)


def _rgb8(img) -> np.ndarray:
    """8-bit RGB as a viewer shows it: transparency flattened onto white, 16-bit samples scaled
    (Pillow's own conversion clips them: a 16-bit grey image would come out white)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img).astype(np.uint32)
        return np.repeat((np.clip(grey, 0, 65535) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"))


def _unreadable_image(f, uri: str) -> MediaError:
    """Pillow cannot read it: say why where we know (formats Pillow has no decoder for)."""
    f.seek(0)
    head = f.read(64 * 1024)
    f.seek(0)
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        return MediaError("unsupported_codec", f"{uri} is a HEIC/HEIF image, which has no decoder here; "
                                               "convert it to JPEG, PNG or AVIF")
    sof = max(head.find(b"\xff\xc1"), head.find(b"\xff\xc2"))  # extended or progressive frame header
    if head.startswith(b"\xff\xd8") and sof > 0 and head[sof + 4:sof + 5] == b"\x0c":  # sample precision 12
        return MediaError("unsupported_codec", f"{uri} is a 12-bit JPEG, which Pillow cannot read; "
                                               "convert it to an 8-bit JPEG or a 16-bit PNG")
    return MediaError("undecodable", f"{uri} is not an image Pillow can read (unknown or unsupported format)")


def _check_jpeg_scan(f, uri: str, img) -> None:
    """A JPEG whose entropy-coded data is shorter than one bit per 8x8 block cannot hold its image:
    libjpeg fills what is missing with grey and only warns, so Pillow returns it as fine."""
    f.seek(0)
    data = f.read()
    f.seek(0)
    scan, pos = 0, data.find(b"\xff\xda")
    while pos >= 0:
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body = pos + 2 + length
        nxt = body
        while True:  # the scan ends at the first marker that is not a stuffed 0xff00 or a restart
            nxt = data.find(b"\xff", nxt)
            if nxt < 0 or nxt + 1 >= len(data):
                nxt = len(data)
                break
            if data[nxt + 1] == 0 or 0xd0 <= data[nxt + 1] <= 0xd7:
                nxt += 2
                continue
            break
        scan += nxt - body
        pos = data.find(b"\xff\xda", nxt)
    blocks = sum(-(-img.size[0] // 8) * -(-img.size[1] // 8) for _ in img.getbands()) // 2  # chroma subsampled
    if scan * 8 < blocks:
        raise MediaError("truncated", f"{uri} is a JPEG whose image data is missing ({scan} bytes for "
                                      f"{img.size[0]}x{img.size[1]} pixels); re-upload it complete")

