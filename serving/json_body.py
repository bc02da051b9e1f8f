"""Reading a request's JSON body: the one reader of every route that takes JSON, and the text rule.

Every route of the local server that takes a JSON body reads it here (``/invocations``, OpenAI's
and AUTOMATIC1111's routes, the playground), and so does the ``code/inference.py`` that
``txt2img deploy`` packs: the packer copies this file beside serving/invocations.py, so it imports
nothing but the standard library. ``/txt2img`` and ``/images`` are read by BentoML with pydantic's
parser, which refuses the same bodies (tests/test_front_door.py holds every route to that).

The policy:

* The body is UTF-8. A byte order mark (UTF-16 or UTF-32) or a NUL byte is refused, naming the cause.
* Strict JSON: ``NaN``, ``Infinity`` and numbers beyond a float (``1e999``) are refused.
* Bounded: at most MAX_DEPTH levels of arrays and objects, numbers of at most MAX_NUMBER_CHARS characters.
* Text is Unicode scalar values only: a lone UTF-16 surrogate (the JSON text ``"\\udfff"``), in a key
  or a value, is refused here, because a tokenizer fails on it deep inside a batch of other
  people's requests, and an error message that echoed it could not be encoded.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Any

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40


class BodyError(ValueError):
    """A body that is not JSON this server reads; the message names the problem, ``field`` the place in the
    body at fault where there is one (``"negative_prompt"``, ``"loras[0].model"``)."""

    status = 400

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be given to a tokenizer, or None: it must be valid Unicode (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds a lone UTF-16 surrogate (U+{ord(text[error.start]):04X}) at position {error.start}"
    return None


def printable(text: str) -> str:
    """``text`` safe to echo in any message: lone surrogates written as escapes."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def read_json(body: bytes | str, what: str = "the body") -> Any:
    """The JSON value in ``body``, checked against the policy above; raises BodyError naming the problem."""
    text = utf8_text(body, what)
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_bounded_float)
    except json.JSONDecodeError as error:
        raise BodyError(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise BodyError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    _check_values(value, what)
    return value


def read_json_object(body: bytes | str, what: str = "the body") -> dict[str, Any]:
    """``read_json`` for bodies that must be a JSON object."""
    value = read_json(body, what)
    if not isinstance(value, dict):
        raise BodyError(f"{what} must be a JSON object, not {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def utf8_text(body: bytes | str, what: str = "the body") -> str:
    """The body as text: UTF-8 only, refusing what UTF-16 or UTF-32 text looks like."""
    if isinstance(body, str):  # a caller decoded it already: only the text rule is left to check
        problem = text_problem(body)
        if problem:
            raise BodyError(f"{what} {problem}; send valid Unicode text")
        text = body
    else:
        if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # UTF-32's marks start the same
            raise BodyError(f"{what} is UTF-16 or UTF-32 (it starts with a byte order mark); send UTF-8")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BodyError(f"{what} is not UTF-8: {error}") from None
    if "\x00" in text:  # valid UTF-8, but what UTF-16 or UTF-32 text without a byte order mark looks like
        raise BodyError(f"{what} holds NUL bytes, as UTF-16 or UTF-32 text does; send UTF-8")
    return text


def _refuse_constant(name: str):
    raise BodyError(f"{name} is not JSON: numbers must be finite")


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number has {len(digits)} digits; at most {MAX_NUMBER_CHARS} are read")
    return int(digits)


def _bounded_float(digits: str) -> float:
    if len(digits) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number has {len(digits)} characters; at most {MAX_NUMBER_CHARS} are read")
    number = float(digits)
    if not math.isfinite(number):
        raise BodyError(f"the number {digits} is beyond the range of a float")
    return number


def _check_values(value: Any, what: str) -> None:
    """Walk the value without recursion: its depth, and every key and string in it."""
    pending = [(value, 1, "")]
    while pending:
        item, depth, path = pending.pop()
        if isinstance(item, (dict, list)) and depth > MAX_DEPTH:
            raise BodyError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, f"{path}.{printable(key)}" if path else printable(key), what)
                pending.append((child, depth + 1, f"{path}.{printable(key)}" if path else printable(key)))
        elif isinstance(item, list):
            pending.extend((child, depth + 1, f"{path}[{index}]") for index, child in enumerate(item))
        elif isinstance(item, str):
            _check_text(item, path, what)


def _check_text(text: str, path: str, what: str) -> None:
    problem = text_problem(text)
    if problem:
        raise BodyError(f"'{path or what}' {problem}; send valid Unicode text", path or None)
