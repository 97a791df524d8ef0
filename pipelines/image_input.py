"""Images sent in a request (img2img init images, masks, ControlNet unit images).

Pure Python + Pillow (no torch): the HTTP process decodes and checks every image
before queueing, so a bad image is a 422 naming the field at once, and the worker
receives plain PNG bytes it can trust.

A1111 clients send base64, with or without a ``data:image/...;base64,`` prefix.
Pillow's own decompression-bomb guard is not enough on its own (it only warns
below twice its limit), so the pixel count is checked against ``max_pixels``
from the header, before the pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from pipelines.errors import InvalidParameter

# base64 text can be at most this many times the decoded size (+ slack); a body far
# larger than any image the pixel limit allows is refused before decoding.
_B64_RATIO = 4 / 3


def decode_image_b64(value: object, *, field: str, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Decode a base64 (or data-URL) image; the result is loaded, RGB or RGBA or L as sent.

    Raises :class:`InvalidParameter` naming ``field`` when the value is not a string,
    not base64, not an image, or has more than ``max_pixels`` pixels.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameter(f"{field}: must be a base64-encoded image", field=field)
    text = value.strip()
    if text.startswith(("s3://", "file://")):
        raise InvalidParameter(f"{field}: image locations (s3://, file://) are taken in the envelope's payload only; "
                               "send base64 here", field=field)
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidParameter(f"{field}: a data URL must be base64 ('data:image/png;base64,...')", field=field)
    if max_bytes is not None and len(text) > max_bytes * _B64_RATIO + 16:
        raise InvalidParameter(f"{field}: image data is larger than {max_bytes} bytes", field=field)
    try:
        # line breaks are common in pasted base64; anything else outside the alphabet is an error
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(f"{field}: not valid base64", field=field) from None
    return decode_image_bytes(raw, field=field, max_pixels=max_pixels)


def decode_image_bytes(raw: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """Open image bytes safely (pixel limit checked from the header before decoding)."""
    if not raw:
        raise InvalidParameter(f"{field}: empty image", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidParameter(
                    f"{field}: image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
                    field=field,
                )
            image.load()
    except InvalidParameter:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParameter(f"{field}: image has more pixels than the limit of {max_pixels} (decompression bomb guard)", field=field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidParameter(f"{field}: not a decodable image ({type(exc).__name__})", field=field) from None
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def to_png_bytes(image: Image.Image) -> bytes:
    """Lossless bytes to ship an image across the process boundary."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def from_png_bytes(data: bytes) -> Image.Image:
    """The inverse of :func:`to_png_bytes` (bytes we produced ourselves)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
