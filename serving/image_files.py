"""Generated images kept for a while, so a client can fetch them by URL from any worker of the server.

OpenAI's ``response_format: "url"`` answers with links instead of the images. The link may reach
any of the server's workers (the kernel hands each new connection to one of them), so the images
are files in a folder that ``bentoml serve`` makes for all its workers (``share_image_folder``),
not objects in one worker's memory. Each image is kept ``ttl_s`` seconds (an hour, as long as
OpenAI's own links last) and ``max_bytes`` are kept at most in all, the oldest dropped first; a
link past its time answers 404.

A request touches only its own file: ``get`` judges expiry by that file's time, and the byte bound
is kept by a sweeper thread in each process every ``sweep_interval_s`` (so the folder may pass it by
what one interval adds). A folder is removed only when no process uses it: each one using it holds
a shared ``flock`` on its LOCK_NAME file, and a remover needs the exclusive lock, without waiting.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from txt2img.processes import process_alive

IMAGE_TTL_S = 3600
IMAGE_STORE_BYTES = 256 * 2**20
SWEEP_INTERVAL_S = 30
SHARED_FOLDER_ENV = "TXT2IMG_SERVER_IMAGE_FOLDER"  # set by the serving process, read by its workers
SHARED_FOLDER_PREFIX = "txt2img-images-"  # in the temporary folder, one per server: <prefix><host>-<pid>-<random>
LOCK_NAME = ".in-use"  # not an image name: never served
# The names ``add`` gives; a requested name must be one, so a URL cannot reach any other file.
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpeg|webp)")


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str


def use_folder(folder: Path) -> int:
    """Mark ``folder`` in use by this process until it exits (or closes the returned descriptor)."""
    lock = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_SH)
    return lock


def remove_if_unused(folder: Path, lock: int | None = None) -> bool:
    """Remove ``folder`` if no process uses it; ``lock``: this process's own mark on it, given up either way.

    True when it was removed.
    """
    if lock is None:
        try:
            lock = os.open(folder / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:  # not made by this code, or being made right now
            return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(lock)


def share_image_folder() -> None:
    """In the ``bentoml serve`` process, make the image folder its workers share; removed when the server exits.

    Workers inherit the serving process's environment, so they find the folder in SHARED_FOLDER_ENV.
    A worker, which imports the service too, changes nothing. The folders of earlier servers go
    when the next server starts, unless a process still uses them (a worker that outlived its server).
    """
    import bentoml

    if bentoml.server_context.worker_index is not None:
        return
    prefix = f"{SHARED_FOLDER_PREFIX}{socket.gethostname()}-"
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = folder.name.removeprefix(prefix).split("-")[0]
        if (folder / LOCK_NAME).exists():
            remove_if_unused(folder)
        elif pid.isdigit() and not process_alive(int(pid)):  # made before folders were locked
            shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))  # a new folder of this user's only
    atexit.register(remove_if_unused, folder, use_folder(folder))
    os.environ[SHARED_FOLDER_ENV] = str(folder)


def server_image_folder() -> Path:
    """The folder this server's workers share, or one of this process's own outside ``bentoml serve``."""
    return Path(os.environ.get(SHARED_FOLDER_ENV) or tempfile.mkdtemp(prefix=SHARED_FOLDER_PREFIX))


class ImageFiles:
    """Encoded images by unguessable name, as files in ``folder``; several processes may share one folder.

    Its sweeper thread keeps the folder within ``ttl_s`` and ``max_bytes`` every ``sweep_interval_s``
    (``None``: only when ``sweep`` is called).
    """

    def __init__(
        self,
        folder: Path,
        ttl_s: float = IMAGE_TTL_S,
        max_bytes: int = IMAGE_STORE_BYTES,
        sweep_interval_s: float | None = SWEEP_INTERVAL_S,
    ):
        self.folder = folder
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._folder_lock = threading.Lock()
        self._in_use = self._use_folder()
        if sweep_interval_s is not None:
            threading.Thread(
                target=self._sweep_every, args=(sweep_interval_s,), name="image-sweeper", daemon=True
            ).start()

    def add(self, data: bytes, image_format: str) -> str:
        """Keep ``data`` (a PNG, JPEG or WebP) and return its file name, e.g. ``"3q2-...Zw.png"``."""
        name = f"{secrets.token_urlsafe(24)}.{image_format}"
        partial = self.folder / f".{name}.partial"  # not an image name: never served half written
        try:
            partial.write_bytes(data)
        except FileNotFoundError:  # the folder was removed under us: make it again
            removed_folders_mark, self._in_use = self._in_use, self._use_folder()
            os.close(removed_folders_mark)
            partial.write_bytes(data)
        os.replace(partial, self.folder / name)
        return name

    def get(self, name: str) -> StoredImage | None:
        """The image named ``name``, unless no such image was kept or its time is past."""
        if not _IMAGE_NAME.fullmatch(name):
            return None
        try:
            with open(self.folder / name, "rb") as image:
                if os.fstat(image.fileno()).st_mtime_ns <= self._expired_before():
                    return None
                data = image.read()
        except FileNotFoundError:
            return None
        return StoredImage(data, f"image/{name.rsplit('.', 1)[1]}")

    def sweep(self) -> None:
        """Remove expired images, then the oldest ones until the rest fit ``max_bytes``."""
        images = []
        with contextlib.suppress(FileNotFoundError):  # the folder is gone: nothing to keep in bounds
            for entry in os.scandir(self.folder):
                if _IMAGE_NAME.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):  # another worker just dropped it
                        stat = entry.stat()
                        images.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        images.sort()  # oldest first
        total = sum(size for _, size, _ in images)
        expired_before = self._expired_before()
        for written, size, path in images:
            if written > expired_before and total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def _expired_before(self) -> int:
        return time.time_ns() - int(self.ttl_s * 1e9)

    def _use_folder(self) -> int:
        """Make the folder if it is missing, and mark it in use by this process."""
        with self._folder_lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            return use_folder(self.folder)

    def _sweep_every(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            self.sweep()
