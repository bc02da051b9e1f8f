"""OpenAI's Images API: ``POST /v1/images/generations`` and ``GET /v1/models``, as a thin adapter.

The routes live on ``openai_app``, which the service mounts at ``/v1``; the service's own /docs.json
documents them.

A request becomes one GenerationRequest (``n`` images) for the service's one queue, so limits,
batching and metrics are those of every other route; the images come back in OpenAI's answer
shape, and errors in OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

* ``model`` is a catalog id (the server's TXT2IMG_MODEL when absent), ``size`` is ``"WxH"`` or
  ``"auto"`` (the model's native size), ``output_format`` is png, jpeg or webp.
* ``response_format`` defaults to ``b64_json``; ``url`` answers with links to this server,
  kept for an hour (serving/image_files.py).
* Our own settings ride along as extra fields (the OpenAI SDK's ``extra_body``): ``seed``,
  ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``true_cfg_scale`` (Flux), ``scheduler``
  and ``loras`` (``[{"model": "<LoRA catalog id>", "scale": 0.8}]``), each as strict as on ``/images``.
* OpenAI options with no equivalent here are accepted at the values that ask for nothing
  (NEUTRAL_VALUES) and refused otherwise, naming the option; unknown fields are refused, as
  OpenAI refuses them.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from catalog.schema import CatalogEntry
from serving.engine import Engine, current_engine
from serving.generation_queue import GenerationResult
from serving.http_errors import GENERATION_ERRORS, ErrorJSONResponse, add_error_handlers, error_answer
from serving.images import image_bytes
from serving.json_body import BodyError, read_json_object
from serving.openapi import json_request_body
from serving.recipes import recipe_metadata, result_recipes
from serving.schema import GenerationRequest, LoraWeight, PromptSyntax, SchedulerName, Text

OutputFormat = Literal["png", "jpeg", "webp"]
SIZE_PATTERN = re.compile(r"^(\d{1,6})x(\d{1,6})$")
# OpenAI options this server has no equivalent for, and the values of each that ask for nothing here.
NEUTRAL_VALUES: dict[str, tuple] = {
    "quality": ("auto", "standard"),
    "style": (),
    "background": ("auto", "opaque"),  # our images are opaque
    "moderation": ("auto", "low"),  # this server moderates nothing
    "stream": (False,),
    "partial_images": (0,),
    "complexity": (),
    "frame_count": (),
    "frame_duration_ms": (),
    "svg": (),
}
# Our field names in errors, as an OpenAI client knows them.
OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size", "width*height": "size"}
ERROR_CODES = {404: "model_not_found", 429: "rate_limit_exceeded", 503: "model_not_available", 504: "timeout"}


class OpenAIRequestError(ValueError):
    """A request OpenAI's API would refuse too; ``param`` names the field."""

    def __init__(self, message: str, param: str | None, code: str | None = "invalid_value"):
        self.param = param
        self.code = code
        super().__init__(message)


class ImageGenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations`` that this server acts on."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text
    model: Text | None = Field(None, description="Catalog id; defaults to the server's TXT2IMG_MODEL.")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels, or 'auto' for the model's native size.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG or WebP quality.")
    user: str | None = Field(None, description="Accepted and not used.")
    safety_identifier: str | None = Field(None, description="Accepted and not used.")
    # Ours, sent through the OpenAI SDK's extra_body.
    seed: int | None = None
    negative_prompt: Text | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    scheduler: SchedulerName | None = None
    prompt_syntax: PromptSyntax = "plain"
    loras: list[LoraWeight] = Field(
        default_factory=list, description="LoRA fine-tunes of the model, each at its scale."
    )


def parse_image_request(body: bytes) -> ImageGenerationRequest:
    """The request in ``body``; raises BodyError, OpenAIRequestError or ValidationError naming the problem."""
    payload = read_json_object(body)
    for name, value in payload.items():
        if name in NEUTRAL_VALUES:
            neutral = NEUTRAL_VALUES[name]
            if value is not None and value not in neutral:
                accepted = " or ".join(json.dumps(item) for item in neutral) or "null"
                raise OpenAIRequestError(
                    f"'{name}' = {json.dumps(value)} has no equivalent on this server; it accepts {accepted}",
                    name,
                    "unsupported_value",
                )
        elif name not in ImageGenerationRequest.model_fields:
            raise OpenAIRequestError(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    fields = {name: value for name, value in payload.items() if name not in NEUTRAL_VALUES}
    return ImageGenerationRequest.model_validate(fields)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"512x384"`` -> ``(512, 384)``; None or ``"auto"`` -> the model's native size."""
    if size is None or size == "auto":
        return None, None
    match = SIZE_PATTERN.fullmatch(size)
    if not match or int(match[1]) % 8 or int(match[2]) % 8 or not int(match[1]) or not int(match[2]):
        raise OpenAIRequestError(
            f"Invalid value for 'size': {size!r}. Use 'WIDTHxHEIGHT' in pixels, both multiples of 8 "
            "(e.g. '512x512'), or 'auto' for the model's native size.",
            "size",
        )
    return int(match[1]), int(match[2])


def generation_request(request: ImageGenerationRequest) -> GenerationRequest:
    """The GenerationRequest for ``n`` images; our own defaults fill what the request leaves out."""
    if request.output_format == "png" and request.output_compression not in (None, 100):
        raise OpenAIRequestError("'output_compression' applies to jpeg and webp output only", "output_compression")
    width, height = parse_size(request.size)
    fields = {
        "model": request.model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": width,
        "height": height,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "true_cfg_scale": request.true_cfg_scale,
        "seed": request.seed,
        "scheduler": request.scheduler,
        "prompt_syntax": request.prompt_syntax,
        "num_images": request.n,
        "loras": request.loras,
    }
    return GenerationRequest(**{name: value for name, value in fields.items() if value is not None})


def images_response(
    request: ImageGenerationRequest, result: GenerationResult, file_url: Callable[[bytes, str], str]
) -> dict[str, Any]:
    """OpenAI's answer: ``{"created", "data": [{"b64_json" | "url", "seed"}], ...}``.

    ``seed`` is ours (OpenAI has none): send it back as ``extra_body={"seed": ...}`` for the same image.
    ``file_url`` keeps an encoded image and returns the URL it is served at.
    """
    data = []
    for recipe, image in zip(result_recipes(result), result.images):
        quality = request.output_compression if request.output_format != "png" else None
        encoded = image_bytes(image, request.output_format, quality, metadata=recipe_metadata(recipe))
        if request.response_format == "url":
            data.append({"url": file_url(encoded, request.output_format), "seed": recipe.seed})
        else:
            data.append({"b64_json": base64.b64encode(encoded).decode("ascii"), "seed": recipe.seed})
    width, height = result.images[0].size
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": request.output_format,
        "size": f"{width}x{height}",
    }


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error answer, which its SDKs raise as BadRequestError, NotFoundError and so on."""

    error: OpenAIError


def openai_error_answers(*statuses: int) -> dict[int, dict[str, Any]]:
    """The OpenAPI ``responses`` for these error statuses of an OpenAI route (GENERATION_ERRORS' meanings)."""
    return {status: {"description": GENERATION_ERRORS[status], "model": OpenAIErrorBody} for status in statuses}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return ErrorJSONResponse(body, status_code=status, headers=headers)


def openai_error_response(error: Exception) -> JSONResponse:
    """Any error of the route in OpenAI's shape, with the status our other routes give it."""
    if isinstance(error, OpenAIRequestError):
        return openai_error(400, str(error), error.param, error.code)
    answer = error_answer(error)
    param, message = answer.reworded(OPENAI_NAMES)
    if "limit" in answer.body:
        code = "limit_exceeded"
    elif isinstance(error, ValidationError):
        code = "invalid_value"
    elif isinstance(error, BodyError):
        param, code = error.field, "invalid_json"
    else:
        code = ERROR_CODES.get(answer.status)
    return openai_error(answer.status, message, param, code, answer.headers)


def model_object(entry: CatalogEntry) -> dict[str, Any]:
    created = int(entry.created.timestamp()) if entry.created else 0
    return {"id": entry.id, "object": "model", "created": created, "owned_by": entry.source}


def model_list(entries: list[CatalogEntry]) -> dict[str, Any]:
    """``GET /v1/models``: the catalog in OpenAI's list format; ``owned_by`` is the entry's source."""
    return {"object": "list", "data": [model_object(entry) for entry in entries]}


# The route reads its body with the one reader, to answer every error in OpenAI's format; this states it.
OPENAI_REQUEST_BODY = json_request_body(ImageGenerationRequest)

# The service's own /docs.json documents these routes; the app serves no documents of its own.
openai_app = FastAPI(title="txt2img OpenAI Images API", docs_url=None, redoc_url=None, openapi_url=None)
add_error_handlers(openai_app, openai_error_response, OpenAIRequestError)


@openai_app.post(
    "/images/generations",
    openapi_extra={"requestBody": OPENAI_REQUEST_BODY},
    responses=openai_error_answers(400, 403, 404, 413, 429, 503, 504),
)
async def openai_generations(request: Request, engine: Engine = Depends(current_engine)) -> Response:
    """OpenAI's image generation; errors in OpenAI's shape."""
    openai_request = parse_image_request(await request.body())
    [result] = await engine.generate([generation_request(openai_request)], request.is_disconnected)

    def file_url(data: bytes, image_format: str) -> str:
        return str(request.url_for("openai_image_file", name=engine.image_files.add(data, image_format)))

    return JSONResponse(images_response(openai_request, result, file_url))


@openai_app.get("/images/files/{name}", name="openai_image_file", responses=openai_error_answers(404))
def openai_image_file(name: str, engine: Engine = Depends(current_engine)) -> Response:
    """An image of a response_format "url" answer, kept for an hour (serving/image_files.py).

    A plain ``def``: FastAPI runs it in a thread, so reading the file never blocks the event loop."""
    stored = engine.image_files.get(name)
    if stored is None:
        return openai_error(404, f"no image {json.dumps(name)[:80]}: its link expired or never existed")
    return Response(stored.data, media_type=stored.media_type)


@openai_app.get("/models")
def openai_models(engine: Engine = Depends(current_engine)) -> dict:
    """The catalog in OpenAI's list format."""
    return model_list(list(engine.manager.catalog))


@openai_app.get("/models/{model_id}", responses=openai_error_answers(404))
def openai_model(model_id: str, engine: Engine = Depends(current_engine)) -> dict:
    return model_object(engine.manager.entry(model_id))
