"""Where catalog files live, and how they are written so a crash never corrupts one."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from txt2img.errors import InputError, Txt2ImgError

BUILTIN_CATALOG = Path(__file__).with_name("models.yaml")
ENTRY_SUFFIX = ".yaml"


class WriteFailed(Txt2ImgError):
    """A file could not be written (a full disk, a read-only folder); nothing was left half-written."""


@contextmanager
def writing(what: Path) -> Iterator[None]:
    """Turn a failed write inside the block into one ``WriteFailed`` line that names ``what``."""
    try:
        yield
    except FileExistsError:  # not a failed write: the caller decides what an existing file means
        raise
    except OSError as error:
        raise WriteFailed(f"cannot write {what}: {(error.strerror or str(error)).lower()}") from error
    except Exception as error:
        from safetensors import SafetensorError

        # safetensors reports a failed write as its own error, e.g. "I/O error: No space left on device".
        if isinstance(error, SafetensorError) and "I/O error" in str(error):
            reason = str(error).split("I/O error:", 1)[1].split("(os error", 1)[0].strip().lower()
            raise WriteFailed(f"cannot write {what}: {reason}") from error
        raise


class NotAFolder(InputError):
    """A path that must be a folder, or become one, is a file or lies under one."""


def require_folder(folder: Path, what: str) -> Path:
    """``folder``, once it is sure that it is a folder or can become one; else NotAFolder names ``what``
    and the file in the way, so a command refuses before any work instead of failing at its first write."""
    for candidate in (folder, *folder.parents):
        try:
            is_folder = stat.S_ISDIR(candidate.stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet: what stands above it decides
        except OSError as error:
            raise NotAFolder(f"{what} {folder}: {(error.strerror or str(error)).lower()}") from None
        if is_folder:
            return folder
        if candidate == folder:
            raise NotAFolder(f"{what} {folder} is a file, not a folder")
        raise NotAFolder(f"{what} {folder} is under {candidate}, a file")
    return folder


def txt2img_home() -> Path:
    """The user's txt2img data directory: env ``TXT2IMG_HOME`` or the platform's data dir.

    Every reader and writer of the home comes here, so a home that cannot be a folder is refused
    (NotAFolder) by each of them in the same words."""
    configured = os.environ.get("TXT2IMG_HOME")
    if configured:
        return require_folder(Path(configured).expanduser(), "TXT2IMG_HOME")
    from platformdirs import user_data_dir

    return require_folder(Path(user_data_dir("txt2img", appauthor=False)), "txt2img's data folder")


def user_catalog_dir() -> Path:
    """Where fine-tuned models' catalog entries live, one YAML file each."""
    return txt2img_home() / "catalog"


def catalog_files(user_dir: Path | None = None, builtin: Path = BUILTIN_CATALOG) -> list[Path]:
    """The files that make up the merged catalog: the built-in one, then each user entry."""
    user_dir = user_catalog_dir() if user_dir is None else user_dir
    files = [builtin]
    if user_dir.is_dir():
        files.extend(sorted(p for p in user_dir.iterdir() if p.suffix == ENTRY_SUFFIX and p.is_file()))
    return files


def _write_temporary(path: Path, data: bytes) -> str:
    """Write ``data`` to a new file beside ``path`` and flush it to disk; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file private; give it the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~current_umask())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash at any point leaves either the old or the new file."""
    with writing(path):
        temporary = _write_temporary(path, data)
        try:
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def exclusive_create_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` in one step; raises FileExistsError if it exists already.

    The file appears whole or not at all, and of two processes creating the same path exactly
    one succeeds (a hard link, unlike a rename, never replaces its target).
    """
    with writing(path):
        temporary = _write_temporary(path, data)
        try:
            os.link(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def staging_directory(parent: Path, name: str) -> Path:
    """A new folder in ``parent`` to assemble ``name`` in before renaming it into place."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))


def follow_umask(tree: Path) -> None:
    """Give an assembled folder the permissions plain mkdir() and open() would have given it.

    mkdtemp creates folders 0700 and safetensors writes weights 0600; a published model should
    be readable as any other file the user writes.
    """
    umask = current_umask()
    for root, _, files in os.walk(tree):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask
