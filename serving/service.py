"""The BentoML service: ``POST /txt2img`` (one image) and ``POST /images`` (several), and the protocols
mounted beside them, each a module that owns its routes, request models and exception handler:

* serving/sagemaker_api.py: SageMaker's ``/ping`` and JumpStart's ``/invocations``, and ``GET /models``;
* serving/openai_images.py: OpenAI's Images API under ``/v1``;
* serving/a1111.py: AUTOMATIC1111's API under ``/sdapi/v1``;
* serving/playground.py: the web playground at ``/ui`` (``/`` leads there; BentoML's Swagger UI moves to ``/docs``).

Every route generates through the worker's one Engine (serving/engine.py): the same request model,
limits, queue and batching. Run it with ``bentoml serve`` from the repository root (``bentofile.yaml``
names it). It warms the catalog model named by env ``TXT2IMG_MODEL`` (default ``tiny-sd``) before
``/readyz`` says ready; other catalog models load on first use. Every ``TXT2IMG_*`` setting is in
serving/settings.py. Every route, the ones mounted or added later included, sits behind
serving/guard.py's middleware (TXT2IMG_API_TOKEN, TXT2IMG_MAX_BODY_BYTES); the safety checker runs
in the generation queue. Models saved into BentoML's model store (``txt2img bento-model save``) are
found there first, and ``bentoml build`` packs those env ``TXT2IMG_BENTO_MODELS`` names
(serving/model_store.py).
"""

from __future__ import annotations

from typing import Any

import bentoml
from PIL import Image
from starlette.responses import JSONResponse

from serving.a1111 import a1111_app
from serving.device import serving_gpu_count, serving_worker_count
from serving.engine import Engine
from serving.generation_queue import GenerationResult
from serving.guard import BearerTokenAuth, RequestBodyLimit
from serving.http_errors import JSONErrorBodies, error_response, log_client_errors_as_one_line
from serving.image_files import share_image_folder
from serving.images import image_base64
from serving.metrics import own_prometheus_dir
from serving.model_store import bento_models_to_pack
from serving.openai_images import openai_app
from serving.openapi import OpenAPI30Docs
from serving.playground import PlaygroundHome, playground_app
from serving.sagemaker_api import sagemaker_app
from serving.schema import GeneratedImage, GeneratedImages, GenerationRequest, ImageRequest
from serving.settings import ServingSettings

own_prometheus_dir()  # so that a second server beside this one cannot wipe its metrics (serving/metrics.py)
share_image_folder()  # so that any worker can serve an OpenAI "url" image that another one made

# ``bentoml serve`` reads the worker count from the decorator when it imports this module, before
# any worker starts, so both counts are settled here. BentoML shows every worker the first
# SERVER_GPUS GPUs (CUDA_VISIBLE_DEVICES) and each worker takes its own one (serving/device.py).
SERVER_SETTINGS = ServingSettings()
SERVER_GPUS = serving_gpu_count(SERVER_SETTINGS)
SERVER_WORKERS = serving_worker_count(SERVER_SETTINGS)


@bentoml.service(
    # Our own queue bounds the wait and answers 429/504; BentoML's timer must not cut in first.
    traffic={"timeout": 3600},
    # One worker per GPU by default, each a process with its own device, queue and model cache.
    workers=SERVER_WORKERS,
    resources={"gpu": max(1, SERVER_GPUS)},  # at least 1: BentoCloud reads it as the GPUs to give a replica
)
@bentoml.asgi_app(sagemaker_app, path="/")  # mounted last: it would take the paths of any mounted after it
@bentoml.asgi_app(playground_app, path="/")
@bentoml.asgi_app(a1111_app, path="/sdapi/v1")
@bentoml.asgi_app(openai_app, path="/v1")
class Txt2Img:
    def __init__(self) -> None:
        log_client_errors_as_one_line()  # here, in the worker, after BentoML has set logging up
        self.engine = Engine(ServingSettings(), worker_index=bentoml.server_context.worker_index)
        self.engine.start()

    def __is_ready__(self) -> bool:
        return self.engine.queue.ready.is_set()

    @bentoml.api(route="/txt2img", input_spec=ImageRequest)
    async def txt2img(self, ctx: bentoml.Context, **settings: Any) -> Image.Image:
        """One image, answered as PNG or JPEG (the request's format) with headers X-Seed and X-Batch-Images,
        and X-NSFW-Content-Detected (true: the image is black) when the safety checker is on."""
        request = GenerationRequest(**settings)
        try:
            [result] = await self.engine.generate([request], ctx.request.is_disconnected)
        except Exception as error:
            return self._error_response(error, ctx)
        ctx.response.headers["X-Seed"] = str(result.seeds[0])
        ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
        if result.nsfw_content_detected is not None:  # the safety checker is on
            ctx.response.headers["X-NSFW-Content-Detected"] = str(result.nsfw_content_detected[0]).lower()
        image = result.images[0].convert("RGB")
        image.format = request.format.upper()  # BentoML encodes a returned image in its own format
        return image

    @bentoml.api(route="/images", input_spec=GenerationRequest)
    async def images(self, ctx: bentoml.Context, **settings: Any) -> GeneratedImages:
        """num_images images as base64 PNG or JPEG in JSON, each with its seed, and header X-Batch-Images."""
        request = GenerationRequest(**settings)
        try:
            [result] = await self.engine.generate([request], ctx.request.is_disconnected)
        except Exception as error:
            return self._error_response(error, ctx)
        ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
        return generated_images(request, result)

    @staticmethod
    def _error_response(error: Exception, ctx: bentoml.Context) -> JSONResponse:
        """BentoML's own routes cannot take an exception handler: they answer through this."""
        response = error_response(error)
        ctx.response.status_code = response.status_code  # BentoML gives the answer the context's status
        return response


def generated_images(request: GenerationRequest, result: GenerationResult) -> GeneratedImages:
    """``POST /images``'s answer: every image in seed order, encoded in the request's format."""
    flags = result.nsfw_content_detected or [None] * len(result.images)
    images = [
        GeneratedImage(seed=seed, image=image_base64(image, request.format), nsfw_content_detected=flag)
        for seed, image, flag in zip(result.seeds, result.images, flags)
    ]
    return GeneratedImages(format=request.format, images=images)


# The first added is the outermost: auth refuses a stranger before a byte of the body is read.
Txt2Img.add_asgi_middleware(BearerTokenAuth)  # TXT2IMG_API_TOKEN, on every route but the health checks
Txt2Img.add_asgi_middleware(RequestBodyLimit)  # TXT2IMG_MAX_BODY_BYTES, on every route
# What `bentoml build` packs into the Bento; empty unless TXT2IMG_BENTO_MODELS names stored models.
Txt2Img.models.extend(bento_models_to_pack())
Txt2Img.add_asgi_middleware(OpenAPI30Docs, service=Txt2Img)  # /docs.json as valid OpenAPI 3.0
Txt2Img.add_asgi_middleware(JSONErrorBodies)  # the framework's plain-text 404/405 as JSON too
Txt2Img.add_asgi_middleware(PlaygroundHome)  # / redirects to /ui; Swagger UI at /docs
