"""txt2img's own API: ``POST /txt2img`` (one image, answered as the image itself) and ``POST /images``
(several, as base64 in JSON).

Both are BentoML APIs, so that ``bentoml.SyncHTTPClient`` and BentoML's OpenAPI document know them:
BentoML reads and validates their bodies against ImageRequest and GenerationRequest (pydantic's
strict JSON parser, which refuses what serving/json_body.py refuses), and the service's methods
hand the validated fields to the functions here. BentoML's APIs take no exception handler, so these
answer errors themselves, with the statuses and bodies ERROR_ANSWERS gives.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from serving.engine import Engine
from serving.generation_queue import GenerationResult
from serving.http_errors import error_response
from serving.images import image_base64, image_bytes
from serving.recipes import recipe_metadata, result_recipes
from serving.schema import GeneratedImage, GeneratedImages, GenerationRequest


async def one_image(engine: Engine, ctx, fields: dict[str, Any]) -> Response:
    """``POST /txt2img``: the image in the request's format, its recipe embedded, with headers X-Seed and
    X-Batch-Images, and X-NSFW-Content-Detected when the safety checker is on."""
    request = GenerationRequest(**fields)
    try:
        [result] = await engine.generate([request], ctx.request.is_disconnected)
    except Exception as error:
        return _error_response(error, ctx)
    ctx.response.headers["X-Seed"] = str(result.seeds[0])
    ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
    if result.nsfw_content_detected is not None:  # the safety checker is on
        ctx.response.headers["X-NSFW-Content-Detected"] = str(result.nsfw_content_detected[0]).lower()
    # Encoded here, not by BentoML, whose encoder drops the recipe.
    [recipe] = result_recipes(result)
    encoded = image_bytes(result.images[0], request.format, metadata=recipe_metadata(recipe))
    return Response(encoded, media_type=f"image/{request.format}")


async def several_images(engine: Engine, ctx, fields: dict[str, Any]) -> GeneratedImages | JSONResponse:
    """``POST /images``: every image with its seed, and header X-Batch-Images."""
    request = GenerationRequest(**fields)
    try:
        [result] = await engine.generate([request], ctx.request.is_disconnected)
    except Exception as error:
        return _error_response(error, ctx)
    ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
    return generated_images(request, result)


def generated_images(request: GenerationRequest, result: GenerationResult) -> GeneratedImages:
    """``POST /images``'s answer: every image in seed order, encoded in the request's format with its recipe."""
    flags = result.nsfw_content_detected or [None] * len(result.images)
    images = [
        GeneratedImage(
            seed=recipe.seed,
            image=image_base64(image, request.format, metadata=recipe_metadata(recipe)),
            nsfw_content_detected=flag,
        )
        for recipe, image, flag in zip(result_recipes(result), result.images, flags)
    ]
    return GeneratedImages(format=request.format, images=images)


def _error_response(error: Exception, ctx) -> JSONResponse:
    response = error_response(error)
    ctx.response.status_code = response.status_code  # BentoML gives the answer the context's status
    return response
