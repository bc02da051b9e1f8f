"""The BentoML service: ``POST /txt2img`` (one image), ``POST /images`` (several), SageMaker's
``/ping`` + ``/invocations``, and ``GET /models``.

Run it with ``bentoml serve`` from the repository root (``bentofile.yaml`` names it). It warms the
catalog model named by env ``TXT2IMG_MODEL`` (default ``tiny-sd``) before ``/readyz`` says ready;
other catalog models load on first use. Every ``TXT2IMG_*`` setting is in serving/settings.py.
Every route, the ones mounted or added later included, sits behind serving/guard.py's middleware
(TXT2IMG_API_TOKEN, TXT2IMG_MAX_BODY_BYTES); the safety checker runs in the generation queue.
"""

from __future__ import annotations

import asyncio
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from PIL import Image
from starlette.responses import JSONResponse, Response

from serving.generation_queue import GenerationQueue, GenerationResult, Job
from serving.guard import BearerTokenAuth, RequestBodyLimit
from serving.http_errors import INVOCATION_ERRORS, ErrorBody, error_response, log_client_errors_as_one_line
from serving.images import image_base64
from serving.invocation_requests import generation_requests
from serving.invocations import (
    JSON_CONTENT,
    REQUEST_SCHEMA,
    TEXT_CONTENT,
    negotiate_accept,
    parse_request,
    render_response,
)
from serving.manager import PipelineManager
from serving.metrics import serving_metrics
from serving.openapi import OpenAPI30Docs
from serving.schema import GeneratedImage, GeneratedImages, GenerationRequest, ImageRequest, check_limits
from serving.settings import ServingSettings

# The route reads its body by hand (two content types, JumpStart's error answers), so FastAPI cannot
# infer it; this states it for the OpenAPI document.
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


@bentoml.service(
    # Our own queue bounds the wait and answers 429/504; BentoML's timer must not cut in first.
    traffic={"timeout": 3600},
    workers=1,
    resources={"gpu": 1},
)
@bentoml.asgi_app(sagemaker_app, path="/")
class Txt2Img:
    def __init__(self) -> None:
        log_client_errors_as_one_line()  # here, in the worker, after BentoML has set logging up
        self.settings = ServingSettings()
        self.manager = PipelineManager(self.settings)
        self.manager.entry(self.settings.model)  # an unknown TXT2IMG_MODEL stops the server right away
        self.queue = GenerationQueue(self.manager, self.settings, serving_metrics())
        self.queue.start(warm_model=self.settings.model)

    def __is_ready__(self) -> bool:
        return self.queue.ready.is_set()

    @bentoml.api(route="/txt2img", input_spec=ImageRequest)
    async def txt2img(self, ctx: bentoml.Context, **settings: Any) -> Image.Image:
        """One image, answered as PNG or JPEG (the request's format) with headers X-Seed and X-Batch-Images,
        and X-NSFW-Content-Detected (true: the image is black) when the safety checker is on."""
        request = GenerationRequest(**settings)
        try:
            [result] = await self._generate([request], ctx.request)
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
            [result] = await self._generate([request], ctx.request)
        except Exception as error:
            return self._error_response(error, ctx)
        ctx.response.headers["X-Batch-Images"] = str(result.batch_images)
        flags = result.nsfw_content_detected or [None] * len(result.images)
        images = [
            GeneratedImage(seed=seed, image=image_base64(image, request.format), nsfw_content_detected=flag)
            for seed, image, flag in zip(result.seeds, result.images, flags)
        ]
        return GeneratedImages(format=request.format, images=images)

    @sagemaker_app.get(
        "/ping",
        response_class=Response,  # an empty 200, as SageMaker expects
        responses={200: {"description": "Warm."}, 503: {"description": "Warming up.", "model": ErrorBody}},
    )
    def ping(self) -> Response:
        """SageMaker's health check: 200 once the default model is warm."""
        if self.queue.ready.is_set():
            return Response(status_code=200)
        return JSONResponse({"error": self.queue.warm_up_error or "warming up"}, status_code=503)

    @sagemaker_app.post(
        "/invocations",
        openapi_extra={"requestBody": INVOCATIONS_REQUEST_BODY},
        responses={
            status: {"description": description, "model": ErrorBody}
            for status, description in INVOCATION_ERRORS.items()
        },
    )
    async def invocations(self, request: Request) -> Response:
        """JumpStart's txt2img contract (serving/invocations.py): application/json or application/x-text in."""
        try:
            accept_type = negotiate_accept(request.headers.get("accept"))
            invocation = parse_request(await request.body(), request.headers.get("content-type"))
            results = await self._generate(generation_requests(invocation, self.settings), request)
        except Exception as error:
            return error_response(error)
        images = [image for result in results for image in result.images]
        flags = None
        if self.settings.safety_checker:
            flags = [flag for result in results for flag in result.nsfw_content_detected]
        return Response(render_response(invocation, images, accept_type, flags), media_type=accept_type)

    @sagemaker_app.get("/models")
    def models(self) -> dict:
        """The catalog ids this server may serve, and which of them are loaded now."""
        loaded = self.manager.loaded_ids()
        return {
            "default": self.settings.model,
            "loaded": loaded,
            "models": [{"id": model_id, "loaded": model_id in loaded} for model_id in self.manager.catalog.ids()],
        }

    async def _generate(self, requests: list[GenerationRequest], http_request: Request) -> list[GenerationResult]:
        """Queue every request at once (so they can share pipeline calls) and wait for all of them."""
        jobs = [self._job(request) for request in requests]  # checks them all before queueing any
        try:
            for job in jobs:
                self.queue.submit(job)
            return await asyncio.gather(
                *(self.queue.wait(job, client_gone=http_request.is_disconnected) for job in jobs)
            )
        except BaseException:
            for job in jobs:
                job.abandoned.set()
            raise

    def _job(self, request: GenerationRequest) -> Job:
        entry = self.manager.entry(request.model or self.settings.model)
        width = request.width or entry.resolution
        height = request.height or entry.resolution
        check_limits(request, self.settings, width, height)
        return Job.create(entry, request, width, height, self.settings.request_timeout_s)

    @staticmethod
    def _error_response(error: Exception, ctx: bentoml.Context) -> JSONResponse:
        response = error_response(error)
        ctx.response.status_code = response.status_code  # BentoML gives the answer the context's status
        return response


# The first added is the outermost: auth refuses a stranger before a byte of the body is read.
Txt2Img.add_asgi_middleware(BearerTokenAuth)  # TXT2IMG_API_TOKEN, on every route but the health checks
Txt2Img.add_asgi_middleware(RequestBodyLimit)  # TXT2IMG_MAX_BODY_BYTES, on every route
Txt2Img.add_asgi_middleware(OpenAPI30Docs, service=Txt2Img)  # /docs.json as valid OpenAPI 3.0
