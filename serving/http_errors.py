"""Turning what can go wrong with a request into an HTTP status and a JSON body that names the problem,
and logging a client's mistake as what it is: one INFO line.

Exceptions carry their HTTP status (``Txt2ImgError.http_status``, as they carry exit codes for the
CLI); ERROR_ANSWERS is the one table from exception type to answer, read by every protocol. Each
protocol's exception handler (serving/jumpstart_routes.py, openai_images.py, a1111.py,
playground.py) keeps the status and headers and reshapes the body into its own error format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from starlette.responses import JSONResponse

from serving.bentoml_compat import REFUSAL_LOGGER_NAME
from serving.invocations import InvocationError
from serving.json_body import BodyError
from serving.schema import describe_errors, describe_validation_error
from txt2img.errors import Txt2ImgError

# What each error status of /txt2img and /images means, for their OpenAPI answers.
GENERATION_ERRORS = {
    400: "Not a valid request: malformed JSON, a wrong or unknown field, or a configured limit broken.",
    403: "The model is not in the HF cache and TXT2IMG_ALLOW_DOWNLOADS forbids requests to download it; "
    "or, without TXT2IMG_API_TOKEN, a Host or Origin that is not loopback or in TXT2IMG_ALLOWED_HOSTS.",
    404: "The model is not a catalog id; suggestions lists close ones.",
    413: "The body is larger than TXT2IMG_MAX_BODY_BYTES.",
    415: "The Content-Type is not application/json, or its charset is not UTF-8.",
    429: "The queue is full; the Retry-After header says when to try again.",
    503: "The model cannot be loaded now, e.g. missing from the local Hugging Face cache.",
    504: "Not finished within TXT2IMG_REQUEST_TIMEOUT_S, queue time included.",
}
# And of /invocations, whose requests name no model.
INVOCATION_ERRORS = {
    400: "Not JumpStart's format: malformed JSON, a wrong or unknown parameter, or a configured limit broken.",
    404: "A LoRA that loras names is not in the catalog.",
    406: "The Accept header names none of JumpStart's accept types.",
    413: GENERATION_ERRORS[413],
    415: "The Content-Type is not application/json or application/x-text, or its charset is not UTF-8.",
    429: GENERATION_ERRORS[429],
    503: "The default model cannot be loaded now.",
    504: GENERATION_ERRORS[504],
}


class ErrorBody(BaseModel):
    """The JSON body of every error answer; fields beyond ``error`` appear where they apply."""

    error: str = Field(description="What is wrong, for a person to read.")
    detail: list[dict[str, Any]] | None = Field(None, description="Validation errors, one per field.")
    field: str | None = Field(None, description="The field at fault: one that broke a limit, or holds bad text.")
    limit: int | None = Field(None, description="That limit.")
    value: int | None = Field(None, description="The value the request asked for.")
    model: str | None = Field(None, description="The unknown, or not downloadable, model id.")
    suggestions: list[str] | None = Field(None, description="Catalog ids close to the unknown one.")
    loras: list[dict[str, Any]] | None = Field(
        None, description="The request's LoRAs at fault (field loras): each one's model, and the base it needs."
    )


class ErrorJSONResponse(JSONResponse):
    """A JSON error answer written in ASCII: whatever text an error echoes, its answer can be encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def invalid_request(detail: list[dict]) -> dict:
    """The body of a 400 for validation errors: a summary a person reads, and one item per field."""
    summary = "; ".join(f"{item['field'] or 'body'}: {item['message']}" for item in detail)
    return {"error": f"invalid request: {summary}", "detail": detail}


@dataclass
class ErrorAnswer:
    """What the service answers for an exception: status, JSON body and headers.

    Our routes send it as it is; the OpenAI and A1111 handlers keep the status and headers and
    reshape the body into their own error format.
    """

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def reworded(self, names: dict[str, str]) -> tuple[str | None, str]:
        """The field at fault (or None) and the message, with our field names put as ``names`` says."""
        body = self.body
        if "limit" in body:
            name = names.get(body["field"], body["field"])
            return name, body["error"].replace(body["field"], name, 1)
        if "detail" in body:
            fields = [names.get(item["field"], item["field"]) for item in body["detail"]]
            problems = [f"{name or 'body'}: {item['message']}" for name, item in zip(fields, body["detail"])]
            return fields[0] or None, f"invalid request: {'; '.join(problems)}"
        return None, body["error"]

    def response(self) -> JSONResponse:
        return ErrorJSONResponse(self.body, status_code=self.status, headers=self.headers)


def _validation_answer(error: ValidationError) -> ErrorAnswer:
    return ErrorAnswer(400, invalid_request(describe_validation_error(error)))


