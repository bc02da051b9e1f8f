"""Generated images kept in memory for a while, so a client can fetch them by URL.

OpenAI's ``response_format: "url"`` answers with links instead of the images. This store holds
each image for ``ttl_s`` seconds (an hour, as long as OpenAI's own links last) and at most
``max_bytes`` in all, dropping the oldest first; a link past either bound answers 404.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

IMAGE_TTL_S = 3600
IMAGE_STORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float


class ImageFiles:
    """Encoded images by unguessable name. Used from the service's event loop only (async routes), so no lock."""

    def __init__(self, ttl_s: float = IMAGE_TTL_S, max_bytes: int = IMAGE_STORE_BYTES):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, StoredImage] = OrderedDict()  # oldest first
        self._bytes = 0

    def add(self, data: bytes, image_format: str) -> str:
        """Keep ``data`` (a PNG, JPEG or WebP) and return its file name, e.g. ``"3q2-...Zw.png"``."""
        name = f"{secrets.token_urlsafe(24)}.{image_format}"
        self._images[name] = StoredImage(data, f"image/{image_format}", time.monotonic() + self.ttl_s)
        self._bytes += len(data)
        self._drop_old()
        return name

    def get(self, name: str) -> StoredImage | None:
        self._drop_old()
        return self._images.get(name)

    def _drop_old(self) -> None:
        now = time.monotonic()
        while self._images:
            oldest = next(iter(self._images.values()))
            if oldest.expires > now and self._bytes <= self.max_bytes:
                break
            _, dropped = self._images.popitem(last=False)
            self._bytes -= len(dropped.data)
