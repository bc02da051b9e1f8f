"""Encoding generated PIL images for HTTP answers: PNG/JPEG bytes and base64 strings."""

from __future__ import annotations

import base64
import io


def image_bytes(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper())
    return buffer.getvalue()


def image_base64(image, image_format: str) -> str:
    return base64.b64encode(image_bytes(image, image_format)).decode("ascii")
