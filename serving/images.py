"""Encoding generated PIL images for HTTP answers: PNG/JPEG bytes, base64 strings and RGB arrays."""

from __future__ import annotations

import base64
import io


def image_bytes(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper())
    return buffer.getvalue()


def image_base64(image, image_format: str) -> str:
    return base64.b64encode(image_bytes(image, image_format)).decode("ascii")


def image_rgb_array(image) -> list:
    """The image as nested height x width x 3 lists of 0-255 ints, as JumpStart's application/json answers."""
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8).tolist()
