"""Encoding generated PIL images for HTTP answers: the one encoder of every route (PNG, JPEG or WebP bytes,
and base64 strings). The SageMaker archive carries it beside serving/invocations.py, so it imports
nothing but the standard library and PIL."""

from __future__ import annotations

import base64
import io


def image_bytes(image, image_format: str, quality: int | None = None, png_text: dict[str, str] | None = None) -> bytes:
    """``image`` as RGB in ``image_format``; ``quality`` for JPEG and WebP, ``png_text`` as PNG text chunks."""
    options: dict = {} if quality is None else {"quality": quality}
    if png_text:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for key, value in png_text.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def image_base64(image, image_format: str, quality: int | None = None, png_text: dict[str, str] | None = None) -> str:
    return base64.b64encode(image_bytes(image, image_format, quality, png_text)).decode("ascii")