def _wire_answer(error: BodyError | InvocationError) -> ErrorAnswer:
    """The standard-library errors of the wire format (serving/json_body.py, serving/invocations.py)."""
    field = getattr(error, "field", None)
    return ErrorAnswer(error.status, {"error": str(error)} | ({"field": field} if field else {}))


def _carried_answer(error: Txt2ImgError) -> ErrorAnswer:
    """Any of our own errors: the status it carries, its JSON (``as_json`` where it adds fields), Retry-After."""
    body = error.as_json() if hasattr(error, "as_json") else {"error": str(error)}
    retry_after = getattr(error, "retry_after_s", None)
    return ErrorAnswer(error.http_status, body, {"Retry-After": str(retry_after)} if retry_after else {})


# The one table from exception type to answer; a type's nearest listed ancestor answers for it.
ERROR_ANSWERS: dict[type[Exception], Callable[[Any], ErrorAnswer]] = {
    ValidationError: _validation_answer,
    BodyError: _wire_answer,
    InvocationError: _wire_answer,
    Txt2ImgError: _carried_answer,
}


def error_answer(error: Exception) -> ErrorAnswer:
    """The answer for an exception raised while serving a request; unexpected ones re-raise."""
    for kind in type(error).__mro__:
        if kind in ERROR_ANSWERS:
            return ERROR_ANSWERS[kind](error)
    raise error


def error_response(error: Exception) -> JSONResponse:
    """The response for an exception raised while serving a request; unexpected ones re-raise."""
    return error_answer(error).response()


class ClientErrorsAsOneLine(logging.Filter):
    """Turns BentoML's ERROR-with-traceback for a request it refused (a 4xx) into one INFO line.

    BentoML validates a request body against the API's input model before our code runs, and logs a
    refusal with ``log_exception`` (bentoml/_internal/server/http_app.py): ERROR plus some 24 lines of
    its own stack. The client gets its 400 with the reason either way; the log only needs the reason.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            reason = invalid_request(describe_validation_error(error))["error"]
        elif isinstance(error, BentoMLException) and error.error_code < 500:
            reason = f"{error.error_code.value} {error}"
        else:
            return True
        record.msg, record.args = "%s: %s", (record.getMessage().replace("Exception on", "Refused", 1), reason)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


CLIENT_ERRORS_AS_ONE_LINE = ClientErrorsAsOneLine()


def log_client_errors_as_one_line() -> None:
    """Install ClientErrorsAsOneLine on the logger BentoML reports refused requests with (once)."""
    logging.getLogger(REFUSAL_LOGGER_NAME).addFilter(CLIENT_ERRORS_AS_ONE_LINE)


class JSONErrorBodies:
    """ASGI middleware: every error answer has a JSON body whose ``error`` a person can read.

    Our routes already answer that way. The framework does not: BentoML and Starlette answer an
    unknown path (404), a wrong method (405) or an unroutable path value in plain text, and BentoML
    refuses a body that fails an API's input model before our code runs, with "1 validation error
    for ImageRequestIODescriptor" and pydantic's documentation links. Both are rewritten here into
    the answer our own routes give.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_readable_errors(message) -> None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                is_json = content_type.startswith(b"application/json")
                if (message["status"] >= 400 and not is_json) or (message["status"] == 400 and is_json):
                    held["start"] = message  # sent once the body is known, rewritten or not
                    return
            elif held and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start, raw = held["start"], b"".join(chunks)
                readable = _readable_error_body(start, raw)
                if readable is None:
                    await send(start)
                    await send({"type": "http.response.body", "body": raw})
                    return
                headers = [
                    (name, value) for name, value in start.get("headers", []) if name.lower() not in _BODY_HEADERS
                ]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(readable)).encode())]
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": readable})
                return
            await send(message)

        await self.app(scope, receive, send_readable_errors)


_BODY_HEADERS = (b"content-type", b"content-length")


def _readable_error_body(start: dict, raw: bytes) -> bytes | None:
    """The rewritten body of an error answer, or None to send it as it is."""
    content_type = dict(start.get("headers", [])).get(b"content-type", b"")
    if not content_type.startswith(b"application/json"):
        text = raw.decode("utf-8", errors="replace").strip()
        return json.dumps({"error": text or HTTPStatus(start["status"]).phrase}).encode()
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and all(isinstance(item, dict) and "loc" in item for item in detail):
        # BentoML's refusal: pydantic's raw items, whose "loc" starts at the body.
        return json.dumps(invalid_request(describe_errors(detail))).encode()
    return None


def add_error_handlers(app, render: Callable[[Exception], Any], *extra: type[Exception]) -> None:
    """Answer every exception type of ERROR_ANSWERS, and ``extra`` ones, raised by ``app``'s routes with
    ``render(error)``: each protocol's one exception handler, in its own error format."""

    async def handle(request, error: Exception):
        return render(error)

    for kind in (*ERROR_ANSWERS, *extra):
        app.add_exception_handler(kind, handle)
