"""SageMaker's protocol: ``GET /ping`` and JumpStart's ``POST /invocations`` (serving/invocations.py holds
the wire format), and ``GET /models``, the catalog this server may serve.

The routes live on ``sagemaker_app``, which the service mounts at ``/``; errors answer ``{"error": ...}``
with the status ERROR_ANSWERS gives (serving/http_errors.py).
"""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from catalog.families import FAMILIES, model_defaults
from serving.engine import Engine, current_engine
from serving.http_errors import INVOCATION_ERRORS, ErrorBody, add_error_handlers, error_response
from serving.invocation_requests import generation_requests
from serving.invocations import (
    JSON_CONTENT,
    REQUEST_SCHEMA,
    TEXT_CONTENT,
    negotiate_accept,
    parse_request,
    render_response,
)
from serving.recipes import recipe_metadata, result_recipes

# The route reads its body with the wire format's parser (two content types, JumpStart's error
# answers), so FastAPI cannot infer it; this states it for the OpenAPI document.
INVOCATIONS_REQUEST_BODY = {
    "required": True,
    "content": {
        JSON_CONTENT: {"schema": REQUEST_SCHEMA},
        TEXT_CONTENT: {"schema": {"type": "string", "description": "The prompt."}},
    },
}

sagemaker_app = FastAPI(
    title="txt2img SageMaker protocol",
    description="GET /ping and POST /invocations, JumpStart's txt2img wire format; GET /models.",
    docs_url="/sagemaker/docs",
    openapi_url="/sagemaker/openapi.json",
)
add_error_handlers(sagemaker_app, error_response)


@sagemaker_app.get(
    "/ping",
    response_class=Response,  # an empty 200, as SageMaker expects
    responses={200: {"description": "Warm."}, 503: {"description": "Warming up.", "model": ErrorBody}},
)
def ping(engine: Engine = Depends(current_engine)) -> Response:
    """SageMaker's health check: 200 once the default model is warm."""
    if engine.queue.ready.is_set():
        return Response(status_code=200)
    return JSONResponse({"error": engine.queue.warm_up_error or "warming up"}, status_code=503)


@sagemaker_app.post(
    "/invocations",
    openapi_extra={"requestBody": INVOCATIONS_REQUEST_BODY},
    responses={status: {"description": meaning, "model": ErrorBody} for status, meaning in INVOCATION_ERRORS.items()},
)
async def invocations(request: Request, engine: Engine = Depends(current_engine)) -> Response:
    """JumpStart's txt2img contract (serving/invocations.py): application/json or application/x-text in."""
    accept_type = negotiate_accept(request.headers.get("accept"))
    invocation = parse_request(await request.body(), request.headers.get("content-type"))
    results = await engine.generate(generation_requests(invocation, engine.settings), request.is_disconnected)
    images = [image for result in results for image in result.images]
    flags = None
    if engine.settings.safety_checker:
        flags = [flag for result in results for flag in result.nsfw_content_detected]
    metadata = [recipe_metadata(recipe) for result in results for recipe in result_recipes(result)]
    return Response(render_response(invocation, images, accept_type, flags, metadata), media_type=accept_type)


@sagemaker_app.get("/models")
def models(engine: Engine = Depends(current_engine)) -> dict:
    """The catalog ids this server may serve, which of them are loaded now, each one's family and the
    defaults a request for it gets, the BentoML model tag of those served from BentoML's model store, the
    families (what each can use: catalog/families.py), and the catalog files it skipped.

    Each worker has models of its own: "loaded" is that of the worker that answered, named in "worker"."""
    manager = engine.manager
    manager.refresh_catalog()
    loaded = manager.loaded_ids()
    stored = manager.stored
    return {
        "worker": {"index": engine.worker_index, "pid": os.getpid(), "device": manager.device},
        "default": engine.settings.model,
        "loaded": loaded,
        "models": [
            {"id": entry.id, "loaded": entry.id in loaded, "family": entry.family}
            | {"defaults": model_defaults(entry.family, entry.resolution)}
            | ({"bento_model": stored[entry.id].tag} if entry.id in stored else {})
            for entry in manager.catalog
        ],
        "families": {name: family.as_json() for name, family in FAMILIES.items()},
        "catalog_problems": [problem.as_json() for problem in manager.catalog_problems],
    }
