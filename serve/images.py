"""Images in and out of the HTTP API: base64 PNGs with their A1111 metadata, and base64 uploads (raw or data: URLs)
decoded upright under the server's pixel limit."""

from __future__ import annotations

import base64
import io

from sdtrt.errors import UsageError


def png_b64(image, parameters: str, fmt: str = "PNG") -> str:
    """``image`` with its ``parameters`` as base64 (PNG; JPEG or WEBP for A1111's samples_format)."""
    from sdtrt.runtime.infotext import write_image

    buf = io.BytesIO()
    write_image(image, buf, parameters, fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str, label: str, max_pixels: int):
    """A base64 image (A1111 clients send raw base64 or a data: URL) as an upright PIL image, or a UsageError: its
    size is read from the header and held to the server's pixel limit before any pixel is decoded."""
    from sdtrt.runtime.images import open_image

    if not isinstance(data, str) or not data:
        raise UsageError(f"{label} must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise UsageError(f"{label} is not valid base64") from None
    return open_image(io.BytesIO(raw), label, max_pixels)
