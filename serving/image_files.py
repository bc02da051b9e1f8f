"""Generated images kept for a while, so a client can fetch them by URL from any worker of the server.

OpenAI's ``response_format: "url"`` answers with links instead of the images. The link may reach
any of the server's workers (the kernel hands each new connection to one of them), so the images
are files in a folder that ``bentoml serve`` makes for all its workers (``share_image_folder``),
not objects in one worker's memory. Each image is kept ``ttl_s`` seconds (an hour, as long as
OpenAI's own links last) and ``max_bytes`` are kept at most in all, the oldest dropped first; a
link past either bound answers 404.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_TTL_S = 3600
IMAGE_STORE_BYTES = 256 * 2**20
SHARED_FOLDER_ENV = "TXT2IMG_SERVER_IMAGE_FOLDER"  # set by the serving process, read by its workers
SHARED_FOLDER_PREFIX = "txt2img-images-"  # in the temporary folder, one per server: <prefix><host>-<pid>-<random>
# The names ``add`` gives; a requested name must be one, so a URL cannot reach any other file.
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpeg|webp)")


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str


def share_image_folder() -> None:
    """In the ``bentoml serve`` process, make the image folder its workers share; removed when the server exits.

    Workers inherit the serving process's environment, so they find the folder in SHARED_FOLDER_ENV.
    A worker, which imports the service too, changes nothing. The folders of servers killed before
    they could remove their own go when the next server starts.
    """
    import bentoml

    from serving.metrics import _alive

    if bentoml.server_context.worker_index is not None:
        return
    prefix = f"{SHARED_FOLDER_PREFIX}{socket.gethostname()}-"
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = folder.name.removeprefix(prefix).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")  # a new folder of this user's only
    os.environ[SHARED_FOLDER_ENV] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def server_image_folder() -> Path:
    """The folder this server's workers share, or one of this process's own outside ``bentoml serve``."""
    return Path(os.environ.get(SHARED_FOLDER_ENV) or tempfile.mkdtemp(prefix=SHARED_FOLDER_PREFIX))


class ImageFiles:
    """Encoded images by unguessable name, as files in ``folder``; several processes may share one folder."""

    def __init__(self, folder: Path, ttl_s: float = IMAGE_TTL_S, max_bytes: int = IMAGE_STORE_BYTES):
        self.folder = folder
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes

    def add(self, data: bytes, image_format: str) -> str:
        """Keep ``data`` (a PNG, JPEG or WebP) and return its file name, e.g. ``"3q2-...Zw.png"``."""
        name = f"{secrets.token_urlsafe(24)}.{image_format}"
        partial = self.folder / f".{name}.partial"  # not an image name: never served half written
        partial.write_bytes(data)
        os.replace(partial, self.folder / name)
        self._drop_old()
        return name

    def get(self, name: str) -> StoredImage | None:
        self._drop_old()
        if not _IMAGE_NAME.fullmatch(name):
            return None
        try:
            data = (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None
        return StoredImage(data, f"image/{name.rsplit('.', 1)[1]}")

    def _drop_old(self) -> None:
        """Remove expired images, then the oldest ones until the rest fit ``max_bytes``."""
        images = []
        for entry in os.scandir(self.folder):
            if _IMAGE_NAME.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):  # another worker just dropped it
                    stat = entry.stat()
                    images.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        images.sort()  # oldest first
        total = sum(size for _, size, _ in images)
        expired_before = time.time_ns() - int(self.ttl_s * 1e9)
        for written, size, path in images:
            if written > expired_before and total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
