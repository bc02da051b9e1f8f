"""The one error base class of txt2img, and the exit codes and HTTP statuses errors map to.

Every expected failure (bad input, a missing model, an AWS refusal, an interrupted run) raises a
subclass of ``Txt2ImgError``; the ``txt2img`` command catches it once and prints one line, and the
server answers it with its ``http_status`` (serving/http_errors.py). Library callers catch
``Txt2ImgError`` to handle all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Txt2ImgError(Exception):
    """An expected failure whose message is meant for the user; ``exit_code`` is what the CLI exits with,
    ``http_status`` what the server answers with."""

    exit_code = EXIT_FAILED
    http_status = 500


class InputError(Txt2ImgError):
    """The user asked for something that cannot be done as asked: a wrong option, id, file or value."""

    exit_code = EXIT_BAD_INPUT
    http_status = 400


class Interrupted(Txt2ImgError):
    """The user stopped a long run (Ctrl-C); its progress was kept."""

    exit_code = EXIT_INTERRUPTED


def first_error(error: ValidationError) -> str:
    """A pydantic error as one line, ``field: message``, without pydantic's dump and its URLs."""
    detail = error.errors()[0]
    field = ".".join(str(part) for part in detail["loc"])
    # A validator's own ValueError reads better without pydantic's "Value error, " in front.
    message = str(detail["ctx"]["error"]) if detail["type"] == "value_error" else detail["msg"]
    return f"{field}: {message}" if field else message
