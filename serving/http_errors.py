"""Turning what can go wrong with a request into an HTTP status and a JSON body that names the problem."""

from __future__ import annotations

from starlette.responses import JSONResponse

from catalog.index import UnknownModelError
from catalog.pipelines import ModelLoadError
from serving.generation_queue import ClientGone, GenerationTimeout, QueueFull
from serving.invocations import InvocationError
from serving.schema import LimitExceeded, describe_validation_error

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, but logs show why the request ended


def validation_error_body(error) -> dict:
    """pydantic's errors as JSON: which field, and what is wrong with it."""
    detail = describe_validation_error(error)
    summary = "; ".join(f"{item['field'] or 'body'}: {item['message']}" for item in detail)
    return {"error": f"invalid request: {summary}", "detail": detail}


def error_response(error: Exception) -> JSONResponse:
    """The response for an exception raised while serving a request; unexpected ones re-raise."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return JSONResponse(validation_error_body(error), status_code=400)
    if isinstance(error, InvocationError):  # /invocations: JumpStart's wire format names the status
        return JSONResponse(error.as_json(), status_code=error.status)
    if isinstance(error, LimitExceeded):
        return JSONResponse(error.as_json(), status_code=400)
    if isinstance(error, UnknownModelError):
        body = {"error": str(error), "model": error.model_id, "suggestions": error.suggestions}
        return JSONResponse(body, status_code=404)
    if isinstance(error, QueueFull):
        return JSONResponse({"error": str(error)}, status_code=429, headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, GenerationTimeout):
        return JSONResponse({"error": f"generation timed out: {error}"}, status_code=504)
    if isinstance(error, ClientGone):
        return JSONResponse({"error": str(error)}, status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(error, ModelLoadError):
        return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": "60"})
    raise error
