"""Turning what can go wrong with a request into an HTTP status and a JSON body that names the problem,
and logging a client's mistake as what it is: one INFO line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from catalog.index import UnknownModelError
from catalog.pipelines import ModelLoadError
from serving.generation_queue import ClientGone, GenerationTimeout, QueueFull
from serving.invocations import InvocationError
from serving.manager import DownloadsForbidden
from serving.schema import LimitExceeded, describe_errors, describe_validation_error

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, but logs show why the request ended

# What each error status of /txt2img and /images means, for their OpenAPI answers.
GENERATION_ERRORS = {
    400: "Not a valid request: malformed JSON, a wrong or unknown field, or a configured limit broken.",
    403: "The model is not in the HF cache and TXT2IMG_ALLOW_DOWNLOADS forbids requests to download it.",
    404: "The model is not a catalog id; suggestions lists close ones.",
    413: "The body is larger than TXT2IMG_MAX_BODY_BYTES.",
    429: "The queue is full; the Retry-After header says when to try again.",
    503: "The model cannot be loaded now, e.g. missing from the local Hugging Face cache.",
    504: "Not finished within TXT2IMG_REQUEST_TIMEOUT_S, queue time included.",
}
# And of /invocations, whose requests name no model.
INVOCATION_ERRORS = {
    400: "Not JumpStart's format: malformed JSON, a wrong or unknown parameter, or a configured limit broken.",
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
    field: str | None = Field(None, description="The field that broke a configured limit.")
    limit: int | None = Field(None, description="That limit.")
    value: int | None = Field(None, description="The value the request asked for.")
    model: str | None = Field(None, description="The unknown, or not downloadable, model id.")
    suggestions: list[str] | None = Field(None, description="Catalog ids close to the unknown one.")


def validation_error_body(error) -> dict:
    """pydantic's errors as JSON: which field, and what is wrong with it."""
    return _invalid_request(describe_validation_error(error))


def _invalid_request(detail: list[dict]) -> dict:
    summary = "; ".join(f"{item['field'] or 'body'}: {item['message']}" for item in detail)
    return {"error": f"invalid request: {summary}", "detail": detail}


@dataclass
class ErrorAnswer:
    """What the service answers for an exception: status, JSON body and headers.

    Our routes send it as it is; the OpenAI and A1111 adapters keep the status and headers and
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
            return name, f"{name} is {body['value']}, above the limit of {body['limit']}"
        if "detail" in body:
            fields = [names.get(item["field"], item["field"]) for item in body["detail"]]
            problems = [f"{name or 'body'}: {item['message']}" for name, item in zip(fields, body["detail"])]
            return fields[0] or None, f"invalid request: {'; '.join(problems)}"
        return None, body["error"]


def error_answer(error: Exception) -> ErrorAnswer:
    """The answer for an exception raised while serving a request; unexpected ones re-raise."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return ErrorAnswer(400, validation_error_body(error))
    if isinstance(error, InvocationError):  # /invocations: JumpStart's wire format names the status
        return ErrorAnswer(error.status, error.as_json())
    if isinstance(error, LimitExceeded):
        return ErrorAnswer(400, error.as_json())
    if isinstance(error, UnknownModelError):
        return ErrorAnswer(404, {"error": str(error), "model": error.model_id, "suggestions": error.suggestions})
    if isinstance(error, QueueFull):
        return ErrorAnswer(429, {"error": str(error)}, {"Retry-After": str(error.retry_after)})
    if isinstance(error, GenerationTimeout):
        return ErrorAnswer(504, {"error": f"generation timed out: {error}"})
    if isinstance(error, ClientGone):
        return ErrorAnswer(CLIENT_CLOSED_REQUEST, {"error": str(error)})
    if isinstance(error, DownloadsForbidden):  # retrying will not help, unlike a failed load
        return ErrorAnswer(403, {"error": str(error), "model": error.model_id})
    if isinstance(error, ModelLoadError):
        return ErrorAnswer(503, {"error": str(error)}, {"Retry-After": "60"})
    raise error


def error_response(error: Exception) -> JSONResponse:
    """The response for an exception raised while serving a request; unexpected ones re-raise."""
    answer = error_answer(error)
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


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
            reason = validation_error_body(error)["error"]
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
    logging.getLogger("bentoml._internal.server.http_app").addFilter(CLIENT_ERRORS_AS_ONE_LINE)


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
        return json.dumps(_invalid_request(describe_errors(detail))).encode()
    return None
