"""Encoding generated PIL images for HTTP answers: the one encoder of every route (PNG, JPEG or WebP bytes,
and base64 strings), and the reader of what it embeds. The SageMaker archive carries it beside
serving/invocations.py, so it imports nothing but the standard library and PIL.

An image carries its recipe (serving/recipes.py) as ``metadata``: a PNG as text chunks, one per key; a
JPEG or WebP in EXIF, the ``parameters`` infotext in UserComment (as AUTOMATIC1111 writes it) and the
``txt2img`` JSON in ImageDescription (ASCII, as EXIF wants it there).
"""

from __future__ import annotations

import base64
import io
import json
import struct

PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's infotext
RECIPE_KEY = "txt2img"  # the recipe's JSON
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
IMAGE_DESCRIPTION = 0x010E
UNICODE_PREFIX = b"UNICODE\0"  # EXIF's character code for a UTF-16 UserComment
EXIF_FORMATS = ("JPEG", "WEBP")


def image_bytes(image, image_format: str, quality: int | None = None, metadata: dict[str, str] | None = None) -> bytes:
    """``image`` as RGB in ``image_format``; ``quality`` for JPEG and WebP, ``metadata`` embedded as the
    format allows (PNG text chunks, or EXIF)."""
    options: dict = {} if quality is None else {"quality": quality}
    image_format = image_format.upper()
    if metadata and image_format == "PNG":
        options["pnginfo"] = png_text_chunks(metadata)
    elif metadata and image_format in EXIF_FORMATS:
        options["exif"] = exif_block(metadata)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format, **options)
    return buffer.getvalue()


def image_base64(image, image_format: str, quality: int | None = None, metadata: dict[str, str] | None = None) -> str:
    return base64.b64encode(image_bytes(image, image_format, quality, metadata)).decode("ascii")


def png_text_chunks(metadata: dict[str, str]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)  # tEXt, as A1111 writes it; PIL makes it iTXt (UTF-8) beyond Latin-1
    return info


def exif_block(metadata: dict[str, str]) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    if PARAMETERS_KEY in metadata:
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + metadata[PARAMETERS_KEY].encode("utf-16-be")
    if RECIPE_KEY in metadata:
        exif[IMAGE_DESCRIPTION] = json.dumps(json.loads(metadata[RECIPE_KEY]), ensure_ascii=True)
    return exif.tobytes()


def image_metadata(data: bytes) -> dict[str, str] | None:
    """What an image's bytes carry: its PNG text chunks, or its EXIF records under the keys
    ``image_bytes`` took; None when the bytes are no image PIL reads."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "PNG":
            return {key: value for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
        return exif_metadata(image.getexif())
    # What PIL raises for bytes that are no image, a broken one or a decompression bomb.
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError):
        return None


def exif_metadata(exif) -> dict[str, str]:
    found = {}
    comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes):
        found[PARAMETERS_KEY] = user_comment_text(comment)
    if isinstance(exif.get(IMAGE_DESCRIPTION), str):
        found[RECIPE_KEY] = exif[IMAGE_DESCRIPTION]
    return found


def user_comment_text(comment: bytes) -> str:
    """An EXIF UserComment's text: UTF-16 after ``UNICODE\\0`` (big-endian, as written here and by A1111),
    else ASCII after its 8-byte character code."""
    if comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX) :].decode("utf-16-be", errors="replace")
    return comment[8:].decode("ascii", errors="replace")
